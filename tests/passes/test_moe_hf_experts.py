"""Hugging Face transformers v5's experts, as its ``grouped_mm`` experts implementation writes
them (``transformers/integrations/moe.py``, the default for every model class that uses
``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE, ...).

The block below is written here in the same spelling, since CI does not install transformers:
a float router with an in-place renormalization; ``sort`` of the flattened ids, rows
``x[perm // k]``, counts ``histc`` of the *sorted* ids, offsets ``cumsum(..., dtype=int32)``,
``grouped_mm`` of the rows with the [E, out, in] weights passed transposed (after
``input.to(weight.dtype)``), the routing weights applied in sorted order, then the inverse
permutation written as ``inv[perm] = arange(S)`` and a slot sum. Under torch.compile
transformers calls ``torch._grouped_mm`` for bf16 and its own op
``transformers::grouped_mm_fallback`` for other dtypes; a stand-in of that op is registered
here when transformers is not installed. Rewritten as the sort form with eager's numbers;
variants whose inverse permutation, counts or casts cannot be proven are left alone.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.test_moe_forms import assert_left_alone, assert_rewritten, compile_and_compare


def _fallback_op():
    """``torch.ops.transformers.grouped_mm_fallback``: transformers' own, or a stand-in with
    its signature and products (``input[group e] @ weight[e]``)."""
    try:
        return torch.ops.transformers.grouped_mm_fallback
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("transformers::grouped_mm_fallback", mutates_args=())
    def grouped_mm_fallback(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = input.new_zeros(input.shape[0], weight.shape[-1])
        start = 0
        for e, end in enumerate(offs.tolist()):
            out[start:end] = input[start:end] @ weight[e]
            start = end
        return out

    @grouped_mm_fallback.register_fake
    def _(input, weight, offs):
        return input.new_empty(input.shape[0], weight.shape[-1])

    def backward(ctx, grad):
        input, weight, offs = ctx.saved_tensors
        gi, gw, start = torch.zeros_like(input), torch.zeros_like(weight), 0
        for e, end in enumerate(offs.tolist()):
            gi[start:end] = grad[start:end] @ weight[e].T
            gw[e] = input[start:end].T @ grad[start:end]
            start = end
        return gi, gw, None

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    grouped_mm_fallback.register_autograd(backward, setup_context=setup)
    return torch.ops.transformers.grouped_mm_fallback


GROUPED_MM_FALLBACK = _fallback_op()  # at import, as transformers registers it (not while Dynamo traces)


def _grouped_mm(rows, W, offs):
    if W.dtype == torch.bfloat16:
        return torch._grouped_mm(rows.to(W.dtype), W, offs=offs)
    return GROUPED_MM_FALLBACK(rows.to(W.dtype), W, offs=offs)


def _route(x, gate, k):
    """The v5 router: float softmax, top-k, renormalized in place."""
    probs = F.softmax(F.linear(x, gate).float(), dim=-1)
    top_w, top_ids = torch.topk(probs, k, dim=-1)
    top_w /= top_w.sum(dim=-1, keepdim=True)
    return top_w, top_ids


class HFExperts(nn.Module):
    """One v5 MoE block: ``variant`` changes one thing."""

    def __init__(self, variant="plain", d=16, inter=16, E=6, k=2, gated=True):
        super().__init__()
        self.v, self.E, self.k, self.gated = variant, E, k, gated
        self.gate = nn.Parameter(torch.randn(E, d) * d**-0.5)
        n_in = 2 * inter if gated else inter
        if variant == "stored_transposed":  # is_transposed=True: [E, in, out], passed as they are
            self.gate_up_proj = nn.Parameter(torch.randn(E, d, n_in) * d**-0.5)
            self.down_proj = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)
        else:
            self.gate_up_proj = nn.Parameter(torch.randn(E, n_in, d) * d**-0.5)
            self.down_proj = nn.Parameter(torch.randn(E, d, inter) * inter**-0.5)

    def _linear(self, rows, W, offs):
        return _grouped_mm(rows, W if self.v == "stored_transposed" else W.transpose(-2, -1), offs)

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        top_w, top_ids = _route(x, self.gate, self.k)

        weights, ids = top_w.reshape(-1), top_ids.reshape(-1)
        ids_g, perm = torch.sort(ids)
        rows = x[perm // self.k]
        if self.v == "rows_rounded":  # fp32 x, bf16 experts: the grouped GEMM reads x rounded to bf16
            rows = rows.to(torch.bfloat16)
        counts_of = perm.float() if self.v == "counts_of_perm" else ids_g.float()
        counts = torch.histc(counts_of, bins=self.E, min=0, max=self.E - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)

        h = self._linear(rows, self.gate_up_proj, offs)
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.gelu(h)
        y = self._linear(h, self.down_proj, offs)

        S = perm.size(0)
        if self.v == "scatter_inverse":
            inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(S, device=x.device))
        else:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(S, device=x.device).flip(0) if self.v == "reversed_inverse" else \
                torch.arange(S, device=x.device)
            if self.v == "inverse_written_twice":
                inv[0] = 0
        if self.v == "weighted_after":
            out = (y[inv].view(-1, self.k, d) * top_w.unsqueeze(-1)).sum(dim=1)
        else:
            w_g = weights[perm.flip(0)] if self.v == "weights_other_order" else weights[perm]
            out = (y * w_g.unsqueeze(-1))[inv].view(-1, self.k, d).sum(dim=1)
        return out.to(hidden_states.dtype).view(b, s, d)


def _inputs(dtype, T=14):
    return (torch.randn(2, T // 2, 16, dtype=dtype),)


@pytest.mark.parametrize("variant, dtype, gated", [
    ("plain", torch.float32, True),  # transformers' fallback op (fp32 under torch.compile)
    ("plain", torch.bfloat16, True),  # torch._grouped_mm
    ("stored_transposed", torch.float32, True),
    ("scatter_inverse", torch.float32, False),
    ("weighted_after", torch.bfloat16, True),
], ids=["fp32", "bf16", "stored-transposed", "scatter-inverse-gelu", "weighted-after-bf16"])
def test_hf_v5_experts_are_rewritten(variant, dtype, gated) -> None:
    torch.manual_seed(0)
    model = HFExperts(variant, gated=gated).to(dtype)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    rec = compile_and_compare(model, _inputs(dtype), **tol)
    assert_rewritten(rec, "sort_grouped", E=6, k=2, activation="swiglu" if gated else "gelu")
    code = [l for l in rec.blaze_graph.split("def forward", 1)[1].splitlines() if not l.strip().startswith("#")]
    for gone in ("torch.sort", "histc", "grouped_mm", "empty_like", "arange"):  # the whole dispatch is the op's
        assert not [l for l in code if gone in l.replace("blazec", "")], gone


def test_hf_v5_experts_with_an_empty_expert() -> None:
    torch.manual_seed(1)
    model = HFExperts()
    with torch.no_grad():
        model.gate[5] = -10.0  # expert 5 is never picked
    rec = compile_and_compare(model, (torch.randn(1, 9, 16).abs(),))
    assert_rewritten(rec, "sort_grouped", E=6)


@pytest.mark.parametrize("variant, reason", [
    ("reversed_inverse", "is not written with arange(len(perm))"),
    ("inverse_written_twice", "uses besides the read, not one write"),
    ("counts_of_perm", "cannot prove the group offsets are the cumulative per-expert counts"),
    ("weights_other_order", "not scaled by w.reshape(-1)[perm, None] (or [perm].unsqueeze(-1)) for the same sort order"),
    ("rows_rounded", "on the gathered rows before the grouped GEMM"),
])
def test_hf_v5_experts_left_alone_when_unproven(variant, reason) -> None:
    torch.manual_seed(0)
    model = HFExperts(variant)
    if variant == "rows_rounded":
        model.gate_up_proj.data, model.down_proj.data = model.gate_up_proj.bfloat16(), model.down_proj.bfloat16()
    rec = compile_and_compare(model, _inputs(torch.float32))
    assert_left_alone(rec, reason, form="sort_grouped")


class HFBatchedExperts(nn.Module):
    """The v5 ``batched_mm`` experts: rows repeated per slot, the weights gathered per pair
    (``W[ids]``, [S, out, in]), ``bmm(W[ids], rows.unsqueeze(-1)).squeeze(-1)``, the routing
    weights applied in pair order, then the slot sum; the router as above."""

    def __init__(self, variant="plain", d=16, inter=16, E=6, k=2, gated=True):
        super().__init__()
        self.v, self.E, self.k, self.gated = variant, E, k, gated
        self.gate = nn.Parameter(torch.randn(E, d) * d**-0.5)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * inter if gated else inter, d) * d**-0.5)
        self.down_proj = nn.Parameter(torch.randn(E, d, inter) * inter**-0.5)

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        top_w, top_ids = _route(x, self.gate, self.k)
        if self.v == "ids_not_topk":  # any [T, k] ids: W[ids] also takes ids in [-E, 0)
            top_ids = (top_ids * 7) % self.E - 1

        rows = x.repeat_interleave(self.k, dim=0)
        weights, ids = top_w.reshape(-1), top_ids.reshape(-1)
        h = torch.bmm(self.gate_up_proj[ids], rows.unsqueeze(-1)).squeeze(-1)
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.relu(h)
        y = torch.bmm(self.down_proj[ids], h.unsqueeze(-1)).squeeze(-1)
        out = (y * weights.unsqueeze(-1)).view(-1, self.k, d).sum(dim=1)
        return out.to(hidden_states.dtype).view(b, s, d)


@pytest.mark.parametrize("dtype, gated", [(torch.float32, True), (torch.bfloat16, False)], ids=["fp32-swiglu", "bf16-relu"])
def test_hf_v5_batched_experts_are_rewritten(dtype, gated) -> None:
    torch.manual_seed(0)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    rec = compile_and_compare(HFBatchedExperts(gated=gated).to(dtype), _inputs(dtype), **tol)
    assert_rewritten(rec, "pair_weight_gather", E=6, k=2, activation="swiglu" if gated else "relu")
    code = [l for l in rec.blaze_graph.split("def forward", 1)[1].splitlines() if not l.strip().startswith("#")]
    assert not [l for l in code if "repeat_interleave" in l or "proj_[" in l]  # no repeated rows, no per-pair weights


def test_hf_v5_batched_experts_with_unproven_ids_are_left_alone() -> None:
    torch.manual_seed(0)
    rec = compile_and_compare(HFBatchedExperts("ids_not_topk"), _inputs(torch.float32))
    assert_left_alone(rec, "cannot prove the routing ids lie in [0, E)", form="pair_weight_gather")
