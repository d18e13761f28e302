"""Casts in the expert loop: the matcher ignores only casts that cannot change a value.

A cast that rounds (fp32 -> fp16/bf16, or a round trip through one) is something the blaze ops
would not do, so the loop is left alone with eager's numbers and a near miss that names the
cast. No-op casts, exact widenings and the casts of a bf16 model written like HF Mixtral
(router softmax in float, weights and contributions cast back to the hidden dtype) are still
rewritten, with eager's numbers.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from blazec.passes._fx import strip_casts
from tests.passes.models import (
    assert_training_close,
    blaze_op_nodes,
    graph_signature,
    moe_report,
    run_blaze,
    train_step,
)

EAGER = {"final_stage": "eager"}
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}


class Expert(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.w1 = nn.Linear(d, inter, bias=False)
        self.w3 = nn.Linear(d, inter, bias=False)
        self.w2 = nn.Linear(inter, d, bias=False)


class CastLoop(nn.Module):
    """The Mixtral loop with a hook for a cast at each place a matcher strips casts.

    ``w_dtype``: routing weights (softmax in float) cast to it; ``acc_dtype``: the accumulator's
    dtype (default x's); ``out``: on the expert output before the routing-weight multiply;
    ``contrib``: on the contribution before index_add_; ``hidden``: on the expert's hidden state;
    ``rounding``: on ``h * w`` before the down projection (``weight_pos="hidden"``).
    """

    def __init__(self, d=16, inter=12, E=4, k=2, w_dtype=None, acc_dtype=None, out=None, contrib=None,
                 hidden=None, rounding=None, weight_pos="output"):
        super().__init__()
        self.E, self.k, self.w_dtype, self.acc_dtype, self.weight_pos = E, k, w_dtype, acc_dtype, weight_pos
        same = lambda t, *_: t  # noqa: E731
        self.out, self.contrib = out or same, contrib or same
        self.hidden, self.rounding = hidden or same, rounding or same
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(Expert(d, inter) for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        w, ids = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        if self.w_dtype is not None:
            w = w.to(self.w_dtype)
        acc = torch.zeros(x.shape, dtype=self.acc_dtype or x.dtype)
        mask = F.one_hot(ids, num_classes=self.E).permute(2, 1, 0)
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            ex, rows = self.experts[e], x[tok]
            h = self.hidden(F.silu(ex.w1(rows)) * ex.w3(rows))
            if self.weight_pos == "hidden":
                y = ex.w2(self.rounding(h * w[tok, slot, None], x))
            else:
                y = self.out(ex.w2(h)) * w[tok, slot, None]
            acc.index_add_(0, tok, self.contrib(y, acc))
        return acc


def _run(model, dtype=torch.float32, T=24):
    torch.manual_seed(1)
    model = model.to(dtype)
    inputs = (torch.randn(T, 16, dtype=dtype),)
    ref = train_step(copy.deepcopy(model), inputs)
    got, records, spy = run_blaze(model, inputs, EAGER)
    assert len(records) == 1
    return got, ref, records[0], spy


# (id, model, model dtype, substring of the near-miss reason)
LEFT_ALONE = [
    ("contribution_fp16_round_trip", lambda: CastLoop(contrib=lambda c, acc: c.half().float()), torch.float32,
     "a cast to torch.float16 on expert 0's contribution"),
    ("hidden_bf16_round_trip", lambda: CastLoop(hidden=lambda h: h.bfloat16().float()), torch.float32,
     "a cast to torch.bfloat16 inside the expert computation of expert 0"),
    ("output_bf16_round_trip", lambda: CastLoop(out=lambda y: y.bfloat16().float()), torch.float32,
     "a cast to torch.bfloat16 on expert 0's output"),
    ("hidden_weighted_bf16_round_trip",
     lambda: CastLoop(weight_pos="hidden", rounding=lambda hw, x: hw.bfloat16().float()), torch.float32,
     "a cast to torch.bfloat16 inside the expert computation of expert 0"),
    ("fp32_contribution_into_bf16_acc",
     lambda: CastLoop(acc_dtype=torch.bfloat16, contrib=lambda c, acc: c.to(acc.dtype)), torch.float32,
     "a cast to torch.bfloat16 on expert 0's contribution"),
    ("fp64_weights_rounded_to_fp32", lambda: CastLoop(w_dtype=torch.float64, contrib=lambda c, acc: c.float()),
     torch.float32, "a cast to torch.float32 on expert 0's contribution"),
    # exact casts whose removal would change the dtype the op computes in
    ("bf16_output_widened_before_weight_multiply",
     lambda: CastLoop(w_dtype=torch.bfloat16, acc_dtype=torch.float32, out=lambda y: y.float()), torch.bfloat16,
     "before the routing-weight multiply, which then runs in torch.float32"),
    ("fp32_contribution_summed_in_fp64",
     lambda: CastLoop(acc_dtype=torch.float64, contrib=lambda c, acc: c.double()), torch.float32,
     "summed in torch.float64, where the blaze op sums in torch.float32"),
]


@pytest.mark.parametrize("factory, dtype, reason", [c[1:] for c in LEFT_ALONE], ids=[c[0] for c in LEFT_ALONE])
def test_value_changing_cast_is_left_alone_and_named(factory, dtype, reason):
    got, ref, rec, spy = _run(factory(), dtype)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)  # the graph is Dynamo's own
    assert_training_close(got, ref, **(BF16_TOL if dtype == torch.bfloat16 else {}))
    rep = moe_report(rec)
    assert rep.matches == [], [m.line() for m in rep.matches]
    reasons = [n.reason for n in rep.near_misses if n.form == "static_loop"]
    assert any(reason in r and "left alone" in r and "test_moe_casts.py:" in r for r in reasons), reasons
    (before,), (after,) = spy.before, spy.after
    assert blaze_op_nodes(after) == [] and graph_signature(after) == graph_signature(before)


def test_large_values_overflow_as_in_eager():
    """fp16 round trip of a contribution past fp16's range: eager gets inf, and so must blaze."""
    model = CastLoop(contrib=lambda c, acc: c.half().float())
    torch.manual_seed(1)
    x = torch.randn(24, 16) * 3e3
    ref = copy.deepcopy(model)(x)
    assert torch.isinf(ref).any()
    got = torch.compile(model, backend="blaze", options=EAGER)(x)
    torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)


