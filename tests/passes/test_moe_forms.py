"""The non-loop naive forms: GShard/Switch capacity dispatch, sort + split loop, per-pair weight
gather + bmm, and the dense top-k gate. Each is rewritten into blaze ops with eager's numbers,
and near-identical code that is not the form is left alone with a reason."""

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blazec import report
from tests.helpers import EXAMPLE_FILES, blaze_unless_unchanged, load_example, run_train

EAGER = {"final_stage": "eager"}
DISPATCH_NODES = ("torch.where", "nonzero", "one_hot(", "index_add_", "einsum", "torch.bmm", "argsort", "split(",
                  ".scatter(")


def compile_and_compare(model, inputs, options=EAGER, atol=2e-5, rtol=1e-4):
    """Train step eager vs blaze; returns the GraphRecord of the (single) compiled graph. A graph
    the passes leave alone skips blaze's later stages (tests/helpers.blaze_unless_unchanged)."""
    ref = run_train(copy.deepcopy(model), inputs)
    with report.capture() as records:
        got = run_train(torch.compile(model, backend=functools.partial(blaze_unless_unchanged, options=options)), inputs)
    torch.testing.assert_close(got[0], ref[0], atol=atol, rtol=rtol)
    assert got[1].keys() == ref[1].keys()
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], atol=atol, rtol=rtol, msg=lambda m: f"grad {n}: {m}")
    for i in ref[2]:
        torch.testing.assert_close(got[2][i], ref[2][i], atol=atol, rtol=rtol)
    assert len(records) == 1
    return records[0]


def matches(rec):
    return [m for r in rec.pass_reports for m in r.matches]


def near_misses(rec):
    return [n for r in rec.pass_reports for n in r.near_misses]


def assert_rewritten(rec, form, allow=(), **details):
    """One match of ``form``; blaze ops in the graph and none of the naive dispatch ops.

    GShard's gate keeps its [T, E] one_hot masks (they compute the routing weights), but no
    [T, E, C] dispatch/combine tensor, einsum or bmm may remain.
    """
    allowed = tuple(allow) + (("one_hot(",) if form.startswith("gshard") else ())
    (m,) = matches(rec)
    assert m.form == form
    for k, v in details.items():
        assert m.details[k] == v, (k, m.details)
    code = rec.blaze_graph.split("def forward", 1)[1].splitlines()
    forward = "\n".join(l for l in code if not l.strip().startswith("#"))  # comments quote the source
    assert "torch.ops.blazec.moe_experts" in forward and "torch.ops.blazec.moe_route" in forward
    for bad in DISPATCH_NODES:
        if bad not in allowed:
            assert bad not in forward, f"{bad} left in the rewritten graph"
    for line in forward.splitlines():  # no 3-D tensor of the token count's size survives
        assert not (line.strip().startswith(("dispatch", "combine", "expert_in"))), line


def assert_left_alone(rec, reason, form=None):
    """No match and no blaze op; a near miss (of ``form``, when given) gives ``reason``."""
    assert not matches(rec)
    assert "torch.ops.blazec" not in rec.blaze_graph
    reasons = [n.reason for n in near_misses(rec) if form is None or n.form == form]
    assert any(reason in r for r in reasons), reasons


EXPECTED_FORMS = {
    "moe_deepseek_gate.py": "static_loop_modulelist",
    "moe_deepseek_train.py": "repeat_assign",
    "moe_dense_gate.py": "dense_gate",
    "moe_gshard_top2.py": "gshard_top2",
    "moe_loop_modulelist.py": "static_loop_modulelist",
    "moe_loop_stacked.py": "static_loop_stacked",
    "moe_pair_gather_bmm.py": "pair_weight_gather",
    "moe_sort_grouped_mm.py": "sort_grouped",
}


def test_every_example_has_an_expected_form():
    assert sorted(EXPECTED_FORMS) == EXAMPLE_FILES


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_every_example_is_rewritten(name):
    model, inputs = load_example(name).make()
    rec = compile_and_compare(model, inputs)
    assert_rewritten(rec, EXPECTED_FORMS[name])


# ---------------------------------------------------------------------------------------
# GShard / Switch


