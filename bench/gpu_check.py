"""CUDA checks of the torch, transformers and TRL parts no CPU test can reach, in one short run.

The test suite runs on CPUs; three things there only hold on paper for a GPU:

A. the per-request head gate (``pipeline.gate_tables``) under CUDA graphs and ``torch.compile``: the gate table
   and the per-token slot index are read through fixed addresses, so a graph captured (or compiled) once must see
   a new index and a refilled table row at every replay, without recompiling. Checked on a tiny random Llama
   whose ``o_proj`` is called the way vLLM calls it (tokens flattened to ``[num_tokens, width]``), against the
   same math written directly and against ``retrieval_heads.masking.masked`` on each sequence alone;
B. DPO steps of ``trainer.dpo.train`` (TRL) on CUDA: bf16 autocast, fp32, the paper preset's gradient
   checkpointing; finite, falling losses, step time, peak memory, checkpoint save, reload and resume;
C. retrieval-head detection (``retrieval_heads.detect``) on CUDA against the CPU, same inputs: equal scores.

Each check is independent: a failure is recorded (with its exception) and the next one runs. Results go to
``$OUT/gpu_check.json`` (rewritten after every check, so a killed run still leaves what it measured) and
``$OUT/gpu_check.log``. On the device machine ``bench/gpu_check.sh`` installs the carried wheels and runs this;
a CPU dry run (CUDA parts recorded as skipped)::

    OUT=/tmp/gpu_dry .venv/bin/python bench/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the product, and tests/support.py (tiny model, pair shards)

T0 = time.perf_counter()
RESULTS: dict = {"meta": {}, "checks": {}}
OUT = Path(os.environ.get("OUT") or "gpu_out")
SKIP_NO_CUDA = "skipped: no CUDA"


def say(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    with open(OUT / "gpu_check.log", "a") as f:
        f.write(line + "\n")


def dump() -> None:
    RESULTS["meta"]["elapsed_s"] = round(time.perf_counter() - T0, 1)
    tmp = OUT / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    tmp.replace(OUT / "gpu_check.json")


class Budget:
    """Wall-clock budget: a check that would not fit is recorded as skipped instead of being started."""

    def __init__(self, seconds: float):
        self.deadline = T0 + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def run_check(name: str, fn, *args, needs_s: float = 0.0, budget: Budget | None = None, cuda_only: bool = False,
              **kwargs) -> dict:
    """Run one check; its dict (``ok``, numbers) or the exception is recorded under ``name``."""
    if cuda_only and RESULTS["meta"].get("device") != "cuda":
        rec = {"status": SKIP_NO_CUDA}
    elif budget is not None and budget.left() < needs_s:
        rec = {"status": f"skipped: time budget ({budget.left():.0f} s left, needs ~{needs_s:.0f} s)"}
    else:
        say(f"{name} ...")
        start = time.perf_counter()
        try:
            rec = fn(*args, **kwargs)
            if "status" not in rec:
                rec["status"] = "pass" if rec.get("ok") else "fail"
        except Exception as exc:  # a broken check must not stop the others
            rec = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        rec["seconds"] = round(time.perf_counter() - start, 2)
    RESULTS["checks"][name] = rec
    say(f"{name}: {rec['status']}" + (f" ({rec['error'].splitlines()[0][:300]})" if "error" in rec else ""))
    dump()
    return rec


def versions() -> dict:
    from importlib import metadata


    out = {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers", "pyarrow",
                 "pandas", "fsspec", "huggingface-hub", "dill", "multiprocess", "nltk", "rouge-score", "triton",
                 "safetensors", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}"}
    return out


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------------
# A. the per-request head gate under eager, CUDA graphs and torch.compile

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 4, 2, 32, 512
BATCH, SEQ = 4, 16  # 4 requests of 16 tokens: 64 tokens in one flattened step
# mask table rows (row 0 is the engine-wide gate); every row masks heads in several layers
MASKS = {1: [(0, 1), (1, 0), (2, 3), (3, 2)], 2: [(0, 0), (0, 2), (1, 1), (3, 3)], 3: [(1, 2), (2, 0), (2, 1)]}
REFILL = (1, [(0, 3), (1, 3), (3, 0), (3, 1)])  # row 1 refilled in place between capture and replay
ROWS_BEFORE, ROWS_AFTER = [0, 1, 2, 1], [2, 3, 1, 0]  # each request's row, before and after the change


class FlatTokens(torch.nn.Module):
    """``o_proj`` called as vLLM calls it: tokens flattened to ``[num_tokens, width]``.

    HF passes ``[batch, seq, width]``, but the gate hook slices ``index[: x.shape[0]]``: it expects vLLM's flat
    token stream. So the real ``o_proj`` (with its gate hook) sits inside this module, which flattens around it.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    @staticmethod
    def wrap(model) -> None:
        from retrieval_heads.masking import decoder_layers

        for layer in decoder_layers(model):
            layer.self_attn.o_proj = FlatTokens(layer.self_attn.o_proj)