# (id, model, model dtype, tolerances against eager)
REWRITTEN = [
    ("fp32_no_op_casts",
     lambda: CastLoop(w_dtype=torch.float32, out=lambda y: y.float(), contrib=lambda c, acc: c.to(acc.dtype),
                      hidden=lambda h: h.contiguous()), torch.float32, {}),
    ("hf_mixtral_bf16",
     lambda: CastLoop(w_dtype=torch.bfloat16, contrib=lambda c, acc: c.to(torch.bfloat16)), torch.bfloat16,
     BF16_TOL),
    ("bf16_contribution_widened_into_fp32_acc",
     lambda: CastLoop(w_dtype=torch.bfloat16, acc_dtype=torch.float32, contrib=lambda c, acc: c.float()),
     torch.bfloat16, BF16_TOL),
    ("bf16_output_widened_times_fp32_weights",
     lambda: CastLoop(acc_dtype=torch.float32, out=lambda y: y.float()), torch.bfloat16, BF16_TOL),
    ("fp32_output_widened_times_fp64_weights",
     lambda: CastLoop(w_dtype=torch.float64, acc_dtype=torch.float64, out=lambda y: y.double()), torch.float32,
     {}),
    ("bf16_hidden_weighted_in_fp32_rounded_to_bf16",
     lambda: CastLoop(weight_pos="hidden", rounding=lambda hw, x: hw.to(x.dtype)), torch.bfloat16, BF16_TOL),
]


@pytest.mark.parametrize("factory, dtype, tol", [c[1:] for c in REWRITTEN], ids=[c[0] for c in REWRITTEN])
def test_exact_casts_are_still_rewritten(factory, dtype, tol):
    got, ref, rec, spy = _run(factory(), dtype)
    assert got[0].dtype == ref[0].dtype
    assert_training_close(got, ref, **tol)
    rep = moe_report(rec)
    assert [m.form for m in rep.matches] == ["static_loop_modulelist"], [n.line() for n in rep.near_misses]
    assert blaze_op_nodes(spy.after[0])


def test_hf_bf16_router_is_still_classified():
    """The gating report looks through the router's cast to bf16 (it rewrites nothing)."""
    _, _, rec, _ = _run(CastLoop(w_dtype=torch.bfloat16, contrib=lambda c, acc: c.to(acc.dtype)), torch.bfloat16)
    (gating,) = [r for r in rec.pass_reports if r.name == "moe_gating"]
    assert any("softmax_topk_renorm" in n for n in gating.notes), gating.notes


def _node(g: torch.fx.Graph, src, method: str, dtype, *args):
    n = g.call_method(method, (src, *args))
    n.meta["example_value"] = torch.empty(0, dtype=dtype)
    return n


def test_strip_casts_follows_only_casts_that_keep_every_value():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.empty(0, dtype=torch.float32)
    half = _node(g, x, "half", torch.float16)
    back = _node(g, half, "float", torch.float32)
    assert strip_casts(back) == (half, [back])  # fp16 -> fp32 is exact; fp32 -> fp16 rounds
    wide = _node(g, _node(g, x, "contiguous", torch.float32), "double", torch.float64)
    assert strip_casts(wide)[0] is x
    assert strip_casts(_node(g, x, "to", torch.float32, torch.float32))[0] is x  # a no-op
    assert strip_casts(_node(g, x, "to", torch.bfloat16, torch.bfloat16))[0] is not x
    unknown = g.call_method("float", (g.call_function(operator.add, (x, 1)),))
    assert strip_casts(unknown)[0] is unknown  # no recorded dtype: kept
    ids = g.placeholder("ids")
    ids.meta["example_value"] = torch.empty(0, dtype=torch.int64)
    offsets = _node(g, ids, "to", torch.int32, torch.int32)
    assert strip_casts(offsets)[0] is ids  # index data: checked structurally by the matchers
    trunc = _node(g, _node(g, x, "to", torch.int32, torch.int32), "float", torch.float32)
    assert strip_casts(trunc)[0] is trunc.args[0]  # float -> int truncates
    assert strip_casts(back, exact=False)[0] is x
