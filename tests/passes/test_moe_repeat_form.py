"""DeepSeekMoE's training-path dispatch (repeated rows, masked assignment, weighted slot sum):
rewritten with eager's numbers in its spellings, and code that only looks like it (a row order
that is not repeat_interleave, a missing or repeated expert, ids not provably in range, a
buffer read or written elsewhere) left alone with a reason."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torch.nn.functional as F

from tests.passes.test_moe_forms import assert_left_alone, assert_rewritten, compile_and_compare, matches, near_misses


class Expert(nn.Module):
    def __init__(self, d, inter, bias):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RepeatAssign(nn.Module):
    """``variant`` names one change to the form; "plain" is DeepSeek's code."""

    def __init__(self, variant="plain", d=12, inter=10, E=5, k=2, bias=False, ids_input=False):
        super().__init__()
        self.v, self.k, self.E, self.ids_input = variant, k, E, ids_input
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(Expert(d, inter, bias) for _ in range(E))

    def forward(self, x, ids=None):
        probs = F.softmax(self.router(x).float(), dim=-1)
        w, topk_ids = torch.topk(probs, self.k, dim=-1)
        if self.ids_input:
            topk_ids = ids
        if self.v.startswith("ids_"):  # ids that topk's backward does not save, to write in place
            topk_ids = torch.topk(probs.detach(), self.k, dim=-1)[1]
        if self.v == "ids_before":
            topk_ids[:, 1] = topk_ids[:, 0]
        flat = topk_ids.view(-1) if self.v != "flatten" else topk_ids.flatten()
        if self.v == "repeat":
            xr = x.repeat(self.k, 1)
        elif self.v == "torch_fn":
            xr = torch.repeat_interleave(x, self.k, dim=0)
        else:
            xr = x.repeat_interleave(self.k, dim=0)
        zeroed = ("zeros", "flatten", "missing", "peek", "xr_between")  # eager reads every row of these
        y = torch.zeros_like(xr) if self.v in zeroed else torch.empty_like(xr)
        experts = range(self.E - 1) if self.v == "missing" else range(self.E)
        peek = None
        for i in experts:
            if self.v in ("mask_node", "eq_kwarg"):
                mask = flat.eq(i) if self.v == "mask_node" else torch.eq(flat, other=i)
                y[mask] = self.experts[i](xr[mask])
            else:
                y[flat == i] = self.experts[i](xr[flat == i])
            if self.v == "twice" and i == 0:
                y[flat == i] = self.experts[i](xr[flat == i])
            if self.v == "peek" and i == 1:
                peek = y.sum()
            if self.v == "xr_between" and i == 1:
                xr.mul_(2.0)
        if self.v == "scaled":
            y.mul_(2.0)
        if self.v == "ids_after":  # the masks read the ids before this write, the op after it
            topk_ids[:, 0] = 0
        out = (y.view(*w.shape, -1) * w.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.v == "aux":  # DeepSeek-V2's sequence aux loss counts picks with a scatter_add_ along dim 1
            ce = torch.zeros(x.shape[0], self.E).scatter_add_(1, topk_ids, torch.ones_like(w))
            out = out + 0.01 * (ce * probs).sum()
        return out if peek is None else out + peek


@pytest.mark.parametrize("variant", ["plain", "zeros", "flatten", "mask_node", "eq_kwarg", "torch_fn"])
def test_repeat_assign_rewritten(variant):
    rec = compile_and_compare(RepeatAssign(variant), (torch.randn(13, 12),))
    assert_rewritten(rec, "repeat_assign", E=5, k=2, activation="swiglu")
    assert "repeat_interleave" not in rec.blaze_graph.split("def forward", 1)[1]


@pytest.mark.parametrize("k, T", [(1, 7), (3, 7), (2, 1)])
def test_repeat_assign_top_k_and_bias(k, T):
    """T=1: most experts get no rows (an empty mask selects nothing)."""
    rec = compile_and_compare(RepeatAssign(k=k, E=4, bias=True), (torch.randn(T, 12),))
    assert_rewritten(rec, "repeat_assign", E=4, k=k, bias=True)


def test_aux_loss_counts_are_not_taken_for_a_dispatch():
    rec = compile_and_compare(RepeatAssign("aux"), (torch.randn(13, 12),))
    assert_rewritten(rec, "repeat_assign")
    assert not near_misses(rec), [n.line() for n in near_misses(rec)]


def test_repeat_assign_bf16_matches_eager_rounding():
    """bf16 rows and buffer, fp32 routing weights: the products and the sum run in fp32, then
    the result is cast to bf16, in eager and in the op alike."""
    torch.manual_seed(0)
    model = RepeatAssign().to(torch.bfloat16)
    rec = compile_and_compare(model, (torch.randn(16, 12, dtype=torch.bfloat16),), atol=2e-2, rtol=2e-2)
    assert_rewritten(rec, "repeat_assign", dtype="bfloat16")


@pytest.mark.parametrize("variant, reason", [
    ("repeat", "not x.repeat_interleave(k, dim=0)"),
    ("missing", "missing expert(s) [4]"),
    ("twice", "expert 0's rows are assigned twice"),
    ("peek", "is also read by"),
    ("scaled", "is also read by"),
    # in-place writes after the site's reads (the masked assignments are part of the site)
    ("ids_after", "writes in place the routing ids"),
    ("xr_between", "writes in place a tensor the dispatch reads (xr)"),
    # and before them: the ids are then no longer provably topk indices
    ("ids_before", "writes in place the routing ids"),
])
def test_repeat_assign_lookalikes_are_left_alone(variant, reason):
    assert_left_alone(compile_and_compare(RepeatAssign(variant), (torch.randn(13, 12),)), reason, "repeat_assign")


def test_repeat_assign_ids_from_an_input_are_left_alone():
    """Ids that are not topk indices over E scores may hold an expert the loop never assigns,
    whose rows would keep the buffer's contents: nothing proves them in range."""
    x = torch.randn(13, 12)
    ids = torch.randint(0, 5, (13, 2))
    rec = compile_and_compare(RepeatAssign(ids_input=True), (x, ids))
    assert not matches(rec)
    assert any("cannot prove the routing ids lie in [0, E)" in n.reason for n in near_misses(rec))


class SwitchAssign(nn.Module):
    """Switch Transformers' dispatch (top-1, capacity mask): expert outputs assigned into a
    clone of the input, so a dropped token passes through. Not a form the op expresses."""

    def __init__(self, d=12, inter=10, E=4):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(Expert(d, inter, False) for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        p, idx = probs.max(dim=-1)
        mask = F.one_hot(idx, probs.shape[-1]).bool()
        mask = mask & (torch.cumsum(mask.long(), dim=0) <= 3)  # capacity 3 per expert
        nxt = x.clone()
        for e, expert in enumerate(self.experts):
            nxt[mask[:, e]] = expert(x[mask[:, e]])
        return p.unsqueeze(-1) * nxt


def test_switch_masked_assignment_is_reported():
    rec = compile_and_compare(SwitchAssign(), (torch.randn(13, 12),))
    assert not matches(rec)
    (miss,) = [n for n in near_misses(rec) if n.form == "masked_assign"]
    # the buffer is a copy of x: the advice to index_add_ into zeros would change the model
    assert "4 assignment(s) of expert outputs into" in miss.reason and "is a copy of" in miss.reason
    assert "pass through" in miss.reason and "index_add_" not in miss.reason


def test_repeat_form_near_miss_is_not_reported_twice():
    rec = compile_and_compare(RepeatAssign("repeat"), (torch.randn(13, 12),))
    assert [n.form for n in near_misses(rec)] == ["repeat_assign"]


class MaskedLinear(nn.Module):
    """Not an MoE: rows of one linear's output written under a mask."""

    def __init__(self, d=12):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        out = torch.zeros_like(x)
        mask = x[:, 0] > 0
        out[mask] = self.lin(x)[mask]
        out[~mask] = self.lin(x[~mask]) * 2.0  # a linear on gathered rows, but only one of them
        return out


def test_masked_assignment_without_experts_is_not_reported():
    rec = compile_and_compare(MaskedLinear(), (torch.randn(13, 12),))
    assert not matches(rec) and not near_misses(rec)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 24), E=st.integers(2, 12), k=st.integers(1, 4), bias=st.booleans(), skew=st.booleans(),
       seed=st.integers(0, 2**16))
def test_repeat_assign_property(T, E, k, bias, skew, seed):
    """Random sizes, ragged and empty experts (``skew`` sends most rows to expert 0): the
    rewrite gives eager's outputs and gradients."""
    k = min(k, E)
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = RepeatAssign(E=E, k=k, bias=bias)
    if skew:
        with torch.no_grad():
            model.router.weight[0] += 3.0
    rec = compile_and_compare(model, (torch.randn(T, 12) + (1.0 if skew else 0.0),), atol=5e-5, rtol=5e-4)
    assert_rewritten(rec, "repeat_assign", E=E, k=k)
