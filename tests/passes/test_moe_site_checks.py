"""The checks every matched MoE site passes before the rewrite (passes/moe_site_checks.py): an
in-place write between the dispatch's reads and its end, autocast, and experts the blaze op
would reject each leave the site alone with a reason, and eager's numbers; the same loop
without them, and in-place writes the rewrite does not reorder, are still rewritten."""

import contextlib
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blazec import report
from tests.helpers import blaze_unless_unchanged
from tests.passes.test_moe_forms import assert_rewritten, compile_and_compare, matches, near_misses


class Expert(nn.Module):
    def __init__(self, d, inter, up_width=None):
        super().__init__()
        self.w1 = nn.Linear(d, inter, bias=False)
        self.w3 = nn.Linear(d, inter if up_width is None else up_width, bias=False)
        self.w2 = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Loop(nn.Module):
    """The static loop (one_hot mask, torch.where, index_add_) with one ``variant``:
    "plain"; in-place writes the rewrite would reorder: "w_mid" (routing weights scaled after
    expert 1), "ids_after_mask", "x_mid", "mask_setitem", "acc_mid", "x_mid_inplace_by_position",
    "x_mid_inplace_module", "w_mid_aten_overload" (the write spelled ``F.hardtanh(x, -0.5, 0.5,
    True)``, ``nn.LeakyReLU(0.2, inplace=True)(x)``, ``aten.mul_.Scalar(w, 0.5)``); writes it
    does not reorder: "unused_inplace_after", "unused_foreach_after" (a clamp or a
    ``_foreach_mul_`` in place whose result is unused, after the dispatch),
    "renorm_inplace" (``w /= w.sum()`` before the dispatch reads w, accumulator made first),
    "x_after" (x scaled after the dispatch ended, which matters only with a backward: the op keeps x
    and w for it, the loop gathered copies): "x_data_after", "w_data_after", "w_nograd_after";
    and an expert weight, which the op's recompute mode reads again in backward: "expert_data_after";
    "autocast" (experts under torch.autocast); "autocast_other_off" (inside it, a block that
    turns off CUDA's autocast: the CPU's stays on), "autocast_same_off" (one that turns off the
    CPU's: rewritten); "router_autocast_off" (the router in an
    ``autocast(enabled=False)`` block: rewritten);
    grad mode: "expert_nograd" (expert 1 frozen by running it under torch.no_grad()),
    "rows_nograd" (every expert's gathered rows taken under no_grad), "ids_nograd" (the
    token/slot indices found under no_grad: no float math, rewritten), "loop_nograd" (the whole
    loop under no_grad, its accumulator made outside it: rewritten);
    experts the op rejects: "inter_differs", "up_width1"."""

    def __init__(self, variant, d=16, inter=12, E=4, k=2):
        super().__init__()
        self.v, self.E, self.k = variant, E, k
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(
            Expert(d, inter + 4 * (variant == "inter_differs" and e == 1), 1 if variant == "up_width1" else None)
            for e in range(E))

    def forward(self, x):
        x = x * 1.0  # a tensor of the graph's own, so that in-place writes to it are legal
        acc = torch.zeros_like(x)
        if self.v == "router_autocast_off":  # ERNIE 4.5 keeps its router in fp32 this way
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
                probs = F.softmax(self.gate(x), dim=-1)
        else:
            probs = F.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        if self.v == "renorm_inplace":
            w /= w.sum(dim=-1, keepdim=True)
        else:
            w = w / w.sum(dim=-1, keepdim=True)
        mask = F.one_hot(ids, self.E).permute(2, 1, 0)
        if self.v == "ids_after_mask":
            ids.copy_(ids.flip(-1))
        if self.v == "mask_setitem":
            mask[:, 1] = 0
        if self.v == "loop_nograd":
            with torch.no_grad():
                acc = self._loop_nograd(x, w, mask, acc)
            return acc + x  # a gradient for the loss: the experts get none, in eager as in blaze
        for e in range(self.E):
            if self.v == "ids_nograd":
                with torch.no_grad():
                    slot, tok = torch.where(mask[e])
            else:
                slot, tok = torch.where(mask[e])
            if self.v == "expert_nograd" and e == 1:
                with torch.no_grad():
                    y = self.experts[e](x[tok])
                y = y * w[tok, slot, None]
            elif self.v == "rows_nograd":
                with torch.no_grad():
                    rows = x[tok]
                y = self.experts[e](rows) * w[tok, slot, None]
            elif self.v == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = self.experts[e](x[tok])
                y = y.float() * w[tok, slot, None]
            elif self.v in ("autocast_other_off", "autocast_same_off"):  # an inner block turns one device's off
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    with torch.autocast("cuda" if self.v == "autocast_other_off" else "cpu", enabled=False):
                        y = self.experts[e](x[tok])
                y = y.float() * w[tok, slot, None]
            elif self.v == "index_select_method":
                y = self.experts[e](x.index_select(0, tok)) * w[tok, slot, None]
            elif self.v == "interleaved":  # gpt-oss style gate | up columns interleaved
                gu = torch.cat([self.experts[e].w1(x[tok]), self.experts[e].w3(x[tok])], dim=-1)
                y = self.experts[e].w2(F.silu(gu[..., ::2]) * gu[..., 1::2]) * w[tok, slot, None]
            else:
                y = self.experts[e](x[tok]) * w[tok, slot, None]
            if self.v == "index_put_iadd":  # Mistral's reference code
                acc[tok] += y
            elif self.v == "scatter_add_":
                acc.scatter_add_(0, tok[:, None].expand(-1, acc.shape[1]), y)
            elif self.v == "scatter_add_expand_as":
                acc.scatter_add_(0, tok[..., None].expand_as(y), y)
            elif self.v == "index_put_accumulate":
                acc.index_put_((tok,), y, accumulate=True)
            elif self.v == "index_add_chain":  # out of place: a new accumulator per expert
                acc = acc.index_add(0, tok, y)
            else:
                acc.index_add_(0, tok, y.to(acc.dtype))
            if e == 1 and self.v == "w_mid":
                w.mul_(0.5)
            if e == 1 and self.v == "x_mid":
                x.mul_(2.0)
            if e == 1 and self.v == "acc_mid":
                acc.mul_(2.0)
            if e == 1 and self.v == "x_data_mid":  # Dynamo: torch._C._autograd._get_data_attr
                x.data.mul_(2.0)
            if e == 1 and self.v == "w_chunk_mid":  # a piece of a tuple-valued view op
                w.chunk(2, 1)[1].zero_()
            if e == 1 and self.v == "x_mid_inplace_by_position":  # as nn.Hardtanh(inplace=True) calls it
                F.hardtanh(x, -0.5, 0.5, True)
            if e == 1 and self.v == "x_mid_inplace_module":
                nn.LeakyReLU(0.2, inplace=True)(x)
            if e == 1 and self.v == "w_mid_aten_overload":
                torch.ops.aten.mul_.Scalar(w, 0.5)
        out = acc + 0.0
        if self.v == "x_after":
            x.mul_(3.0)
            out = out + x
        if self.v == "x_data_after":
            x.data.mul_(3.0)
        if self.v == "w_data_after":
            w.data.mul_(2.0)
        if self.v == "w_nograd_after":
            with torch.no_grad():
                w.mul_(0.5)
        if self.v == "expert_data_after":
            self.experts[0].w1.weight.data.mul_(0.5)
        if self.v in ("unused_inplace_after", "unused_foreach_after"):  # result unused, write read: not dead
            r = x * 2.0
            if self.v == "unused_foreach_after":
                torch._foreach_mul_([r], 0.5)
            else:
                F.hardtanh(r, -0.5, 0.5, True)
            out = out + r
        return out


    def _loop_nograd(self, x, w, mask, acc):
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            acc.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return acc


