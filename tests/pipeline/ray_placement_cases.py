"""Run by tests/pipeline/test_ray_placement.py in a fresh process (see there why).

Where tensor-parallel engines land on a cluster of several nodes, through the options the run uses.

``pipeline.cluster.actor_options`` gives each engine of ``tensor_parallel_size > 1`` a STRICT_PACK
placement group: all of its GPUs on one node. Ray schedules declared GPUs as plain resources, so a
loopback cluster of ``ray start --num-gpus=3`` nodes on this CPU machine shows where engines would land,
with stub actors (no engine, no model). Two nodes of 3 GPUs make splitting visible: a second TP=2 engine
fits only on the other node, and a third fits nowhere whole (one GPU free on each node), so it must be a
one-line error, never two halves of one engine on two nodes, and never a hang.
"""

import time

import pytest
import ray
from support import LoopbackCluster

from pipeline.actors import ActorPool
from pipeline.cluster import actor_options
from pipeline.generate import GenerateConfig
from retrieval_heads.errors import RetmaskError

GPUS_PER_NODE = 3


class GpuCluster(LoopbackCluster):
    """LoopbackCluster (nodes declare GPUs through ``add_node(num_gpus=...)``), torn down by pid as there.

    Token auth off (``ray start --head`` turns it on by default): this pytest process is the driver, and
    Ray fixes its auth mode when first imported; the nodes listen on 127.0.0.1 only.
    """

    def __init__(self, tmp):
        super().__init__(tmp)
        self.env["RAY_AUTH_MODE"] = "disabled"


def _stub_engine() -> type:
    """A stand-in for ``GenerationActor`` that reports where it runs and loads nothing; made in a function
    so that Ray ships the class by value (Ray's workers cannot import this test module)."""

    class StubEngine:
        def __init__(self, index: int):
            self.index = index

        def info(self) -> dict:
            import os

            return {"index": self.index, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

        def close(self) -> None:
            pass

    return StubEngine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes of 3 declared GPUs and 3 CPUs each, and this process connected as the driver."""
    gpus = GpuCluster(tmp_path_factory.mktemp("placement"))
    try:
        for _ in range(2):
            gpus.add_node(num_cpus=GPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        ray.init(address=gpus.address, logging_level="ERROR", log_to_driver=False)
        deadline = time.time() + 60
        while ray.cluster_resources().get("GPU", 0) < 2 * GPUS_PER_NODE:
            assert time.time() < deadline, f"the nodes did not join: {ray.cluster_resources()}"
            time.sleep(0.5)
        yield gpus
    finally:
        ray.shutdown()
        gpus.shutdown()


@pytest.fixture
def groups(cluster):
    """Placement groups made in a test, removed after it (the next test starts with every GPU free)."""
    from ray.util.placement_group import remove_placement_group

    made: dict[int, object] = {}
    yield made
    for pg in made.values():
        remove_placement_group(pg)


def _pool(config: GenerateConfig, groups: dict) -> ActorPool:
    remote = ray.remote(_stub_engine())
    return ActorPool(lambda i: remote.options(**actor_options(config, i, groups, True)).remote(i),
                     config.num_actors, per_actor=1, max_retries=0)


def test_each_tensor_parallel_engine_gets_all_its_gpus_on_one_node_and_engines_go_to_different_nodes(groups):
    from ray.util.placement_group import placement_group_table

    config = GenerateConfig(num_actors=2, tensor_parallel_size=2)
    pool = _pool(config, groups)
    try:
        actors = {i["index"]: i["node"] for i in pool.wait_ready()}
    finally:
        pool.close(graceful=False)
    bundles = {i: placement_group_table(pg)["bundles_to_node_id"] for i, pg in groups.items()}
    assert sorted(bundles) == [0, 1] and all(len(b) == 2 for b in bundles.values()), bundles
    for index, node in actors.items():
        assert set(bundles[index].values()) == {node}, f"engine {index} is split: {bundles[index]}, actor on {node}"
    assert actors[0] != actors[1], "2 + 2 GPUs cannot share a 3-GPU node: the engines must be on both nodes"


def test_an_engine_no_node_can_hold_whole_is_a_one_line_error_not_a_hang_nor_a_split(groups, monkeypatch):
    monkeypatch.setattr("pipeline.cluster.PLACEMENT_SECONDS", 3.0)
    two = GenerateConfig(num_actors=2, tensor_parallel_size=2)
    for index in range(2):  # one GPU stays free on each node
        actor_options(two, index, groups, True)
    start = time.time()
    with pytest.raises(RetmaskError) as third:  # 2 GPUs free in the cluster, but not on one node
        actor_options(two, 2, groups, True)
    assert time.time() - start < 30
    message = str(third.value)
    assert "\n" not in message
    assert "tensor_parallel_size=2: it needs GPU 2, CPU 2 on one node" in message
    assert message.count(f"GPU {GPUS_PER_NODE}, CPU {GPUS_PER_NODE}") == 2  # each node's resources are named
    assert "free in the cluster now: GPU 2, CPU 2" in message and "lower tensor_parallel_size" in message
    assert 2 not in groups

    with pytest.raises(RetmaskError, match=r"tensor_parallel_size=4: it needs GPU 4, CPU 4 on one node"):
        actor_options(GenerateConfig(tensor_parallel_size=4), 3, groups, True)  # larger than any node
    assert sorted(groups) == [0, 1]
    assert ray.available_resources().get("GPU") == 2  # the refused groups hold nothing