class GShard(nn.Module):
    """Top-1 (Switch) or top-2 (GShard) capacity dispatch; ``flaw`` breaks one semantic condition."""

    def __init__(self, d=16, inter=24, E=6, top_k=2, capacity_factor=1.0, act="relu", bias=True, flaw=None):
        super().__init__()
        self.E, self.top_k, self.cf, self.act, self.flaw = E, top_k, capacity_factor, act, flaw
        self.wg = nn.Linear(d, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w_out = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)
        self.b_in = nn.Parameter(torch.randn(E, 1, inter) * 0.1) if bias else None
        self.b_out = nn.Parameter(torch.randn(E, 1, d) * 0.1) if bias else None
        self.scale = nn.Parameter(torch.zeros(())) if flaw == "zero_scale" else None

    def forward(self, x):
        T, E = x.shape[0], self.E
        C = max(1, math.ceil(self.top_k * self.cf * T / E))
        gates = F.softmax(self.wg(x), dim=1)
        idx1 = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(idx1, E)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        masks, locs = [mask1], [loc1]
        if self.top_k == 2:
            idx2 = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=1)
            mask2 = F.one_hot(idx2, E)
            loc2 = torch.cumsum(mask2, dim=0) - 1
            if self.flaw != "no_offset":
                loc2 = loc2 + torch.sum(mask1, dim=0, keepdim=True)
            masks.append(mask2)
            locs.append(loc2)
        kept = [m * torch.lt(l, C) for m, l in zip(masks, locs)]
        pos = [torch.sum(l * k, dim=1) for l, k in zip(locs, kept)]
        if self.flaw == "einsum_gate":  # DeepSpeed's spelling of the kept gate values
            g = [torch.einsum("te,te->t", gates, k.to(gates.dtype)) for k in kept]
        else:
            g = [(gates * k).sum(dim=1) for k in kept]
        if self.flaw == "zero_scale":  # a learnable gate scale initialized to 0: every weight is 0
            g = [gi * self.scale for gi in g]
        elif self.flaw == "straight_through":  # hard 0/1 gates with the soft gates' gradient
            g = [(gi > 0.5).to(gi.dtype) + gi - gi.detach() for gi in g]
        elif self.flaw == "const_scale":
            g = [gi * 2.0 for gi in g]
        if self.top_k == 2:
            denom = torch.clamp(g[0] + g[1], min=torch.finfo(gates.dtype).eps)
            if self.flaw in ("einsum_gate", "deepspeed_letters"):  # DeepSpeed divides in place
                for gi in g:
                    gi /= denom
            else:
                g = [gi / denom for gi in g]
        combine = sum((gi[:, None] * km)[:, :, None] * F.one_hot(p, C)[:, None, :] for gi, km, p in zip(g, kept, pos))
        dispatch = (combine > -1).to(x.dtype) if self.flaw == "all_dispatch" else combine.bool().to(x.dtype)
        if self.flaw == "deepspeed_letters":  # DeepSpeed's top2gating / MOELayer subscripts
            expert_in = torch.einsum("sec,sm->ecm", dispatch, x)
        else:
            expert_in = torch.einsum("tec,td->ecd", dispatch, x)
        h = torch.bmm(expert_in, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in
        h = F.relu(h) if self.act == "relu" else F.gelu(h)
        out = torch.bmm(h, self.w_out)
        if self.b_out is not None:
            out = out + self.b_out
        if self.flaw == "deepspeed_letters":
            y = torch.einsum("sec,ecm->sm", combine.to(x.dtype), out)
        else:
            y = torch.einsum("tec,ecd->td", combine.to(x.dtype), out)
        # a residual, so that the loss's gradient at y is not 0 where every weight is 0
        return y + x if self.flaw in ("zero_scale", "straight_through") else y


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [0.25, 1.0, 4.0])
def test_gshard_rewritten_with_drops(top_k, capacity_factor):
    torch.manual_seed(top_k * 10 + int(capacity_factor * 4))
    T, E = 37, 6
    model = GShard(E=E, top_k=top_k, capacity_factor=capacity_factor)
    x = torch.randn(T, 16)
    rec = compile_and_compare(model, (x,))
    C = max(1, math.ceil(top_k * capacity_factor * T / E))
    assert_rewritten(rec, f"gshard_top{top_k}", E=E, k=top_k, capacity=C, activation="relu", bias=True)
    if capacity_factor == 0.25:  # the case must really drop pairs, or it proves nothing about drops
        assert C * E < T * top_k