def _compare(variant, **kw):
    torch.manual_seed(0)
    return compile_and_compare(Loop(variant, **kw), (torch.randn(24, 16),))


def _forward(variant, ctx=contextlib.nullcontext):
    """Compiled against eager, forward only (eager's autograd refuses most of these writes);
    returns (matches, near-miss reasons)."""
    torch.manual_seed(0)
    model, x = Loop(variant), torch.randn(24, 16)
    with torch.no_grad(), ctx():
        ref = model(x)
        with report.capture() as recs:
            got = torch.compile(model, backend=functools.partial(blaze_unless_unchanged, options={"final_stage": "eager"}))(x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    return [m for r in recs for m in matches(r)], [n.reason for r in recs for n in near_misses(r)]


def test_loop_rewritten_with_a_write_before_the_dispatch_reads() -> None:
    assert_rewritten(_compare("plain"), "static_loop_modulelist")
    assert_rewritten(_compare("renorm_inplace"), "static_loop_modulelist")


def test_loop_rewritten_with_a_write_after_the_dispatch() -> None:
    found, reasons = _forward("x_after")
    assert [m.form for m in found] == ["static_loop_modulelist"], reasons


@pytest.mark.parametrize("variant", ["unused_inplace_after", "unused_foreach_after"])
def test_an_unused_inplace_call_survives_the_rewrites_dead_code_removal(variant) -> None:
    """``F.hardtanh(r, -0.5, 0.5, True)`` or ``torch._foreach_mul_([r], 0.5)``, whose result
    nothing reads, writes r, which the output reads; the dead-code removal after a rewrite
    erased them (inplace passed by position was not seen as a write, nor a write by a function
    whose name starts with _), and the output lost the clamp or the scaling."""
    assert_rewritten(_compare(variant), "static_loop_modulelist")


@pytest.mark.parametrize("variant, what, options", [
    ("x_data_after", "the expert input", None), ("w_data_after", "the routing weights", None),
    ("w_nograd_after", "the routing weights", None),
    ("expert_data_after", "an expert parameter", {"moe_recompute": "recompute_gemm1"}),
])
def test_loop_left_alone_when_a_kept_input_is_written_after_the_dispatch(variant, what, options) -> None:
    """The loop's backward reads the gathered x[tok] and w[tok, slot]; the op's would read x and
    w after the write (wrong gradients through ``.data``, autograd's version error otherwise).
    The recompute mode's backward would recompute GEMM 1 from the expert weight a ``.data``
    write changed, where the loop kept GEMM 1's result."""
    torch.manual_seed(0)
    rec = compile_and_compare(Loop(variant), (torch.randn(24, 16),),
                              options={"final_stage": "eager", **(options or {})})
    assert not matches(rec)
    (reason,) = [n.reason for n in near_misses(rec)]
    assert f"writes in place {what}" in reason and "after the dispatch" in reason, reason


class StackedWrite(nn.Module):
    """The loop over 3-D stacked expert weights (``F.linear(x[tok], P[e])``), which writes the
    gate weights in place after the dispatch: under no_grad ("nograd", a weight constraint) or
    through ``.data`` ("data"). With an x that needs no gradient eager keeps no gate weight for
    backward, so neither write reaches its gradients."""

    def __init__(self, variant, d=16, inter=12, E=4, k=2):
        super().__init__()
        self.v, self.E, self.k = variant, E, k
        self.router = nn.Linear(d, E, bias=False)
        self.w_gate = nn.Parameter(torch.randn(E, inter, d) * d ** -0.5)
        self.w_up = nn.Parameter(torch.randn(E, inter, d) * d ** -0.5)
        self.w_down = nn.Parameter(torch.randn(E, d, inter) * inter ** -0.5)

    def forward(self, x):
        w, ids = torch.topk(F.softmax(self.router(x), -1), self.k, -1)
        w = w / w.sum(-1, keepdim=True)
        acc = torch.zeros_like(x)
        mask = F.one_hot(ids, self.E).permute(2, 1, 0)
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            r = x[tok]
            h = F.silu(F.linear(r, self.w_gate[e])) * F.linear(r, self.w_up[e])
            acc.index_add_(0, tok, F.linear(h, self.w_down[e]) * w[tok, slot, None])
        if self.v == "nograd":
            with torch.no_grad():
                self.w_gate.mul_(0.5)
        else:
            self.w_gate.data.mul_(0.5)
        return acc


@pytest.mark.parametrize("variant, recompute", [("nograd", False), ("nograd", True), ("data", True)])
def test_loop_left_alone_when_an_expert_weight_is_written_after_the_dispatch(variant, recompute) -> None:
    """The op keeps every expert weight for backward: the no_grad write would fail autograd's
    version check, which eager (keeping none) passes, and after the ``.data`` write the
    recompute mode's GEMM 1 would read the halved gate weights (wrong gradients, no error)."""
    import copy

    from tests.helpers import loss_of

    def step(model, x):  # x needs no gradient (a frozen input), unlike run_train's inputs
        out = model(x)
        loss_of(out).backward()
        return out.detach(), {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters()}

    torch.manual_seed(0)
    model, x = StackedWrite(variant), torch.randn(24, 16)
    options = {"final_stage": "eager", **({"moe_recompute": "recompute_gemm1"} if recompute else {})}
    ref = step(copy.deepcopy(model), x)
    with report.capture() as recs:
        got = step(torch.compile(model, backend="blaze", options=options), x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    (rec,) = recs
    assert not matches(rec)
    (reason,) = [n.reason for n in near_misses(rec)]
    assert "writes in place an expert parameter (w_gate)" in reason and "recompute_gemm1" in reason, reason


READ = "writes in place a tensor the dispatch reads"
IDS = "writes in place the routing ids"


@pytest.mark.parametrize("variant, written, why", [
    ("w_mid", "in-place mul_", READ), ("ids_after_mask", "in-place copy_", IDS), ("x_mid", "in-place mul_", READ),
    ("mask_setitem", "item assignment", READ), ("x_data_mid", "in-place mul_", READ),
    ("w_chunk_mid", "in-place zero_", READ), ("x_mid_inplace_by_position", "in-place hardtanh", READ),
    ("x_mid_inplace_module", "in-place leaky_relu", READ), ("w_mid_aten_overload", "in-place mul_.Scalar", READ),
])
def test_loop_left_alone_when_a_read_tensor_is_written_in_place(variant, written, why) -> None:
    found, reasons = _forward(variant)
    assert not found
    assert any(written in r and why in r for r in reasons), reasons


@pytest.mark.parametrize("variant", ["expert_nograd", "rows_nograd"])
def test_loop_left_alone_when_part_of_it_runs_without_grad(variant) -> None:
    """Eager leaves a no_grad expert's weights without gradients and sends no dx through rows
    taken under no_grad; the rewrite, one autograd node, gave both (dx off by 0.24, the frozen
    expert's weights trained)."""
    rec = _compare(variant)
    assert not matches(rec)
    assert any("runs with grad disabled inside the dispatch" in n.reason for n in near_misses(rec)), \
        [n.reason for n in near_misses(rec)]


@pytest.mark.parametrize("variant", ["ids_nograd", "loop_nograd"])
def test_loop_rewritten_when_grad_mode_changes_nothing_it_replaces(variant) -> None:
    assert_rewritten(_compare(variant), "static_loop_modulelist")


def test_an_autocast_block_outside_the_dispatch_is_no_reason_to_refuse() -> None:
    """Any autocast node in the graph refused every site ("the naive expert GEMMs run in the
    autocast dtype"), ERNIE 4.5's fp32 router block among them."""
    assert_rewritten(_compare("router_autocast_off"), "static_loop_modulelist")


def test_loop_left_alone_under_autocast() -> None:
    """An autocast region in the compiled code, and autocast around the call (Dynamo traces
    under the ambient state and guards on it)."""
    found, reasons = _forward("autocast")
    assert not found and any("autocast region" in r for r in reasons), reasons
    found, reasons = _forward("autocast_other_off")  # the block disables CUDA's autocast only
    assert not found and any("autocast region" in r for r in reasons), reasons
    assert_rewritten(_compare("autocast_same_off"), "static_loop_modulelist")
    found, reasons = _forward("plain", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert not found
    assert any("torch.autocast is enabled for cpu" in r and "bfloat16" in r for r in reasons), reasons


@pytest.mark.parametrize("variant, words", [
    ("inter_differs", "w_gate[1] must have shape [out, in] = [12, 16], got [16, 16]"),
    ("up_width1", "w_up[0] must have shape [out, in] = [12, 16], got [1, 16]"),
])
def test_experts_the_op_rejects_are_left_alone(variant, words) -> None:
    rec = _compare(variant)
    assert not matches(rec)
    reasons = [n.reason for n in near_misses(rec)]
    assert any("the blaze op rejects this site's experts" in r and words in r for r in reasons), reasons


def test_rows_by_the_index_select_method_are_rewritten() -> None:
    assert_rewritten(_compare("index_select_method"), "static_loop_modulelist")


def test_a_sliced_expert_hidden_is_not_taken_for_the_gathered_rows() -> None:
    """A basic-slicing getitem inside the expert (``gu[..., ::2]``) is not the rows gather; the
    pass failed with TypeError (unhashable slice) on Python 3.11 before."""
    rec = _compare("interleaved")
    assert not matches(rec)
    reasons = [n.reason for n in near_misses(rec)]
    assert reasons and not any("pass raised" in r for r in reasons), reasons
    assert any(r.startswith("expert 0: ") for r in reasons), reasons


def test_an_indexed_iadd_accumulator_is_named_with_its_fix() -> None:
    """``acc[tok] += y`` (an index_put of a gathered sum) is not matched; the near miss says to
    write index_add_, which the other tests show is rewritten."""
    rec = _compare("index_put_iadd")
    assert not matches(rec)
    reasons = [n.reason for n in near_misses(rec)]
    assert any("[idx] += ... (4 index_put(s) of a gathered sum) is not matched; write" in r
               and ".index_add_(0, idx, ...)" in r for r in reasons), reasons


def test_an_accumulating_index_put_is_named_with_its_fix() -> None:
    """``acc.index_put_((tok,), y, accumulate=True)`` was neither matched nor reported."""
    rec = _compare("index_put_accumulate")
    assert not matches(rec)
    reasons = [n.reason for n in near_misses(rec)]
    assert any("index_put_((idx,), ..., accumulate=True) (4 of expert outputs) is not matched; write" in r
               for r in reasons), reasons


@pytest.mark.parametrize("write, why", [("mask_early", READ), ("ids_late", IDS)])
def test_gshard_left_alone_when_a_tensor_derived_from_ids_is_written(write, why) -> None:
    """The op derives GShard's masks, positions and drops from ids: a write to a mask made from
    ids, even before anything reads it, or to ids after the masks, leaves the site alone."""
    from tests.passes.test_moe_form_guards import GShard

    torch.manual_seed(0)
    model, x = GShard((4, 1, 12), (4, 1, 8), write=write), torch.randn(24, 8)
    with torch.no_grad():
        ref = model(x)
        with report.capture() as recs:
            got = torch.compile(model, backend="blaze", options={"final_stage": "eager"})(x)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert not [m for r in recs for m in matches(r)]
    reasons = [n.reason for r in recs for n in near_misses(r)]
    assert any(why in r for r in reasons), reasons


def test_an_unrecognized_weight_spelling_is_named_in_the_reason() -> None:
    """A weight the matcher does not take (here ``P[e].t()`` inside F.linear) is named as the
    graph spells it, not only "not a parameter"."""

    class Stacked(nn.Module):
        def __init__(self, d=16, inter=12, E=4, k=2):
            super().__init__()
            self.E, self.k = E, k
            self.gate = nn.Linear(d, E, bias=False)
            self.w1 = nn.Parameter(torch.randn(E, d, inter) * d**-0.5)  # [in, out] per expert
            self.w2 = nn.Parameter(torch.randn(E, d, inter) * inter**-0.5)

        def forward(self, x):
            w, ids = torch.topk(F.softmax(self.gate(x), dim=-1), self.k, dim=-1)
            acc = torch.zeros_like(x)
            for e in range(self.E):
                tok, slot = torch.where(ids == e)
                h = F.relu(F.linear(x[tok], self.w1[e].t()))
                acc.index_add_(0, tok, F.linear(h, self.w2[e]) * w[tok, slot, None])
            return acc

    torch.manual_seed(0)
    rec = compile_and_compare(Stacked(), (torch.randn(24, 16),))
    assert not matches(rec)
    reasons = [n.reason for n in near_misses(rec)]
    assert any("expert 0: gate weight is t(getitem(" in r and "not a parameter or a stacked parameter" in r
               for r in reasons), reasons


class GatherRenorm(nn.Module):
    """DeepSeek-V3's router: weights gathered from the scores by the topk ids and renormalized
    in place (``w /= w.sum()``), then scaled into a fresh tensor the loop reads."""

    def __init__(self, variant="plain", d=16, inter=12, E=4, k=2):
        super().__init__()
        self.v, self.E, self.k = variant, E, k
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(Expert(d, inter) for _ in range(E))

    def forward(self, x):
        scores = self.gate(x).sigmoid()
        ids = torch.topk(scores, self.k, dim=-1)[1]
        w = scores.gather(1, ids)
        w /= w.sum(dim=-1, keepdim=True) + 1e-20
        # the loop reads a view of w by an op the view lists do not name: the storage shows it
        wl = torch.broadcast_to(w, w.shape) if self.v.startswith("alias") else w * 2.5
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, self.E).permute(2, 0, 1)
        for e in range(self.E):
            tok, slot = torch.where(mask[e])
            out.index_add_(0, tok, self.experts[e](x[tok]) * wl[tok, slot].unsqueeze(-1))
            if e == 1 and self.v == "alias_mid":
                w.mul_(3.0)
        if self.v == "alias_after":
            w.data.mul_(2.0)
        return out


def test_a_write_to_a_tensor_from_ids_that_only_feeds_the_weights_is_not_refused() -> None:
    """The gathered weights are derived from ids, but the op takes what is computed from them,
    where the code computed it; only tensors from ids that the replaced nodes read are guarded."""
    torch.manual_seed(0)
    assert_rewritten(compile_and_compare(GatherRenorm(), (torch.randn(24, 16),)), "static_loop_modulelist")


@pytest.mark.parametrize("variant", ["scatter_add_", "scatter_add_expand_as"])
def test_a_loop_summed_with_scatter_add_is_rewritten(variant) -> None:
    assert_rewritten(_compare(variant), "static_loop_modulelist")


def test_a_loop_summed_out_of_place_is_one_near_miss() -> None:
    rec = _compare("index_add_chain")
    assert not matches(rec)
    reasons = [n.reason for n in near_misses(rec)]
    assert len(reasons) == 1 and "out-of-place index_add" in reasons[0], reasons


@pytest.mark.parametrize("variant, why", [("alias_mid", READ), ("alias_after", "after the dispatch")])
def test_a_write_through_an_unlisted_view_of_the_weights_is_seen(variant, why) -> None:
    """``torch.broadcast_to(w, ...)`` is a view of w that the op-name lists do not cover: a write
    to w while or after the loop reads it must still refuse the site (it was rewritten, with an
    output error of 0.33)."""
    torch.manual_seed(0)
    rec = compile_and_compare(GatherRenorm(variant), (torch.randn(24, 16),))
    assert not matches(rec)
    assert any(why in n.reason for n in near_misses(rec)), [n.reason for n in near_misses(rec)]