class GateRig:
    """One random model three ways: plain, gated (``install_gates``), and a flat reference with its own gates."""

    def __init__(self, dtype, device):
        from support import tiny_llama

        from pipeline.gate_tables import install_gates
        from retrieval_heads.masking import output_projections
        from retrieval_heads.models import shape_of

        self.dtype, self.device = dtype, device
        plain = tiny_llama(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                           vocab_size=VOCAB, seed=0)
        plain.set_attn_implementation("eager")  # plain torch ops: nothing in attention stops a graph capture
        self.plain = plain.to(device=device, dtype=dtype)
        self.shape = shape_of(self.plain.config)
        self.gated = copy.deepcopy(self.plain)
        self.projections = install_gates(self.gated, self.shape, 1, 0, dtype, device, 4096)
        FlatTokens.wrap(self.gated)
        self.ref = copy.deepcopy(self.plain)
        self.ref_projections = output_projections(self.ref)
        for proj in self.ref_projections:
            proj.token_gate = None
            proj.register_forward_pre_hook(lambda m, a: (a[0] * m.token_gate,) if m.token_gate is not None else None)
        FlatTokens.wrap(self.ref)
        self.slots = self.projections[0].retmask_slots
        self.index = self.projections[0].retmask_index
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen).to(device)
        self.rows: dict[int, list] = {0: []}

    def fill(self, row: int, heads: list) -> None:
        from pipeline.gate_tables import fill_row

        fill_row(self.projections, self.shape, 1, 0, row, heads)  # row 0 also sets the eager skip flags
        self.rows[row] = list(heads)

    def route(self, rows: list[int], n_tokens: int = SEQ) -> None:
        """Request ``b`` reads table row ``rows[b]``: the slot index filled as before a vLLM step (in place, from
        pinned host memory without blocking on a GPU)."""
        self.slots.fill(rows, [n_tokens] * len(rows))
        self.current = list(rows)

    def expected(self, n_tokens: int = SEQ):
        """Logits with the same per-token gates applied by the reference hook (``channel_gate`` per request)."""
        from retrieval_heads.masking import channel_gate

        for layer, proj in enumerate(self.ref_projections):
            per_request = [channel_gate([h for l, h in self.rows[r] if l == layer], HEADS, HEAD_DIM,
                                        dtype=self.dtype, device=self.device) for r in self.current]
            proj.token_gate = torch.stack(per_request).repeat_interleave(n_tokens, dim=0)
        with torch.no_grad():
            return self.ref(self.ids, use_cache=False).logits

    def gated_logits(self, model=None):
        with torch.no_grad():
            return (self.gated if model is None else model)(self.ids, use_cache=False).logits


def setup_rig(dtype, device) -> GateRig:
    rig = GateRig(dtype, device)
    for row, heads in MASKS.items():
        rig.fill(row, heads)
    rig.route(ROWS_BEFORE)
    return rig


