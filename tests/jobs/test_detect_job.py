"""Detection fanned out as Ray tasks gives exactly the scores of a single-process run."""

import json

import pytest


@pytest.mark.slow
def test_ray_fan_out_merges_to_the_single_process_scores(embedded_model_path, tmp_path):
    import ray

    from jobs.detect_job import detect_distributed
    from retrieval_heads.detect import DetectConfig, detect

    config = DetectConfig(model=embedded_model_path, lengths=(400,), depths=(0.2, 0.6, 1.0), num_needles=1, max_new_tokens=20)
    single = detect(config, tmp_path / "single")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        merged = detect_distributed(config, tmp_path / "ray", workers=2)
    finally:
        ray.shutdown()
    assert merged.trials == single.trials
    assert merged.num_trials() > 0
    lines = (tmp_path / "ray" / "trials.jsonl").read_text().splitlines()
    assert [json.loads(l)["depth"] for l in lines] == [0.2, 0.6, 1.0]