def test_gshard_gelu_without_bias():
    model = GShard(top_k=2, act="gelu", bias=False, capacity_factor=0.5)
    rec = compile_and_compare(model, (torch.randn(29, 16),))
    assert_rewritten(rec, "gshard_top2", activation="gelu", bias=False)


@pytest.mark.parametrize("flaw", ["einsum_gate", "const_scale", "deepspeed_letters"])
def test_gshard_weights_whose_zeros_have_no_gradient(flaw):
    """Softmax outputs times masks, an einsum of them, a positive constant: a weight that is 0 at a
    kept pair is an underflowed softmax entry, whose gradient goes nowhere. (And DeepSpeed's
    einsum subscripts, "sec,sm->ecm" / "sec,ecm->sm", which were silent.)"""
    model = GShard(top_k=2, capacity_factor=0.5, flaw=flaw)
    rec = compile_and_compare(model, (torch.randn(31, 16),))
    assert_rewritten(rec, "gshard_top2", allow=("einsum",) if flaw == "einsum_gate" else ())
    code = [l for l in rec.blaze_graph.splitlines() if not l.strip().startswith("#")]
    assert not any("tec," in l or "sec," in l for l in code)  # the dispatch and combine einsums are gone


class Top1TopkOfSoftmax(nn.Module):
    """Switch top-1 whose weight is taken with topk from the softmax (the topk values)."""

    def __init__(self, d=16, inter=24, E=6):
        super().__init__()
        self.E = E
        self.wg = nn.Linear(d, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w_out = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)

    def forward(self, x):
        T, E = x.shape[0], self.E
        C = math.ceil(T / E)
        vals, idx = torch.topk(F.softmax(self.wg(x), dim=1), 1, dim=1)
        g1 = vals[:, 0]
        mask1 = F.one_hot(idx[:, 0], E)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        mask1 = mask1 * torch.lt(loc1, C)
        pos = torch.sum(loc1 * mask1, dim=1)
        combine = (g1[:, None] * mask1)[:, :, None] * F.one_hot(pos, C)[:, None, :]
        expert_in = torch.einsum("tec,td->ecd", combine.bool().to(x.dtype), x)
        out = torch.bmm(F.relu(torch.bmm(expert_in, self.w_in)), self.w_out)
        return torch.einsum("tec,ecd->td", combine, out)


def test_gshard_weight_from_topk_values():
    """The weight proof's topk branch sat behind the generic getitem, which did not reach it:
    topk values of a softmax were refused."""
    rec = compile_and_compare(Top1TopkOfSoftmax(), (torch.randn(29, 16),))
    assert_rewritten(rec, "gshard_top1")


def test_gshard_kept_pair_of_weight_0_is_not_computed():
    """A second choice whose softmax weight underflows to exactly 0 stays in its slot, but
    combine.bool() does not dispatch it: eager runs expert 1 on a zero row there (finite),
    where the op ran it on x[t], which overflows, and 0 * inf made the outputs, dL/dx and the
    weight gradients NaN (found in review). Such pairs are now left out after the capacity drop."""
    torch.manual_seed(3)
    T, E = 12, 4
    model = GShard(E=E, top_k=2, capacity_factor=4.0)
    model.wg = nn.Linear(16, E)
    with torch.no_grad():
        model.wg.weight.zero_()
        model.wg.bias.copy_(torch.tensor([0.0] + [-200.0] * (E - 1)))  # softmax [1, 0, 0, 0]: exp(-200) underflows
        model.w_in[1] *= 1e20  # expert 1 on a real row: |out| ~ 1e40 = inf in float32
        model.w_out[1] *= 1e20  # on the zero row: relu(b_in) @ w_out + b_out ~ 1e19, finite
    x = torch.randn(T, 16)
    ref = run_train(copy.deepcopy(model), (x,))
    assert torch.isfinite(ref[0]).all() and all(torch.isfinite(g).all() for g in ref[1].values())
    rec = compile_and_compare(model, (x,))
    assert_rewritten(rec, "gshard_top2", capacity=math.ceil(2 * 4.0 * T / E))


