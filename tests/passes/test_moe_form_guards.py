"""Guards of the dense-gate, sort, pair-gather and GShard matchers: code that only looks like the
form (an aliased in-place sum, topk over tokens, a slot sum with keepdim, a descending sort, a
bias that broadcasts per slot or is shared) is left alone with a reason, and the correct
spellings next to them are still rewritten with eager's numbers."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blazec import report
from tests.helpers import run_train
from tests.passes.test_moe_forms import assert_left_alone, assert_rewritten, compile_and_compare


# ---------------------------------------------------------------------------------------
# Dense gate


class DenseGate(nn.Module):
    """``variant``: "plain", "iadd" (``out += term``), "iadd_alias" (``+=`` and the base returned
    through an alias), "topk_dim0", "topk_default" (``topk(k)``), "topk_dim1", "scatter_multiply",
    "ids_dup", "extra_column" (the last expert added again as gate column -1)."""

    def __init__(self, variant, d=8, inter=12, E=4, k=2):
        super().__init__()
        self.v, self.k = variant, k
        self.router = nn.Linear(d, E)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, inter), nn.ReLU(), nn.Linear(inter, d))
                                     for _ in range(E))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        if self.v == "topk_dim0":
            w, i = probs.topk(self.k, dim=0)
        elif self.v == "topk_default":
            w, i = probs.topk(self.k)
        elif self.v == "topk_dim1":
            w, i = torch.topk(probs, self.k, 1)
        else:
            w, i = probs.topk(self.k, dim=-1)
        if self.v == "ids_dup":  # two equal ids in a row: scatter keeps one weight, the op would sum both
            i = probs.detach().topk(self.k, dim=-1)[1]
            i[:, 1] = i[:, 0]
        if self.v == "scatter_multiply":  # zeros * w: an all-zero gate
            gate = torch.zeros_like(probs).scatter(1, i, w, reduce="multiply")
        else:
            gate = torch.zeros_like(probs).scatter(1, i, w)
        out = torch.zeros_like(x)
        alias = out
        for e, expert in enumerate(self.experts):
            if self.v.startswith("iadd"):
                out += gate[:, e:e + 1] * expert(x)
            else:
                out = out + gate[:, e:e + 1] * expert(x)
        if self.v == "extra_column":
            out = out + gate[:, -1, None] * self.experts[-1](x)
        return alias * 1.0 if self.v == "iadd_alias" else out


def test_dense_gate_aliased_inplace_sum_is_left_alone():
    rec = compile_and_compare(DenseGate("iadd_alias"), (torch.randn(12, 8),))
    assert_left_alone(rec, "of the expert outputs is also read by")


def test_dense_gate_extra_negative_column_is_left_alone():
    rec = compile_and_compare(DenseGate("extra_column"), (torch.randn(12, 8),))
    assert_left_alone(rec, "gate column(s) [-1] besides columns 0..3")


def test_dense_gate_ids_written_in_place_are_left_alone():
    rec = compile_and_compare(DenseGate("ids_dup"), (torch.randn(12, 8),))
    assert_left_alone(rec, "writes in place the routing ids")


def test_dense_gate_topk_over_tokens_is_left_alone():
    # topk over dim 0 with k == T: ids [T, E] that repeat within a row; scatter keeps the last
    rec = compile_and_compare(DenseGate("topk_dim0", E=8, k=4), (torch.randn(4, 8),))
    assert_left_alone(rec, "come from topk over dim 0")


@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
def test_dense_gate_scatter_with_reduce_is_left_alone():
    # scatter with reduce has no derivative: compared in inference
    model, x = DenseGate("scatter_multiply"), torch.randn(12, 8)
    with torch.no_grad(), report.capture() as records:
        ref = model(x)
        got = torch.compile(model, backend="blaze", options={"final_stage": "eager"})(x)
    torch.testing.assert_close(got, ref)
    (rec,) = records
    assert_left_alone(rec, "the dense gate scatter uses a reduce mode")


@pytest.mark.parametrize("variant", ["iadd", "topk_default", "topk_dim1"])
def test_dense_gate_accepted_spellings_rewritten(variant):
    rec = compile_and_compare(DenseGate(variant), (torch.randn(12, 8),))
    # with ``+=`` too, none of the chain (its in-place links, the experts, the gate) is left
    assert_rewritten(rec, "dense_gate", E=4, k=2, activation="relu")


# ---------------------------------------------------------------------------------------
# Sort + split loop, combined by index_add_ or by inverse permutation


class Sorted(nn.Module):
    """``variant`` picks the sort, the inverse permutation and the slot sum's spelling."""

    def __init__(self, variant, d=8, inter=12, E=4, k=2):
        super().__init__()
        self.v, self.E, self.k = variant, E, k
        self.router = nn.Linear(d, E, bias=False)
        self.w_up = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w_down = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)

    def forward(self, x):
        T, d = x.shape
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        flat = ids.reshape(-1)
        if self.v == "argsort_desc_positional":
            perm = torch.argsort(flat, -1, True)
        elif self.v == "sort_desc":
            perm = torch.sort(flat, descending=True)[1]
        else:
            perm = torch.argsort(flat)
        counts = torch.histc(flat.float(), bins=self.E, min=0, max=self.E - 1).long()
        rows = x[perm // self.k]
        y = torch.cat([F.relu(c @ self.w_up[e]) @ self.w_down[e] for e, c in enumerate(rows.split(counts.tolist()))])
        if self.v in ("argsort_desc_positional", "sort_desc"):
            y = y * w.reshape(-1)[perm, None]
            return torch.zeros_like(x).index_add_(0, perm // self.k, y)
        inv = torch.argsort(perm, descending=True) if self.v == "inverse_desc" else torch.argsort(perm)
        s = y[inv].view(T, self.k, d) * w.unsqueeze(-1)
        if self.v == "keepdim_positional":
            return s.sum(1, True)
        if self.v == "keepdim_false_positional":
            return s.sum(1, False)
        return s.sum(dim=1)


@pytest.mark.parametrize("variant, reason", [
    ("keepdim_positional", "keeps the slot dimension (keepdim=True)"),
    ("inverse_desc", "the sorted positions (the inverse permutation) are sorted in descending order"),
    ("argsort_desc_positional", "the expert ids are sorted in descending order"),
    ("sort_desc", "the expert ids are sorted in descending order"),
])
def test_sorted_lookalikes_are_left_alone(variant, reason):
    rec = compile_and_compare(Sorted(variant), (torch.randn(13, 8),))
    assert_left_alone(rec, reason)


def test_sorted_unpermute_positional_keepdim_false_rewritten():
    rec = compile_and_compare(Sorted("keepdim_false_positional"), (torch.randn(13, 8),))
    assert_rewritten(rec, "sort_grouped", E=4, k=2, activation="relu")


# ---------------------------------------------------------------------------------------
# Per-pair weight gather + bmm


class PairGather(nn.Module):
    def __init__(self, keepdim, d=8, inter=12, E=4, k=2, ids_3d=False, w_index=False, negative_ids=False,
                 cast=None):
        super().__init__()
        self.k, self.keepdim, self.ids_3d, self.w_index, self.negative = k, keepdim, ids_3d, w_index, negative_ids
        self.cast = cast
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)

    def forward(self, x):
        T, d = x.shape
        w, ids = torch.topk(F.softmax(self.router(x), dim=-1), self.k, dim=-1)
        if self.ids_3d:
            ids = ids.unsqueeze(-1)  # [T, k, 1]: the same pairs once flattened
        if self.negative:
            ids = ids - self.w1.shape[0]  # W[ids] counts them from the end: eager runs
        if self.cast is not None:
            ids = ids.to(self.cast)
        flat = ids.reshape(-1)
        xs = x.repeat_interleave(self.k, dim=0).unsqueeze(1)
        y = torch.bmm(F.gelu(torch.bmm(xs, self.w1[flat])), self.w2[flat]).squeeze(1)
        wb = w[..., None] if self.w_index else w.unsqueeze(-1)
        return (y.view(T, self.k, d) * wb).sum(1, self.keepdim)  # keepdim by position


def test_pair_gather_weights_broadcast_by_indexing_rewritten():
    rec = compile_and_compare(PairGather(False, w_index=True), (torch.randn(10, 8),))
    assert_rewritten(rec, "pair_weight_gather")


def test_pair_gather_with_3d_ids_is_left_alone():
    """[T, k, 1] ids flatten to the same pairs, but the op routes [T, k] ids: a near miss, not a
    failed compile."""
    rec = compile_and_compare(PairGather(False, ids_3d=True), (torch.randn(10, 8),))
    assert_left_alone(rec, "the routing ids have shape (10, 2, 1)")


def test_pair_gather_with_ids_not_from_topk_is_left_alone():
    """``W[ids - E]`` gathers the same experts in eager; the blaze op takes ids in [0, E) only,
    and was put in (its range error at run time, after a MATCH)."""
    rec = compile_and_compare(PairGather(False, negative_ids=True), (torch.randn(10, 8),))
    assert_left_alone(rec, "cannot prove the routing ids lie in [0, E)")


@pytest.mark.parametrize("cast", [torch.int32, torch.int64])
def test_pair_gather_with_cast_topk_ids_is_rewritten(cast):
    """The range proof follows an int32/int64 cast of the topk indices (it refused them)."""
    rec = compile_and_compare(PairGather(False, cast=cast), (torch.randn(10, 8),))
    assert_rewritten(rec, "pair_weight_gather")


def test_loop_with_int32_ids_and_eq_masks_is_rewritten():
    """``ids.int() == e`` masks: E from the topk behind the cast."""
    from tests.passes.models import Cfg, LoopMoE

    class Int32Ids(LoopMoE):
        def route(self, x):
            w, ids = super().route(x)
            return w, ids.int()

    rec = compile_and_compare(Int32Ids(Cfg(mask="eq")), (torch.randn(24, Cfg().d),))
    assert_rewritten(rec, "static_loop_modulelist")


def test_pair_gather_positional_keepdim_is_left_alone():
    rec = compile_and_compare(PairGather(True), (torch.randn(11, 8),))
    assert_left_alone(rec, "keeps the slot dimension (keepdim=True)")


def test_pair_gather_positional_keepdim_false_rewritten():
    rec = compile_and_compare(PairGather(False), (torch.randn(11, 8),))
    assert_rewritten(rec, "pair_weight_gather", E=4, k=2, activation="gelu")


# ---------------------------------------------------------------------------------------
# GShard top-2


class GShard(nn.Module):
    """``write``: an in-place write for tests/passes/test_moe_site_checks.py: "mask_early" (the
    first-choice mask right after it is made) or "ids_late" (the first-choice ids at the end)."""

    def __init__(self, b_in_shape, b_out_shape, d=8, inter=12, E=4, positional_keepdim=False, write=None,
                 drop_at_third=False, tensor_capacity=False):
        super().__init__()
        self.E, self.positional, self.write, self.third = E, positional_keepdim, write, drop_at_third
        self.tensor_capacity = tensor_capacity
        self.wg = nn.Linear(d, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)
        self.b_in = nn.Parameter(torch.randn(*b_in_shape) * 0.3)
        self.w_out = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)
        self.b_out = nn.Parameter(torch.randn(*b_out_shape) * 0.3)

    def forward(self, x):
        T, E = x.shape[0], self.E
        C = math.ceil(2 * T / E)
        gates = F.softmax(self.wg(x), dim=1)
        idx1 = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(idx1, E)
        if self.write == "mask_early":
            mask1[:, 0] = 0
        idx2 = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(idx2, E)
        loc1 = torch.cumsum(mask1, dim=0) - 1
        count1 = torch.sum(mask1, 0, True) if self.positional else torch.sum(mask1, dim=0, keepdim=True)
        loc2 = torch.cumsum(mask2, dim=0) - 1 + count1
        drop = T // 3 if self.third else C  # T // 3: a drop test one_hot's capacity does not fix
        if self.tensor_capacity:
            drop = torch.tensor(C)
        mask1 = mask1 * torch.lt(loc1, drop)
        mask2 = mask2 * torch.lt(loc2, drop)
        l1, l2 = torch.sum(loc1 * mask1, dim=1), torch.sum(loc2 * mask2, dim=1)
        g1, g2 = (gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)
        den = torch.clamp(g1 + g2, min=torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / den, g2 / den
        combine = (g1[:, None] * mask1)[:, :, None] * F.one_hot(l1, C)[:, None, :] \
            + (g2[:, None] * mask2)[:, :, None] * F.one_hot(l2, C)[:, None, :]
        ein = torch.einsum("tec,td->ecd", combine.bool().to(x.dtype), x)
        eo = torch.bmm(F.relu(torch.bmm(ein, self.w_in) + self.b_in), self.w_out) + self.b_out
        if self.write == "ids_late":
            idx1.zero_()
        return torch.einsum("tec,ecd->td", combine.to(x.dtype), eo)


@pytest.mark.parametrize("b_in, b_out, T, shown", [
    ((4, 12), (4, 8), 8, "[4, 8]"),  # C = ceil(2 * 8 / 4) = 4 = E: [E, out] is added per slot
    ((1, 1, 12), (1, 1, 8), 12, "[1, 1, 8]"),  # shared by all experts
    ((12,), (8,), 12, "[8]"),
])
def test_gshard_bias_not_per_expert_is_left_alone(b_in, b_out, T, shown):
    rec = compile_and_compare(GShard(b_in, b_out), (torch.randn(T, 8),))
    assert_left_alone(rec, f"the down bias has shape {shown}: only a per-expert [E, 1, out]")


@pytest.mark.parametrize("positional_keepdim", [False, True])
def test_gshard_per_expert_bias_rewritten(positional_keepdim):
    model = GShard((4, 1, 12), (4, 1, 8), positional_keepdim=positional_keepdim)
    rec = compile_and_compare(model, (torch.randn(8, 8),))
    assert_rewritten(rec, "gshard_top2", E=4, k=2, capacity=4, activation="relu", bias=True)


def _train_compare(compiled, model, x):
    ref, got = run_train(model, (x,)), run_train(compiled, (x,))
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=1e-4)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], atol=2e-5, rtol=1e-4, msg=lambda m: f"grad {n}: {m}")
    torch.testing.assert_close(got[2][0], ref[2][0], atol=2e-5, rtol=1e-4)


