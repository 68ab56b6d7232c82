"""Ray Train: the same DPO loop on 2 CPU workers (gloo) of a real local Ray cluster."""

import json

import pytest
from support import local_ray_cluster

from trainer.config import TrainConfig


@pytest.fixture
def local_ray():
    with local_ray_cluster(runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}):
        yield


def test_two_ray_workers_train_and_report_a_loadable_checkpoint(local_ray, crafted_pairs_dir, tiny_checkpoint,
                                                                tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.ray_train import train_on_ray

    out = tmp_path / "ray-run"
    # 4 pairs per step = 2 per worker x 2 workers, no accumulation
    config = TrainConfig.from_preset(
        "demo", pairs=str(crafted_pairs_dir), model=tiny_checkpoint, output_dir=str(out), max_length=128,
        per_device_batch_size=2, pairs_per_step=4, max_steps=3, warmup_ratio=0.0, eval_batch_size=8,
        eval_fraction=0.1, save_steps=2,
    )
    reported = train_on_ray(config, num_workers=2, storage_path=str(tmp_path / "ray-storage"))

    assert reported.startswith(str(tmp_path / "ray-storage"))
    model = AutoModelForCausalLM.from_pretrained(reported)
    assert model.config.num_hidden_layers == 2
    saved = (out / "train_config.yaml").read_text()
    assert "world_size: 2" in saved and "gradient_accumulation_steps: 1" in saved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and [r["step"] for r in metrics["train"]] == [1, 2, 3]
    assert metrics["eval_end"]["loss"] < 0.6932  # the 2-rank run optimises the same loss
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()
