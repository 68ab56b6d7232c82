"""Detection fanned out as Ray tasks gives exactly the scores of a single-process run."""

import dataclasses
import json

import pytest
from support import local_ray_cluster


@pytest.mark.slow
def test_ray_fan_out_merges_to_the_single_process_scores(embedded_model_path, tmp_path):
    from jobs.detect import run
    from retrieval_heads.detect import DetectConfig, detect

    config = DetectConfig(model=embedded_model_path, lengths=(400,), depths=(0.2, 0.6, 1.0), num_needles=1,
                          max_new_tokens=20)
    single = detect(config, tmp_path / "single")
    with local_ray_cluster():
        merged = run(dataclasses.replace(config, workers=2), tmp_path / "ray")
    assert merged.trials == single.trials
    assert merged.num_trials() > 0
    lines = (tmp_path / "ray" / "trials.jsonl").read_text().splitlines()
    assert [json.loads(l)["depth"] for l in lines] == [0.2, 0.6, 1.0]