def _gshard_capacities(recs) -> list:
    return [m.details["capacity"] for r in recs for p in r.pass_reports for m in p.matches
            if m.form.startswith("gshard")]


def _count_route_calls(monkeypatch) -> list:
    """The ops that run (blaze's implementations are looked up on every call)."""
    import blazec.ops.route as route

    calls, get_impl = [], route.get_impl
    monkeypatch.setattr(route, "get_impl", lambda op, dev: (calls.append(op), get_impl(op, dev))[1])
    return calls


@pytest.mark.parametrize("final_stage", ["eager", "inductor"])
def test_gshard_under_dynamic_shapes_rewritten(final_stage, monkeypatch) -> None:
    """Under dynamic=True the capacity ceil(2 * cf * T / E) is a SymInt, but one_hot(positions,
    capacity) makes Dynamo guard it to a constant: the site is rewritten with that capacity
    and eager's numbers (it was left alone as "a size computed at run time"). Dynamo traces
    twice here (the float capacity factor is a symbol, then fixed, and the second trace's
    guard is in terms of that symbol): the graph that runs, the last, is rewritten and the
    op runs."""
    from tests.helpers import load_example

    model, (x,) = load_example("moe_gshard_top2.py").make(batch=2, seq=8)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="blaze", options={"final_stage": final_stage},
                             dynamic=True)
    calls = _count_route_calls(monkeypatch)
    with report.capture() as recs:
        _train_compare(compiled, model, x)
    assert _gshard_capacities(recs[-1:]) == [4]  # ceil(2 * 1.0 * 16 / 8)
    assert "moe_route" in calls