@pytest.mark.parametrize("flaw, reason", [
    ("no_offset", "buffer positions are not cumsum(mask, 0) - 1 plus the counts of earlier choices"),
    ("all_dispatch", "the dispatch tensor is not combine.bool()"),
    # A kept pair of weight exactly 0 is not dispatched, so eager's weight gradient there is
    # expert_e(0)'s: these were rewritten with the scale's / router's gradients off by ~1.
    ("zero_scale", "may be exactly 0 at a kept pair with a gradient that matters"),
    ("straight_through", "may be exactly 0 at a kept pair with a gradient that matters"),
])
def test_gshard_lookalikes_are_left_alone(flaw, reason):
    model = GShard(top_k=2, capacity_factor=0.5, flaw=flaw)
    rec = compile_and_compare(model, (torch.randn(31, 16),))
    assert not matches(rec)
    assert "torch.ops.blazec" not in rec.blaze_graph
    assert any(reason in n.reason for n in near_misses(rec)), [n.reason for n in near_misses(rec)]


# ---------------------------------------------------------------------------------------
# Dense gate and per-pair weight gather


class DenseGate(nn.Module):
    def __init__(self, d=12, inter=20, E=5, k=2, from_topk=True, spelling="slice"):
        super().__init__()
        self.k, self.from_topk, self.spelling = k, from_topk, spelling
        self.router = nn.Linear(d, E)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, inter), nn.GELU(), nn.Linear(inter, d))
                                     for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        if self.from_topk:
            w, i = probs.topk(self.k, dim=-1)
            if self.spelling == "scatter_":  # gpt-oss
                gate = torch.zeros_like(probs).scatter_(1, i, w)
            else:
                gate = torch.zeros_like(probs).scatter(1, i, w)
        else:
            gate = probs  # a soft mixture over all experts: not a sparse MoE
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            col = gate[:, e : e + 1] if self.spelling == "slice" else gate[:, e].unsqueeze(-1)
            out = out + col * expert(x)
        return out


@pytest.mark.parametrize("spelling", ["slice", "unsqueeze"])
def test_dense_gate_rewritten(spelling):
    rec = compile_and_compare(DenseGate(spelling=spelling), (torch.randn(23, 12),))
    assert_rewritten(rec, "dense_gate", E=5, k=2, activation="gelu", bias=True)


def test_an_in_place_scatter_gate_is_named():
    rec = compile_and_compare(DenseGate(spelling="scatter_"), (torch.randn(9, 12),))
    assert not matches(rec)
    assert any("in-place scatter_" in n.reason for n in near_misses(rec)), [n.reason for n in near_misses(rec)]


def test_soft_mixture_is_not_a_sparse_moe():
    rec = compile_and_compare(DenseGate(from_topk=False), (torch.randn(9, 12),))
    assert not matches(rec)
    assert any("not built with scatter" in n.reason for n in near_misses(rec))


class PairGather(nn.Module):
    def __init__(self, d=12, inter=16, E=4, k=2, gated=False):
        super().__init__()
        self.k, self.gated = k, gated
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w3 = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)

    def forward(self, x):
        T, d = x.shape
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(self.k, dim=0).unsqueeze(1)
        h = F.silu(torch.bmm(xs, self.w1[flat]))
        if self.gated:
            h = h * torch.bmm(xs, self.w3[flat])
        y = torch.bmm(h, self.w2[flat]).squeeze(1)
        return (y.view(T, self.k, d) * w.unsqueeze(-1)).sum(dim=1)


@pytest.mark.parametrize("gated, act", [(False, "silu"), (True, "swiglu")])
def test_pair_gather_rewritten(gated, act):
    rec = compile_and_compare(PairGather(gated=gated), (torch.randn(19, 12),))
    assert_rewritten(rec, "pair_weight_gather", E=4, k=2, activation=act)