def check_eager(dtype, device) -> dict:
    """Eager gather == the same gates applied directly (bitwise), == masked() per sequence (tolerance)."""
    from retrieval_heads.masking import HeadMask, masked

    rig = setup_rig(dtype, device)
    got = rig.gated_logits()
    want = rig.expected()
    per_seq = []
    with torch.no_grad():
        for b, row in enumerate(ROWS_BEFORE):
            with masked(rig.plain, HeadMask.for_shape(rig.rows[row], rig.shape)):
                per_seq.append(rig.plain(rig.ids[b : b + 1], use_cache=False).logits)
        plain = rig.plain(rig.ids, use_cache=False).logits
    per_seq = torch.cat(per_seq)
    rig.route([0] * BATCH)  # no mask anywhere: the eager hook must leave the model untouched
    untouched = rig.gated_logits()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    rec = {"max_diff_vs_direct": max_diff(got, want), "max_diff_vs_masked_per_sequence": max_diff(got, per_seq),
           "max_diff_unmasked_vs_plain": max_diff(untouched, plain), "mask_effect": max_diff(want, plain),
           "tolerance_per_sequence": tol}
    rec["bitwise_vs_direct"] = rec["max_diff_vs_direct"] == 0.0
    rec["bitwise_vs_masked_per_sequence"] = rec["max_diff_vs_masked_per_sequence"] == 0.0
    rec["ok"] = (rec["bitwise_vs_direct"] and rec["max_diff_vs_masked_per_sequence"] <= tol
                 and rec["max_diff_unmasked_vs_plain"] <= tol and rec["mask_effect"] > 10 * tol)
    return rec


