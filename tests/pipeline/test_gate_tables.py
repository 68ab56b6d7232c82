"""The gate tables without vLLM: each token of a flattened step is gated by its own request's mask.

vLLM hands ``o_proj`` one ``[num_tokens, width]`` tensor per step (every request's tokens in turn); these tests
call the projections the same way on a tiny random Llama and compare with the mask written out by hand.
"""

import pytest
import torch
from support import tiny_llama

from pipeline.gate_tables import fill_row, install_gates
from retrieval_heads.masking import channel_gate
from retrieval_heads.models import shape_of

MASKS = {1: [(0, 1), (1, 3)], 2: [(0, 0), (0, 2), (1, 1)]}  # slot -> heads


@pytest.fixture
def gated():
    model = tiny_llama()
    shape = shape_of(model.config)
    projections = install_gates(model, shape, 1, 0, torch.float32, "cpu", max_tokens=64)
    for slot, heads in MASKS.items():
        assert fill_row(projections, shape, 1, 0, slot, heads) == len(heads)
    return model, shape, projections


def _by_hand(x, layer, rows, shape):
    gates = {0: torch.ones(x.shape[1])} | {
        slot: channel_gate([h for l, h in heads if l == layer], shape.num_heads, shape.head_dim)
        for slot, heads in MASKS.items()}
    return torch.stack([x[t] * gates[r] for t, r in enumerate(rows)])


def test_each_token_reads_its_own_request_s_row(gated):
    model, shape, projections = gated
    slots = projections[0].retmask_slots
    requests, tokens = [0, 2, 1, 2], [3, 1, 4, 2]  # four requests in one step: plain, slot 2, slot 1, slot 2
    slots.fill(requests, tokens)
    rows = [r for r, n in zip(requests, tokens) for _ in range(n)]
    x = torch.randn(sum(tokens), shape.num_heads * shape.head_dim)
    for layer, proj in enumerate(projections):
        assert torch.equal(proj(x), torch.nn.functional.linear(_by_hand(x, layer, rows, shape), proj.weight))


def test_a_step_without_tagged_requests_reads_row_0_everywhere(gated):
    model, shape, projections = gated
    slots = projections[0].retmask_slots
    slots.fill([2, 1], [5, 5])
    slots.fill([0, 0, 0], [2, 2, 2])  # the next step: only plain requests
    assert not slots.mixed and slots.filled == 0 and not slots.index.any()
    x = torch.randn(6, shape.num_heads * shape.head_dim)
    assert torch.equal(projections[1](x), torch.nn.functional.linear(x, projections[1].weight))


def test_a_shorter_step_resets_the_rest_of_the_last_one_to_row_0(gated):
    _, _, projections = gated
    slots = projections[0].retmask_slots
    slots.fill([1], [10])
    slots.fill([2], [3])
    assert slots.index[:3].tolist() == [2, 2, 2] and not slots.index[3:].any() and slots.filled == 3


def test_row_0_is_the_engine_wide_gate_and_switches_the_eager_skip(gated):
    _, shape, projections = gated
    fill_row(projections, shape, 1, 0, 0, [(1, 2)])
    assert [p.retmask_active for p in projections] == [False, True]
    assert projections[1].retmask_gate.data_ptr() == projections[1].retmask_table[0].data_ptr()  # a view
    x = torch.randn(4, shape.num_heads * shape.head_dim)
    want = x * channel_gate([2], shape.num_heads, shape.head_dim)
    assert torch.equal(projections[1](x), torch.nn.functional.linear(want, projections[1].weight))
    fill_row(projections, shape, 1, 0, 0, [])
    assert not any(p.retmask_active for p in projections)