class PairGatherEinsum(nn.Module):
    """gpt-fast's Mixtral MOEFeedForward: W[ids] gathered per (token, slot), contracted with
    einsums. ``layout``: "out_in" (gpt-fast's [E, I, d] / [E, d, I]) or "in_out"; ``swap``: the
    operands of every einsum swapped; ``flaw``: "other_ids" (the down weights gathered by other
    ids), "negative_ids" (ids - E, which W[ids] takes and the blaze op does not)."""

    def __init__(self, d=12, inter=16, E=4, k=2, gated=True, layout="out_in", swap=False, flaw=None):
        super().__init__()
        self.k, self.gated, self.layout, self.swap, self.flaw = k, gated, layout, swap, flaw
        self.gate = nn.Linear(d, E, bias=False)
        io = (lambda i, o: (o, i)) if layout == "out_in" else (lambda i, o: (i, o))
        self.w1 = nn.Parameter(torch.randn(E, *io(d, inter)) * d**-0.5)
        self.w3 = nn.Parameter(torch.randn(E, *io(d, inter)) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, *io(inter, d)) * inter**-0.5)

    def _ein(self, a, b, eq_ab):
        lhs, out = eq_ab.split("->")
        sa, sb = lhs.split(",")
        return torch.einsum(f"{sb},{sa}->{out}", b, a) if self.swap else torch.einsum(eq_ab, a, b)

    def forward(self, x):
        ew, ei = torch.topk(F.softmax(self.gate(x), dim=-1), self.k, dim=-1)
        ew /= ew.sum(dim=-1, keepdim=True)
        if self.flaw == "negative_ids":  # W[ids] counts them from the end: eager runs
            ei = ei - self.w1.shape[0]
        up_eq = "ti,taoi->tao" if self.layout == "out_in" else "ti,taio->tao"
        down_eq = "tao,taio->tai" if self.layout == "out_in" else "tao,taoi->tai"
        h = F.silu(self._ein(x, self.w1[ei], up_eq))
        if self.gated:
            h = h * self._ein(x, self.w3[ei], up_eq)
        di = ei.flip(-1) if self.flaw == "other_ids" else ei
        outs = self._ein(h, self.w2[di], down_eq)
        return self._ein(outs, ew, "tai,ta->ti")


@pytest.mark.parametrize("layout, swap, gated", [("out_in", False, True), ("in_out", False, True),
                                                  ("out_in", True, True), ("in_out", True, False)])
def test_pair_gather_einsum_rewritten(layout, swap, gated):
    """The einsum spelling of the per-pair gather (it was silent: no rewrite, no near miss)."""
    torch.manual_seed(1)
    rec = compile_and_compare(PairGatherEinsum(layout=layout, swap=swap, gated=gated), (torch.randn(19, 12),))
    assert_rewritten(rec, "pair_weight_gather", E=4, k=2, activation="swiglu" if gated else "silu")


@pytest.mark.parametrize("flaw, words", [("other_ids", "the weight gathers use different index tensors"),
                                         ("negative_ids", "cannot prove the routing ids lie in [0, E)")])
def test_pair_gather_einsum_flaws_are_left_alone(flaw, words):
    rec = compile_and_compare(PairGatherEinsum(flaw=flaw), (torch.randn(19, 12),))
    assert not matches(rec)
    assert any(words in n.reason for n in near_misses(rec)), [n.reason for n in near_misses(rec)]


# ---------------------------------------------------------------------------------------
# Sort + split loop


class Sorted(nn.Module):
    def __init__(self, d=12, inter=16, E=5, k=2, counts="histc", wrong_weight_order=False):
        super().__init__()
        self.E, self.k, self.counts, self.wrong = E, k, counts, wrong_weight_order
        self.router = nn.Linear(d, E, bias=False)
        self.w_up = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w_down = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)

    def forward(self, x):
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        flat = ids.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        tok = perm // self.k
        rows = x[tok]
        counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1).long()
        outs = [F.relu(c @ self.w_up[e]) @ self.w_down[e] for e, c in enumerate(rows.split(counts.tolist()))]
        order = torch.arange(perm.shape[0]) if self.wrong else perm
        y = torch.cat(outs) * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, y)


def test_sorted_rewritten():
    rec = compile_and_compare(Sorted(), (torch.randn(21, 12),))
    assert_rewritten(rec, "sort_grouped", E=5, k=2, activation="relu")