def _capture(torch, fn):
    """``fn()`` captured in a CUDA graph after a side-stream warm-up; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fn()
    return graph, out


def _change(rig: GateRig) -> None:
    rig.fill(*REFILL)
    rig.route(ROWS_AFTER)


def check_graph_module(dtype, device) -> dict:
    """One gated ``o_proj`` in a CUDA graph: replay after a new index and a refilled row reads the new contents."""
    rig = setup_rig(dtype, device)
    proj = rig.projections[1]
    x = torch.randn(BATCH * SEQ, HEADS * HEAD_DIM, device=device, dtype=dtype)
    graph, out = _capture(torch, lambda: proj(x))
    graph.replay()
    before = out.clone()
    _change(rig)
    graph.replay()
    after = out.clone()
    with torch.no_grad():
        eager = proj(x)
        direct = torch.nn.functional.linear(x * proj.retmask_table[rig.index[: x.shape[0]]], proj.weight, proj.bias)
    rec = {"max_diff_replay_vs_eager": max_diff(after, eager), "max_diff_replay_vs_direct": max_diff(after, direct),
           "change": max_diff(after, before)}
    rec["bitwise"] = rec["max_diff_replay_vs_eager"] == 0.0
    rec["ok"] = rec["bitwise"] and rec["change"] > 0
    return rec


def check_graph_model(dtype, device) -> dict:
    """The whole model in a CUDA graph (per-request gather captured): replay after the change == eager after it.

    Also the engine-wide path: a graph captured without per-request masks (``mixed`` False, row 0 active) sees
    row 0 refilled in place, as ``retmask_set_heads`` does. Only within the layers that had masked heads at capture:
    eager hooks skip the multiply elsewhere, and a plain capture freezes that choice (vLLM captures graphs of traced
    code only, which always gathers; ``check_compile`` covers that)."""
    rig = setup_rig(dtype, device)
    graph, out = _capture(torch, lambda: rig.gated(rig.ids, use_cache=False).logits)
    graph.replay()
    before = out.clone()
    eager_before = rig.gated_logits()
    _change(rig)
    graph.replay()
    after = out.clone()
    eager_after, want_after = rig.gated_logits(), rig.expected()
    rec = {"max_diff_capture_vs_eager_before": max_diff(before, eager_before),
           "max_diff_replay_vs_eager_after": max_diff(after, eager_after),
           "max_diff_replay_vs_direct_after": max_diff(after, want_after), "change": max_diff(after, before)}
    rec["bitwise"] = rec["max_diff_replay_vs_eager_after"] == 0.0

    rig.fill(0, [(0, 2), (2, 2)])  # engine-wide mask, no per-request masks
    rig.route([0] * BATCH)
    graph0, out0 = _capture(torch, lambda: rig.gated(rig.ids, use_cache=False).logits)
    graph0.replay()
    row0_before = out0.clone()
    rig.fill(0, [(0, 1), (2, 3), (2, 0)])  # the same layers as at capture (see above)
    graph0.replay()
    row0_after = out0.clone()
    rec["row0_max_diff_replay_vs_eager"] = max_diff(row0_after, rig.gated_logits())
    rec["row0_max_diff_replay_vs_direct"] = max_diff(row0_after, rig.expected())
    rec["row0_change"] = max_diff(row0_after, row0_before)
    rec["row0_bitwise"] = rec["row0_max_diff_replay_vs_eager"] == 0.0
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # vs the reference model: other code, same shapes
    rec["ok"] = (rec["bitwise"] and rec["row0_bitwise"] and rec["change"] > 0 and rec["row0_change"] > 0
                 and max(rec["max_diff_replay_vs_direct_after"], rec["row0_max_diff_replay_vs_direct"]) <= tol)
    return rec


def check_compile(dtype, device, mode: str | None) -> dict:
    """``torch.compile`` (inductor; ``aot_eager`` on CPU) then a new index and a refilled row: no recompile, and the
    compiled output moves to the eager output with the new contents (not the stale one)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend = "inductor" if device == "cuda" else "aot_eager"  # inductor on 2 shared CPU cores takes minutes
    rig = setup_rig(dtype, device)
    compiled = torch.compile(rig.gated, backend=backend, mode=mode) if backend == "inductor" \
        else torch.compile(rig.gated, backend=backend)

    def call():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return rig.gated_logits(compiled).clone()

    start = time.perf_counter()
    first = call()
    compile_s = time.perf_counter() - start
    for _ in range(2):  # reduce-overhead records its CUDA graph on a later call; replays from then on
        first = call()
    graphs_before = counters["stats"]["unique_graphs"]
    eager_before = rig.gated_logits()
    _change(rig)
    with torch._dynamo.config.patch(error_on_recompile=True):
        after = call()
        after2 = call()
    eager_after = rig.gated_logits()
    rec = {"backend": backend, "mode": mode or "default", "compile_s": round(compile_s, 2),
           "unique_graphs": graphs_before,
           "new_graphs_after_change": counters["stats"]["unique_graphs"] - graphs_before,
           "max_diff_compiled_vs_eager_before": max_diff(first, eager_before),
           "max_diff_compiled_vs_eager_after": max_diff(after, eager_after),
           "max_diff_second_call_after": max_diff(after2, eager_after),
           "max_diff_compiled_after_vs_stale_eager": max_diff(after, eager_before),
           "change": max_diff(eager_after, eager_before)}
    rec["bitwise"] = rec["max_diff_compiled_vs_eager_after"] == 0.0
    # cudagraph skips show up here: reduce-overhead silently runs without a CUDA graph when it skips one
    rec["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k or "graph" in k}
    worst = max(rec["max_diff_compiled_vs_eager_after"], rec["max_diff_second_call_after"],
                rec["max_diff_compiled_vs_eager_before"])
    rec["ok"] = rec["new_graphs_after_change"] == 0 and worst < 0.05 * rec["change"]
    return rec


# ---------------------------------------------------------------------------------------------------
# B. DPO steps with TRL (trainer.dpo.train) on the accelerator


def build_tiny_checkpoint(path: Path, tokenizer_dir: Path, *, copy_model: bool = False) -> str:
    """A 4-layer random Llama saved with the embedded SmolLM2 tokenizer (vocab 49152).

    ``copy_model``: tie the embeddings and scale them up, so the residual stream is dominated by the token and the
    model keeps repeating the prompt's last token: copy events (nonzero retrieval scores) without trained weights.
    """
    from support import tiny_llama
    from transformers import AutoTokenizer

    model = tiny_llama(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       vocab_size=49152, seed=0)
    model.config.pad_token_id = 2
    model.config.max_position_embeddings = 2048  # default RoPE: no buffer depends on it; NIAH prompts need > 512
    if copy_model:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(10.0)
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


class DpoFixture:
    """The tiny checkpoint and 48 crafted pairs recorded as its own samples (so training it is on-policy)."""

    def __init__(self, work: Path, tokenizer_dir: Path):
        from support import crafted_rows, write_shards

        self.checkpoint = build_tiny_checkpoint(work / "tiny-dpo", tokenizer_dir)
        self.pairs = write_shards(work / "pairs", crafted_rows(48), model=self.checkpoint)
        self.work = work

    @classmethod
    def build(cls, work: Path, tokenizer_dir: Path) -> dict:
        return {"ok": True, "fixture": cls(work, tokenizer_dir)}


def check_dpo(fix: DpoFixture, name: str, preset: str, steps: int, resume: bool = False, **overrides) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    from trainer.config import TrainConfig
    from trainer.dpo import train

    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    out = fix.work / name
    base = dict(pairs=str(fix.pairs), output_dir=str(out), model=fix.checkpoint, max_length=128,
                per_device_batch_size=2, pairs_per_step=2, eval_batch_size=8, eval_fraction=0.1,
                save_steps=steps, warmup_ratio=0.0, max_steps=steps)
    config = TrainConfig.from_preset(preset, **{**base, **overrides})
    timer = StepTimer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    final = train(config, callbacks=[timer])
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [r["loss"] for r in metrics["train"] if "loss" in r]
    rec = {"preset": preset, "overrides": overrides, "steps": metrics["global_step"], "train_loss": losses,
           "eval_start": metrics["eval_start"], "eval_end": metrics["eval_end"],
           "train_runtime_s": metrics["train_runtime_s"], "step_s": [round(t, 4) for t in timer.times],
           "step_s_median_after_first": round(sorted(timer.times[1:])[len(timer.times[1:]) // 2], 4)
           if len(timer.times) > 1 else None,
           "peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
           "device": "cuda" if cuda else "cpu"}
    rec["finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    start, end = (metrics["eval_start"] or {}).get("loss"), (metrics["eval_end"] or {}).get("loss")
    rec["eval_loss_decreased"] = start is not None and end is not None and end < start
    third = max(1, len(losses) // 3)
    rec["train_loss_first_third_mean"] = sum(losses[:third]) / third if losses else None
    rec["train_loss_last_third_mean"] = sum(losses[-third:]) / third if losses else None

    # the saved model reloads, equals the last checkpoint's weights, moved away from the start, and runs here
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    saved = load_file(str(out / f"checkpoint-{steps}" / "model.safetensors"))
    initial = load_file(str(Path(fix.checkpoint) / "model.safetensors"))
    state = reloaded.state_dict()
    rec["reload_equals_last_checkpoint"] = all(torch.equal(state[k], v) for k, v in saved.items() if k in state)
    rec["weights_moved"] = any(not torch.equal(state[k], v) for k, v in initial.items() if k in state)
    device = "cuda" if cuda else "cpu"
    with torch.no_grad():
        logits = reloaded.to(device)(torch.tensor([[1, 2, 3, 4]], device=device)).logits
    rec["reloaded_logits_finite"] = bool(torch.isfinite(logits).all())
    ok = all(rec[k] for k in ("finite", "eval_loss_decreased", "reload_equals_last_checkpoint", "weights_moved",
                              "reloaded_logits_finite"))
    if resume:  # a rerun with more steps resumes from the checkpoint (optimizer state back onto the device)
        config2 = TrainConfig.from_preset(preset, **{**base, **overrides, "max_steps": steps + 2})
        train(config2)
        again = json.loads((out / "metrics.json").read_text())
        rec["resume"] = {"resumed_from": again["resumed_from"], "global_step": again["global_step"],
                         "steps_logged": [r["step"] for r in again["train"]]}
        ok = ok and again["resumed_from"] == f"checkpoint-{steps}" and again["global_step"] == steps + 2
    rec["ok"] = ok
    return rec


# ---------------------------------------------------------------------------------------------------
# C. head detection on the accelerator vs the CPU


def detection_on(device: str, checkpoint: str, dtype: str = "float32") -> dict:
    """Scores of a copy-rich synthetic prompt (fast scorer and full-attention reference) and of a small NIAH grid."""
    import types

    from retrieval_heads.detect import (
        DetectConfig,
        eos_ids,
        greedy_decode_scored,
        load_model,
        reference_scores,
        run_trials,
    )

    model, tokenizer = load_model(checkpoint, dtype, device)
    gen = torch.Generator().manual_seed(1)
    alphabet = [100, 200, 300, 400]
    ids = [alphabet[i] for i in torch.randint(0, len(alphabet), (600,), generator=gen).tolist()]
    prompt = types.SimpleNamespace(input_ids=ids, answer_span=(0, len(ids)))  # every prompt token is "needle"
    generated, fast = greedy_decode_scored(model, prompt, 24, eos_ids(model, tokenizer))
    reference = reference_scores(model, ids, generated, prompt.answer_span)
    out = {"synthetic": {"generated": generated, "fast": as_dict(fast.cpu()), "reference": as_dict(reference)},
           "fast_vs_reference_max_diff": max_diff(fast.cpu(), reference)}
    if dtype == "float32":
        config = DetectConfig(model=checkpoint, lengths=(500,), depths=(0.0, 0.5, 1.0), num_needles=1,
                              max_new_tokens=16, device=device)
        records, _ = run_trials(config, progress=False)
        out["niah"] = [{"depth": r.depth, "generated": r.generated_ids, "scores": r.head_scores, "counted": r.counted,
                        "span": list(r.answer_span), "prompt_tokens": len(r.prompt_ids)} for r in records]
    return out


def as_dict(totals) -> dict:
    """Nonzero (layer, head) scores as ``run_trial`` records them."""
    return {f"{int(l)}-{int(h)}": float(totals[l, h]) for l, h in zip(*totals.nonzero(as_tuple=True))}


def differing(a: dict, b: dict) -> dict:
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_detect(work: Path, tokenizer_dir: Path, device: str) -> dict:
    """The same checkpoint and inputs on the CPU and on CUDA (fp32): equal generations and equal scores."""
    checkpoint = build_tiny_checkpoint(work / "tiny-detect", tokenizer_dir, copy_model=True)
    cpu = detection_on("cpu", checkpoint)
    rec = {"cpu_nonzero_heads": len(cpu["synthetic"]["fast"]),
           "cpu_fast_vs_reference_max_diff": cpu["fast_vs_reference_max_diff"],
           "cpu_niah_generated": [r["generated"] for r in cpu["niah"]]}
    if device != "cuda":
        rec["cuda"] = SKIP_NO_CUDA
        rec["ok"] = rec["cpu_nonzero_heads"] > 0 and rec["cpu_fast_vs_reference_max_diff"] < 1e-9
        return rec
    gpu = detection_on("cuda", checkpoint)
    rec["cuda_fast_vs_reference_max_diff"] = gpu["fast_vs_reference_max_diff"]
    rec["generated_equal"] = gpu["synthetic"]["generated"] == cpu["synthetic"]["generated"]
    rec["fast_scores_differing"] = differing(cpu["synthetic"]["fast"], gpu["synthetic"]["fast"])
    rec["reference_scores_differing"] = differing(cpu["synthetic"]["reference"], gpu["synthetic"]["reference"])
    rec["niah_differing"] = [
        {"depth": c["depth"], "generated_equal": c["generated"] == g["generated"],
         "scores_differing": differing(c["scores"], g["scores"]), "counted": [c["counted"], g["counted"]]}
        for c, g in zip(cpu["niah"], gpu["niah"]) if c != g
    ]
    rec["ok"] = (rec["generated_equal"] and not rec["fast_scores_differing"] and not rec["reference_scores_differing"]
                 and not rec["niah_differing"] and rec["cuda_fast_vs_reference_max_diff"] < 1e-9)
    bf16 = detection_on("cuda", checkpoint, "bfloat16")  # information only: DetectConfig allows bf16 on GPU
    rec["cuda_bf16_info"] = {"generated_equal_fp32": bf16["synthetic"]["generated"] == gpu["synthetic"]["generated"],
                             "fast_differing_from_fp32": differing(gpu["synthetic"]["fast"], bf16["synthetic"]["fast"]),
                             "fast_vs_reference_max_diff": bf16["fast_vs_reference_max_diff"]}
    return rec


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--tokenizer", default=str(REPO / ".gpu_wheels" / "tokenizer"),
                        help="SmolLM2 tokenizer files (carried; model weights are not)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="checks that would not fit are skipped")
    parser.add_argument("--only", default="ABC", help="parts to run, e.g. AC")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.log").unlink(missing_ok=True)
    for var, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("TRANSFORMERS_OFFLINE", "1"), ("MPLBACKEND", "Agg"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(var, value)  # nothing outside the device machine can be reached: never wait on a hub

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if device == "cpu":
        torch.set_num_threads(1)  # 2 cores shared by everyone here
    RESULTS["meta"] = {"device": device, "argv": sys.argv[1:], **versions()}
    say(f"device {device}; torch {torch.__version__}; {RESULTS['meta'].get('gpu')}")
    dump()
    budget = Budget(args.budget_s)
    tokenizer_dir = Path(args.tokenizer)
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    if "A" in args.only:
        for tag, dtype in dtypes:
            run_check(f"A_eager_{tag}", check_eager, dtype, device, budget=budget, needs_s=5)
            run_check(f"A_cuda_graph_module_{tag}", check_graph_module, dtype, device, budget=budget, needs_s=5,
                      cuda_only=True)
            run_check(f"A_cuda_graph_model_{tag}", check_graph_model, dtype, device, budget=budget, needs_s=10,
                      cuda_only=True)
    if "C" in args.only:
        run_check("C_detect_fp32", check_detect, work, tokenizer_dir, device, budget=budget, needs_s=20)
    if "B" in args.only:
        fixture = run_check("B_fixture", DpoFixture.build, work, tokenizer_dir).pop("fixture", None)
        dump()
        if fixture is not None:
            steps = 10 if device == "cuda" else 3
            lr = 1e-4  # a random tiny model: the demo's 1e-5 barely moves it in 10 steps
            run_check("B_dpo_bf16_autocast", check_dpo, fixture, "bf16", "demo", steps, resume=True, bf16=True,
                      learning_rate=lr, budget=budget, needs_s=30)
            run_check("B_dpo_fp32", check_dpo, fixture, "fp32", "demo", steps, bf16=False, learning_rate=lr,
                      budget=budget, needs_s=30)
            run_check("B_dpo_paper_preset_checkpointing", check_dpo, fixture, "paper", "paper", steps,
                      learning_rate=lr, min_lr=lr / 10, pairs_per_step=2, budget=budget, needs_s=30)
    if "A" in args.only:  # compiles last: the slowest checks, skipped first when time runs short
        for tag, dtype in dtypes:
            for mode in (None, "reduce-overhead"):
                name = f"A_compile_{'default' if mode is None else 'reduce_overhead'}_{tag}"
                run_check(name, check_compile, dtype, device, mode, budget=budget, needs_s=60,
                          cuda_only=mode == "reduce-overhead")

    RESULTS["meta"]["vllm_imported"] = "vllm" in sys.modules
    statuses = [c["status"] for c in RESULTS["checks"].values()]
    RESULTS["summary"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    dump()
    say(f"summary {RESULTS['summary']}; vllm imported: {RESULTS['meta']['vllm_imported']}; "
        f"results in {OUT / 'gpu_check.json'}")
    return 0 if all(s == "pass" or s.startswith("skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
