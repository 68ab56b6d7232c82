"""Where the generation actors run: joining a Ray cluster, and each actor's resources and placement.

One actor per engine (``pipeline.actors``). On CPUs an actor reserves ``num_cpus_per_actor`` and engines
spread one per node; on GPUs an engine of ``tensor_parallel_size`` GPUs gets one STRICT_PACK placement
group, so all of its GPUs are on one node, and a size no node can hold is a one-line error, not a hang.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import ray

from retrieval_heads.errors import RetmaskError

if TYPE_CHECKING:
    from pipeline.generate import GenerateConfig

# How long an engine's placement group may wait for one node with its GPUs free before the run stops
# (a tensor-parallel size no node holds would otherwise wait forever); an autoscaler may need minutes.
PLACEMENT_SECONDS = float(os.environ.get("RETMASK_PLACEMENT_SECONDS", 600))


def connect(address: str | None, num_cpus: int) -> bool:
    """Join the cluster in ``address``/``RAY_ADDRESS`` (set inside ``ray job submit``), else start a local
    one; returns whether this call initialized Ray (and so should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address)
    else:
        # "local", not None: None would silently join any cluster a `ray start` left on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    # ray.init replaces the SIGTERM handler twice (Python: sys.exit(15); its C++ failure handler: abort, exit
    # -6), so a scheduler's SIGTERM would skip the writer's cleanup and the run contract's exit 143: put back
    # the handler the entry point installed (retrieval_heads.errors.run_cli).
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


def actor_options(config: GenerateConfig, index: int, groups: dict[int, Any], use_gpu: bool) -> dict[str, Any]:
    """Ray options of generation actor ``index`` (``remote.options(**...)``), placing it as its engine needs.

    Tensor parallel on GPUs: one STRICT_PACK placement group per engine, so all of an engine's GPUs are on
    one node (its shards talk over NVLink, not the network); ``groups`` keeps them by actor index so a
    replaced actor's GPUs are freed first. The group is waited for here, up to ``PLACEMENT_SECONDS``: a
    size no node can hold is a one-line error naming what was asked and what the cluster has, not a hang.
    """
    options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}  # the pool replaces failed actors
    if not use_gpu:
        options["num_cpus"] = config.num_cpus_per_actor
        # One engine per node before a second on any: a CPU engine wants a node's cores and memory
        # bandwidth, and Ray's default would pack the pool onto the driver's node. One node: no change.
        options["scheduling_strategy"] = "SPREAD"
        if config.cpu_bind:
            bind = config.cpu_bind[index % len(config.cpu_bind)]
            options["runtime_env"] = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": bind}}
    elif config.tensor_parallel_size == 1:
        options["num_gpus"] = 1
    else:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if index in groups:  # a replaced actor's GPUs go back before its successor asks for them
            remove_placement_group(groups.pop(index))
        bundle = {"GPU": 1, "CPU": 1}
        pg = placement_group([bundle] * config.tensor_parallel_size, strategy="STRICT_PACK")
        if not pg.wait(PLACEMENT_SECONDS):
            remove_placement_group(pg)
            raise RetmaskError(_unplaceable(config.tensor_parallel_size, bundle, index))
        groups[index] = pg
        options.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True))
    return options


def _unplaceable(tp: int, bundle: dict[str, float], index: int) -> str:
    """Why engine ``index`` found no node: what one engine asks for, each node's resources, what is free."""

    def amounts(resources: dict) -> str:
        return ", ".join(f"{key} {resources.get(key, 0):g}" for key in bundle)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    listed = "; ".join(f"node {n['NodeID'][:8]} ({n.get('NodeManagerAddress')}): {amounts(n.get('Resources', {}))}"
                       for n in nodes[:8]) + (f"; {len(nodes) - 8} more" if len(nodes) > 8 else "")
    asked = ", ".join(f"{key} {value * tp:g}" for key, value in bundle.items())
    return (f"cannot place engine {index} of tensor_parallel_size={tp}: it needs {asked} on one node, and none had "
            f"them free within {PLACEMENT_SECONDS:g} s (nodes: {listed or 'none'}; free in the cluster now: "
            f"{amounts(ray.available_resources())}); lower tensor_parallel_size or num_actors, or add nodes with "
            f"{tp} GPUs each")