def test_sorted_with_weights_in_the_wrong_order_is_left_alone():
    rec = compile_and_compare(Sorted(wrong_weight_order=True), (torch.randn(21, 12),))
    assert not matches(rec)
    assert any("w.reshape(-1)[perm, None]" in n.reason for n in near_misses(rec))


EXPECTED_ROUTERS = {
    "moe_deepseek_gate.py": "sigmoid_bias_group_topk",
    "moe_deepseek_train.py": "softmax_topk_renorm",
    "moe_dense_gate.py": "softmax_topk",
    "moe_gshard_top2.py": "argmax_capacity",
    "moe_loop_modulelist.py": "softmax_topk_renorm",
    "moe_loop_stacked.py": "topk_softmax",
    "moe_pair_gather_bmm.py": "softmax_topk",
    "moe_sort_grouped_mm.py": "softmax_topk_renorm",
}


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_gating_pass_names_the_router(name):
    from blazec.backend import run_pre_grad_passes
    from blazec.config import BlazeConfig

    model, inputs = load_example(name).make()
    reports = []

    def backend(gm, example_inputs):
        gm, reps = run_pre_grad_passes(gm, example_inputs, BlazeConfig.from_options({}))
        reports.extend(reps)
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    gating = next(r for r in reports if r.name == "moe_gating")
    assert len(gating.notes) == 1 and gating.notes[0].endswith(": " + EXPECTED_ROUTERS[name]), gating.notes


@pytest.mark.parametrize("name", [n for n in EXAMPLE_FILES if n != "moe_gshard_top2.py"])
def test_dynamic_batch_sizes_compile_once(name):
    """dynamic=True with the batch dim marked unbacked: batch 7, 64 and 1 share one compile.

    Without ``mark_unbacked`` Dynamo specializes size 1 and recompiles once for it. (The GShard
    example computes its capacity in Python from T, so it is specialized per T by design.)
    """
    import functools

    import torch._dynamo.testing

    from blazec.backend import blaze

    model, (x0,) = load_example(name).make()
    counter = torch._dynamo.testing.CompileCounterWithBackend(functools.partial(blaze, options=EAGER))
    compiled = torch.compile(model, backend=counter, dynamic=True)
    with report.capture() as records:
        for b in (7, 64, 1):
            x = torch.randn(b, *x0.shape[1:])
            torch._dynamo.decorators.mark_unbacked(x, 0)
            torch.testing.assert_close(compiled(x), model(x), atol=2e-5, rtol=1e-4)
    assert counter.frame_count == 1
    assert len(matches(records[0])) == 1


def test_sorted_grouped_mm_bf16_no_worse_than_eager():
    """The torch._grouped_mm spelling (bf16 only): rewritten, and its bf16 error against an fp32
    run of the same model is no worse than eager bf16's own error (outputs and gradients)."""
    mod = load_example("moe_sort_grouped_mm.py")
    m32, (x32,) = mod.make()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ref = run_train(m32, (x32,))  # fp32: the split-loop spelling
    eager = run_train(copy.deepcopy(m16), (x32.bfloat16(),))
    with report.capture() as records:
        got = run_train(torch.compile(m16, backend="blaze", options=EAGER), (x32.bfloat16(),))
    assert_rewritten(records[0], "sort_grouped", dtype="bfloat16")

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    pairs = [(got[0], eager[0], ref[0])] + [(got[1][n], eager[1][n], ref[1][n]) for n in ref[1]] \
        + [(got[2][0], eager[2][0], ref[2][0])]
    for g, e, r in pairs:
        assert err(g, r) <= 1.5 * err(e, r) + 1e-3, (err(g, r), err(e, r))


# ---------------------------------------------------------------------------------------
# Randomized GShard/Switch configurations, and an auxiliary loss beside the rewrite

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(T=st.integers(1, 48), E=st.integers(2, 64), top_k=st.sampled_from([1, 2]),
       cf=st.sampled_from([0.1, 0.5, 1.0, 2.0, 8.0]), act=st.sampled_from(["relu", "gelu"]),
       bias=st.booleans(), skew=st.booleans(), seed=st.integers(0, 2**16))