def test_gshard_recompiled_for_a_second_batch_size_rewritten(monkeypatch) -> None:
    """A second batch size recompiles with T symbolic (automatic dynamic shapes): rewritten
    with that graph's capacity, eager's numbers at both sizes."""
    from tests.helpers import load_example

    mod = load_example("moe_gshard_top2.py")
    model, (x,) = mod.make(batch=2, seq=8)
    _, (x3,) = mod.make(batch=3, seq=8)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="blaze", options={"final_stage": "eager"})
    calls = _count_route_calls(monkeypatch)
    with report.capture() as recs:
        _train_compare(compiled, model, x)
        _train_compare(compiled, model, x3)
    assert _gshard_capacities(recs) == [4, 6]
    assert calls.count("moe_route") == 4  # per step: the route, and the one without pairs of weight 0


def test_gshard_with_an_unbacked_batch_says_why() -> None:
    """With the batch dim unbacked the capacity is data-dependent: Dynamo breaks the graph at
    one_hot(positions, C). The near miss said "buffer positions are not one_hot(position,
    capacity)"; it now names the graph break and what to do."""
    from tests.helpers import load_example

    model, (x,) = load_example("moe_gshard_top2.py").make(batch=2, seq=8)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="blaze", options={"final_stage": "eager"})
    torch._dynamo.decorators.mark_unbacked(x, 0)
    with report.capture() as recs:
        out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=2e-5, rtol=1e-4)
    reasons = [n.reason for r in recs for p in r.pass_reports for n in p.near_misses if n.form == "gshard_capacity"]
    assert any("come from another graph: Dynamo broke the graph before them" in r for r in reasons), reasons


