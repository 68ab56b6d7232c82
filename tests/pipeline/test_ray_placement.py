"""Placement of tensor-parallel engines on a multi-node cluster (the cases in ray_placement_cases.py).

The cases connect this process to a loopback cluster whose nodes run without token auth. Ray fixes a
process's auth mode the first time it starts (earlier tests start local clusters, which turn token auth
on and leave RAY_AUTH_MODE=token in the environment), so the cases run in a fresh pytest process started
with the nodes' mode, which also keeps their cluster apart from the rest.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_tensor_parallel_engines_are_placed_whole_on_one_node_or_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", str(HERE / "ray_placement_cases.py"), "-q",
                             "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'cases'}"],
                            capture_output=True, text=True, timeout=600, cwd=HERE.parents[1],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})  # the nodes' mode, from the start
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