def test_gshard_property(T, E, top_k, cf, act, bias, skew, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = GShard(d=8, inter=12, E=E, top_k=top_k, capacity_factor=cf, act=act, bias=bias)
    if skew:  # most tokens prefer expert 0: heavy drops there, empty experts elsewhere
        with torch.no_grad():
            model.wg.weight[0] += 3.0
    x = torch.randn(T, 8) + (1.0 if skew else 0.0)
    rec = compile_and_compare(model, (x,), atol=5e-5, rtol=5e-4)
    (m,) = matches(rec)
    assert m.form == f"gshard_top{top_k}" and m.details["E"] == E


class LoopWithAuxLoss(nn.Module):
    """A Mixtral-style loop MoE that also returns the Switch load-balancing loss, computed from
    the router probabilities and the same one-hot mask the loop uses."""

    def __init__(self, d=12, inter=16, E=6, k=2):
        super().__init__()
        self.E, self.k = E, k
        self.gate = nn.Linear(d, E, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(d, inter, bias=False) for _ in range(E))
        self.w2 = nn.ModuleList(nn.Linear(inter, d, bias=False) for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        mask = F.one_hot(ids, self.E)  # [T, k, E]
        aux = self.E * (mask.float().mean(dim=(0, 1)) * probs.mean(dim=0)).sum()
        out = torch.zeros_like(x)
        emask = mask.permute(2, 1, 0)
        for e in range(self.E):
            slot, tok = torch.where(emask[e])
            out.index_add_(0, tok, self.w2[e](F.silu(self.w1[e](x[tok]))) * w[tok, slot, None])
        return out + aux


def test_aux_loss_passes_through_unchanged():
    rec = compile_and_compare(LoopWithAuxLoss(), (torch.randn(17, 12),))
    # the aux loss still reads the one_hot mask; the dispatch (where, index_add_) is gone
    assert_rewritten(rec, "static_loop_modulelist", allow=("one_hot(",), E=6, k=2, activation="silu")


class SortedScatterAdd(Sorted):
    """torchtitan's spelling of the combine: scatter_add over the token index broadcast to [S, d]."""

    def forward(self, x):
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        flat = ids.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        tok = perm // self.k
        counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1).long()
        outs = [F.relu(c @ self.w_up[e]) @ self.w_down[e] for e, c in enumerate(x[tok].split(counts.tolist()))]
        y = torch.cat(outs) * w.reshape(-1)[perm].unsqueeze(-1)
        return self.combine(x, tok.reshape(-1, 1).expand(-1, x.shape[1]), y)

    def combine(self, x, index, y):
        return torch.zeros_like(x).scatter_add(0, index, y)


def test_sorted_scatter_add_rewritten():
    rec = compile_and_compare(SortedScatterAdd(), (torch.randn(21, 12),))
    assert_rewritten(rec, "sort_grouped", E=5, k=2, activation="relu")


class SortedScatterAddKeptBase(SortedScatterAdd):
    """The out-of-place scatter_add leaves its zeros base as it was, and the code reads it after
    (``torch.scatter_add`` with keyword arguments)."""

    def combine(self, x, index, y):
        base = torch.zeros_like(x)
        return torch.scatter_add(input=base, dim=0, index=index, src=y) + 2.0 * base


def test_sorted_scatter_add_out_of_place_keeps_its_base():
    rec = compile_and_compare(SortedScatterAddKeptBase(), (torch.randn(21, 12),))
    assert_rewritten(rec, "sort_grouped", E=5, k=2)


class SortedUnpermute(Sorted):
    """Combine by inverse permutation: rows back to pair order, view [T, k, d], weighted slot sum."""

    def forward(self, x):
        T, d = x.shape
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        flat = ids.reshape(-1)
        perm = torch.argsort(flat)
        counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1).long()
        rows = x[perm // self.k]
        y = torch.cat([F.relu(c @ self.w_up[e]) @ self.w_down[e] for e, c in enumerate(rows.split(counts.tolist()))])
        y = y[torch.argsort(perm)]
        return (y.view(T, self.k, d) * w.unsqueeze(-1)).sum(dim=1)


def test_sorted_unpermute_rewritten():
    rec = compile_and_compare(SortedUnpermute(), (torch.randn(19, 12),))
    assert_rewritten(rec, "sort_grouped", E=5, k=2, activation="relu")