def test_gshard_with_a_tensor_capacity_says_so() -> None:
    model, x = GShard((4, 1, 12), (4, 1, 8), tensor_capacity=True), torch.randn(12, 8)
    rec = compile_and_compare(model, (x,))
    assert_left_alone(rec, "lt(locations, capacity) is a tensor")


def test_gshard_with_a_symbolic_drop_test_says_so() -> None:
    """A drop test lt(locations, T // 3) that one_hot's guarded capacity does not fix stays
    symbolic under dynamic shapes: left alone with that reason, eager's numbers."""
    model, x = GShard((4, 1, 12), (4, 1, 8), drop_at_third=True), torch.randn(12, 8)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="blaze", options={"final_stage": "eager"},
                             dynamic=True)
    with report.capture() as recs:
        _train_compare(compiled, model, x)
    reasons = [n.reason for r in recs for p in r.pass_reports for n in p.near_misses]
    assert any("is a size computed at run time that the graph does not fix" in r for r in reasons), reasons
    assert not _gshard_capacities(recs)


class _Llama4Moe(nn.Module):
    """HF's Llama4TextMoe: sigmoid top-k scores scale every expert's input; bmm experts."""

    def __init__(self, d=16, inter=12, E=4, k=1):
        super().__init__()
        self.d, self.E, self.k = d, E, k
        self.router = nn.Linear(d, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, d, 2 * inter) * d**-0.5)
        self.down_proj = nn.Parameter(torch.randn(E, inter, d) * inter**-0.5)

    def forward(self, x):
        x = x.reshape(-1, self.d)
        logits = self.router(x)
        top, idx = torch.topk(logits, self.k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, top).transpose(0, 1).sigmoid()
        routed_in = x.repeat(scores.shape[0], 1) * scores.reshape(-1, 1)
        gate, up = torch.bmm(routed_in.view(self.E, -1, self.d), self.gate_up_proj).chunk(2, dim=-1)
        out = torch.bmm(up * F.silu(gate), self.down_proj).view(-1, self.d)
        return out.view(self.E, -1, self.d).sum(dim=0)


def test_llama4_dense_experts_are_reported_not_rewritten() -> None:
    """They were neither rewritten nor reported: the scores scale the experts' input, which the
    op does not express."""
    torch.manual_seed(0)
    rec = compile_and_compare(_Llama4Moe(), (torch.randn(2, 5, 16),))
    assert_left_alone(rec, "the scores scale each expert's input", form="dense_bmm")
