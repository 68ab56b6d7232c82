"""Resumable stage lists: what ``retmask demo`` and ``retmask study`` share.

Each stage writes a ``.<stage>.done`` marker with the settings it ran with. A rerun skips stages whose
marker matches; a stage whose settings changed starts over, and so does every stage after it. A stage
interrupted before its marker resumes where its own entry point can (generation, training).
``timings.json`` keeps each finished stage's wall time and peak memory, so a resumed run still reports
every stage.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any, Path], None]
    output: str | None  # directory under the run's out, cleared when the stage must start over
    fields: tuple[str, ...]  # the config fields it depends on


def stage_key(cfg: Any, stage: Stage) -> str:
    """What a stage's ``.done`` marker records: the settings it ran with."""
    return json.dumps({f: getattr(cfg, f) for f in stage.fields}, sort_keys=True)


class PeakMemory:
    """Peak resident memory of this process and all its children (Ray's raylet, actors, vLLM engines).

    Sums RSS over the process tree every ``interval`` seconds, an upper bound: pages shared between
    processes (libraries, Ray's object store) count once per process.
    """

    def __init__(self, interval: float = 0.5):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        me, total = psutil.Process(), 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, so the
    training stage's ~3 GB would stay resident next to the evaluation's engine)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_stages(stages: list[Stage], cfg: Any, out: Path) -> dict[str, dict]:
    """Run (or resume) every stage in order; returns the timings of every finished stage."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / "timings.json"
    timings = json.loads(record.read_text()) if record.exists() else {}
    start, upstream_changed = time.perf_counter(), False
    for i, stage in enumerate(stages, 1):
        marker, key = out / f".{stage.name}.done", stage_key(cfg, stage)
        done = marker.exists() and marker.read_text() == key
        if done and not upstream_changed:
            print(f"[{i}/{len(stages)}] {stage.name}: complete, skipped", file=sys.stderr)
            continue
        if (marker.exists() or upstream_changed) and stage.output:
            # finished before with other settings, or its inputs changed: start over (an unfinished
            # stage without a marker keeps its outputs, so generation and training resume)
            shutil.rmtree(out / stage.output, ignore_errors=True)
        marker.unlink(missing_ok=True)
        upstream_changed = True
        print(f"[{i}/{len(stages)}] {stage.name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        with PeakMemory() as memory:
            stage.run(cfg, out)
        release_memory()  # a finished stage's freed heap goes back to the OS before the next one starts
        timings[stage.name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(memory.peak / 2**30, 2),
        }
        record.write_text(json.dumps(timings, indent=2) + "\n")
        marker.write_text(key)
        print(
            f"[{i}/{len(stages)}] {stage.name}: done in {timings[stage.name]['seconds']:.0f} s, peak "
            f"{timings[stage.name]['peak_rss_gb']:.1f} GiB (total {time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    return timings
