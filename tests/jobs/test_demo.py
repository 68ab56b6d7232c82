"""`retmask demo` bookkeeping: skip finished stages, start over when settings change, resume when interrupted.

The stages here are small recorders (pure bookkeeping); the real stages are each tested through their own
entry point elsewhere.
"""

from __future__ import annotations

import json

import pytest

from jobs import demo
from jobs.demo import DemoConfig, run_demo
from jobs.report import verdict
from jobs.stages import PeakMemory, Stage


@pytest.fixture
def recorder(monkeypatch):
    calls: list[str] = []

    def make(name, output):
        def run(cfg, out):
            calls.append(name)
            (out / output).mkdir(exist_ok=True)
            (out / output / "runs.txt").open("a").write(f"{cfg.num_prompts}\n")
            if getattr(cfg, "fail_at", None) == name:
                raise RuntimeError("interrupted")
        return run

    stages = [Stage("first", make("first", "a"), "a", ("detect_needles",)),
              Stage("second", make("second", "b"), "b", ("num_prompts",)),
              Stage("third", make("third", "c"), "c", ())]
    monkeypatch.setattr(demo, "STAGES", stages)
    return calls


def test_a_rerun_skips_every_finished_stage_and_still_reports_all_of_them(recorder, tmp_path):
    cfg = DemoConfig(out=str(tmp_path))
    report = run_demo(cfg)
    assert recorder == ["first", "second", "third"]
    run_demo(cfg)
    assert recorder == ["first", "second", "third"]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert list(timings) == ["first", "second", "third"]
    assert all(t["seconds"] >= 0 and t["peak_rss_gb"] > 0 for t in timings.values())
    assert "| second |" in report.read_text()


def test_changed_settings_restart_that_stage_and_everything_after_it(recorder, tmp_path):
    run_demo(DemoConfig(out=str(tmp_path), num_prompts=10))
    run_demo(DemoConfig(out=str(tmp_path), num_prompts=20))
    assert recorder == ["first", "second", "third", "second", "third"]
    # started over: the old outputs are gone, not mixed with the new ones
    assert (tmp_path / "b" / "runs.txt").read_text() == "20\n"
    assert (tmp_path / "c" / "runs.txt").read_text() == "20\n"
    assert (tmp_path / "a" / "runs.txt").read_text() == "10\n"


def test_an_interrupted_stage_keeps_its_outputs_and_runs_again(recorder, tmp_path):
    cfg = DemoConfig(out=str(tmp_path), num_prompts=10)
    cfg.fail_at = "second"
    with pytest.raises(RuntimeError):
        run_demo(cfg)
    assert not (tmp_path / ".second.done").exists()
    cfg.fail_at = None
    run_demo(cfg)
    assert recorder == ["first", "second", "second", "third"]
    assert (tmp_path / "b" / "runs.txt").read_text() == "10\n10\n"  # resumed in place, not cleared


def test_peak_memory_sees_child_processes():
    import subprocess
    import sys
    import time

    with PeakMemory(interval=0.05) as alone:
        time.sleep(0.3)
    grow = "import time; x = bytearray(400 * 2**20); time.sleep(1.5)"
    with PeakMemory(interval=0.05) as with_child:
        subprocess.run([sys.executable, "-c", grow], check=True)
    assert with_child.peak - alone.peak > 350 * 2**20


def test_the_report_never_calls_an_interval_through_zero_a_gain():
    paired = {"vs": "base", "overall": {"mean": 0.03, "ci": [-0.02, 0.08]}}
    assert "no difference distinguishable from noise" in verdict(paired, "retmask")
    assert "+3.0 points" in verdict(paired, "retmask")
    assert "scores higher" in verdict({"vs": "base", "overall": {"mean": 0.05, "ci": [0.01, 0.09]}}, "retmask")
    assert "scores lower" in verdict({"vs": "base", "overall": {"mean": -0.05, "ci": [-0.09, -0.01]}}, "retmask")


def test_the_demo_report_points_to_the_powered_study_and_quotes_its_result(tmp_path, monkeypatch):
    from jobs import report

    monkeypatch.setattr(report, "STUDY_RESULTS", tmp_path / "RESULTS.md")
    assert "docs/STUDY.md" in report._study()[0] and "not been run" in report._study()[0]
    (tmp_path / "RESULTS.md").write_text("# x\n\nPrimary outcome (null): RetMask minus control, +0.4 points.\n")
    quoted = report._study()[0]
    assert quoted.endswith("Primary outcome (null): RetMask minus control, +0.4 points. Tables, head maps and run "
                           "notes: docs/RESULTS.md.")
