"""RetMask ablation on Hugging Face models: masked heads contribute exactly zero, at every position."""

import pytest
import torch
from support import tiny_llama

from retrieval_heads.errors import RetmaskError
from retrieval_heads.masking import HeadMask, masked, output_projections, zero_heads_in_place
from retrieval_heads.models import shape_of


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[3, 17, 42, 5, 99, 12, 7, 64, 33, 2]])


def test_masked_head_contributes_nothing(tiny_model):
    shape = shape_of(tiny_model.config)
    mask = HeadMask.for_shape([(0, 1), (1, 3)], shape)
    seen = {}
    proj = output_projections(tiny_model)[1]
    hook = proj.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].clone()))
    with masked(tiny_model, mask):
        logits(tiny_model, IDS)
    hook.remove()
    head3 = seen["x"][..., 3 * shape.head_dim : 4 * shape.head_dim]
    assert torch.count_nonzero(head3) == 0  # every position, not just the last
    assert torch.count_nonzero(seen["x"][..., : 3 * shape.head_dim]) > 0


def test_runtime_gate_equals_zeroed_o_proj_columns(tiny_model):
    mask = HeadMask.for_shape([(0, 0), (1, 2)], shape_of(tiny_model.config))
    with masked(tiny_model, mask):
        gated = logits(tiny_model, IDS)
    static = tiny_llama()
    zero_heads_in_place(static, mask)
    assert torch.equal(gated, logits(static, IDS))


def test_ungating_restores_identical_logits(tiny_model):
    before = logits(tiny_model, IDS)
    with masked(tiny_model, HeadMask.for_shape([(1, 1)], shape_of(tiny_model.config))):
        during = logits(tiny_model, IDS)
    assert not torch.equal(before, during)
    assert torch.equal(before, logits(tiny_model, IDS))


def test_empty_mask_changes_nothing(tiny_model):
    before = logits(tiny_model, IDS)
    with masked(tiny_model, HeadMask.for_shape([], shape_of(tiny_model.config))):
        assert torch.equal(before, logits(tiny_model, IDS))


def test_gqa_masks_one_query_head_and_keeps_shared_kv(tiny_model):
    # heads 0 and 1 share KV head 0 (4 query heads, 2 KV heads): masking head 0 leaves head 1's output.
    shape = shape_of(tiny_model.config)
    assert shape.num_kv_heads == 2
    static = tiny_llama()
    zero_heads_in_place(static, HeadMask.for_shape([(0, 0)], shape))
    o_proj = output_projections(static)[0].weight
    assert torch.count_nonzero(o_proj[:, : shape.head_dim]) == 0
    assert torch.count_nonzero(o_proj[:, shape.head_dim : 2 * shape.head_dim]) > 0
    k_proj = static.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(k_proj, tiny_model.model.layers[0].self_attn.k_proj.weight)


def test_mask_spec_parses_and_has_a_stable_id(tiny_model):
    shape = shape_of(tiny_model.config)
    mask = HeadMask.parse("1-3, 0-1,1-3", shape)
    assert mask.heads == ((0, 1), (1, 3))
    assert mask.id == HeadMask.for_shape([(1, 3), (0, 1)], shape).id != HeadMask.for_shape([], shape).id


@pytest.mark.parametrize("spec", ["2-0", "0-4", "x-1", "1"])
def test_head_out_of_range_or_malformed_is_a_clear_error(tiny_model, spec):
    with pytest.raises(RetmaskError, match="out of range|layer-head"):
        HeadMask.parse(spec, shape_of(tiny_model.config))


def test_mask_for_another_model_shape_is_refused(tiny_model):
    other = HeadMask((((0, 0),)), num_layers=30, num_heads=9)
    with pytest.raises(RetmaskError, match="mask is for 30x9"):
        with masked(tiny_model, other):
            pass


def test_unsupported_architecture_names_what_is_supported():
    class NoLayers(torch.nn.Module):
        pass

    with pytest.raises(RetmaskError, match="supported"):
        output_projections(NoLayers())
