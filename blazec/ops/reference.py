"""CPU reference math of the blaze MoE ops: routing, expert forward and expert backward.

These are plain functions on already-validated tensors (validation lives in ``route.py`` and
``experts.py``). They are the implementation on every device until Triton kernels are
registered (see ``blazec.ops._registry``), and they are the oracle that kernel tests compare
against, so they favour clarity and determinism over speed.

Everything is index-based. Routing sorts pair ids by a key and counts with ``bincount``; the
experts loop over ``expert_offsets`` and gather only the rows each expert owns. Nothing here
builds a T x E x C tensor or a dense T x E x d tensor. The only T*k-sized temporaries are the
per-pair result buffers of the combine step, which are freed before the op returns.

Determinism: every write is either to a contiguous slice or through a permutation (unique
indices), and each token's k contributions are summed one slot at a time, in slot order, in
fp32 (fp64 for fp64 inputs). No atomics or ``index_add_`` are used, so results are bitwise
reproducible on any device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from blazec.ops.activations import hidden_backward, hidden_forward, is_gated

# ----------------------------------------------------------------------------------------------
# Weight-list layout helpers (shared with validation).
# ----------------------------------------------------------------------------------------------


def is_stacked(ts: Sequence[Tensor], ndim_expert: int) -> bool:
    """A weight (``ndim_expert`` 2) or bias (1) list is stacked when it holds one tensor with
    an expert dimension in front: ``[E, out, in]`` or ``[E, out]``."""
    return len(ts) == 1 and ts[0].dim() == ndim_expert + 1


def stacked_grad_shape(ts: Sequence[Tensor], ndim_expert: int) -> tuple[int, ...]:
    """Shape of the one stacked gradient the backward returns for a non-empty weight
    (``ndim_expert`` 2) or bias (1) list: the stacked tensor's shape, or ``[E, *shape]`` for E
    per-expert tensors. (An E-long list of gradients would cost the host an allocation, a
    pytree leaf and a pointer-table entry per expert; the autograd formula unbinds the stacked
    gradient into per-expert views instead.)"""
    if is_stacked(ts, ndim_expert):
        return tuple(ts[0].shape)
    return (len(ts), *ts[0].shape)


def expert_weight(ws: Sequence[Tensor], e: int) -> Tensor:
    """Expert ``e``'s ``[out, in]`` weight: a view, never a copy."""
    return ws[0][e] if is_stacked(ws, 2) else ws[e]


def expert_bias(bs: Sequence[Tensor], e: int) -> Optional[Tensor]:
    """Expert ``e``'s ``[out]`` bias, or None when the list is empty."""
    if len(bs) == 0:
        return None
    return bs[0][e] if is_stacked(bs, 1) else bs[e]


def accumulate_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the combine reduction: fp32, or fp64 when an input is fp64."""
    return torch.promote_types(torch.float32, torch.promote_types(x_dtype, w_dtype))


def _slot_sum(buf: Tensor, pair_pos: Tensor, T: int, k: int) -> Tensor:
    """y[t] = sum_j buf[pair_pos[t*k + j]], summed in slot order; -1 (dropped) reads zero.

    ``buf`` has one extra trailing zero row that dropped pairs point at, so the combine is a
    gather (each token reads its own k rows) rather than a scatter-add: deterministic anywhere.
    """
    zero_row = buf.shape[0] - 1
    pos = torch.where(pair_pos < 0, zero_row, pair_pos).view(T, k)
    out = buf.index_select(0, pos[:, 0])
    for j in range(1, k):
        out = out + buf.index_select(0, pos[:, j])
    return out


# ----------------------------------------------------------------------------------------------
# moe_route
# ----------------------------------------------------------------------------------------------


def moe_route(
    topk_ids: Tensor, num_experts: int, capacity: int, priority: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Group the T*k (token, slot) pairs by expert, dropping pairs past ``capacity``.

    Pair p = t*k + j. Within an expert the order is the priority order: "token" is increasing
    p, "slot" is increasing j*T + t (GShard: every first choice before any second choice).
    Returns (sorted_pairs [P], expert_offsets [E+1], pair_pos [P]), all int64, P = T*k.
    """
    T, k = topk_ids.shape
    P = T * k
    E = num_experts
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)

    # Pairs listed in priority order; a stable sort by expert id then keeps that order inside
    # each expert.
    order = torch.arange(P, device=dev, dtype=torch.int64)
    if priority == "slot":
        order = order.view(T, k).t().reshape(-1)
    _, perm = torch.sort(ids.index_select(0, order), stable=True)
    grouped = order.index_select(0, perm)  # all pairs, grouped by expert, in priority order
    grouped_ids = ids.index_select(0, grouped)

    counts = torch.bincount(ids, minlength=E)
    full_offsets = torch.zeros(E + 1, device=dev, dtype=torch.int64)
    full_offsets[1:] = torch.cumsum(counts, 0)
    rank = torch.arange(P, device=dev, dtype=torch.int64) - full_offsets.index_select(0, grouped_ids)

    if capacity >= 0:
        keep = rank < capacity
        kept_counts = counts.clamp(max=capacity)
    else:
        keep = torch.ones(P, device=dev, dtype=torch.bool)
        kept_counts = counts
    offsets = torch.zeros(E + 1, device=dev, dtype=torch.int64)
    offsets[1:] = torch.cumsum(kept_counts, 0)

    # Destination of each grouped entry: kept ones pack to the front in order, dropped ones go
    # to the tail. That makes ``dest`` a permutation, so the scatters below have unique indices
    # (deterministic, no host sync on the data-dependent kept count).
    dropped_rank = torch.cumsum((~keep).to(torch.int64), 0) - 1
    dest = torch.where(keep, offsets.index_select(0, grouped_ids) + rank, offsets[E] + dropped_rank)
    minus_one = torch.full((P,), -1, device=dev, dtype=torch.int64)
    sorted_pairs = minus_one.clone().scatter_(0, dest, torch.where(keep, grouped, -1))
    pair_pos = minus_one.scatter_(0, grouped, torch.where(keep, dest, -1))
    return sorted_pairs, offsets, pair_pos


# ----------------------------------------------------------------------------------------------
# moe_experts: forward
# ----------------------------------------------------------------------------------------------


def check_route_contents(sorted_pairs: Tensor, offs: list[int], pair_pos: Tensor) -> None:
    """That the route tensors are one route, as ``moe_route`` builds it: offsets from 0, not
    decreasing, to at most P kept pairs; the kept pairs are distinct pairs whose ``pair_pos``
    is their place in that order; every other pair has ``pair_pos`` -1. A hand-built route
    that is not one gave a wrong ``y`` or an IndexError deep in the loop. The reference runs
    it (O(P), on the host sync it makes anyway); the ops run it first for a route that
    ``moe_route`` did not mark (``experts._check_route``), since the kernels trust the route."""
    P = sorted_pairs.shape[0]
    kept = offs[-1]
    if offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])) or kept > P:
        raise ValueError(f"moe_experts: expert_offsets must start at 0, not decrease and end at <= T*k = {P} "
                         f"(as moe_route returns them), got {offs}")
    pairs = sorted_pairs[:kept]
    if kept and (int(pairs.min()) < 0 or int(pairs.max()) >= P):
        raise ValueError(f"moe_experts: sorted_pairs holds a pair outside [0, T*k = {P}) among its first {kept} "
                         "(kept) entries; it must come from moe_route")
    at = torch.full((P,), -1, dtype=torch.int64, device=pair_pos.device)
    at[pairs] = torch.arange(kept, device=pair_pos.device)
    if not torch.equal(pair_pos, at) or int((at >= 0).sum()) != kept:  # the second: a pair kept twice
        raise ValueError("moe_experts: pair_pos does not match sorted_pairs and expert_offsets (each kept pair's "
                         "place in sorted_pairs, -1 for the others); the three must come from one moe_route call")


def assert_route_async(sorted_pairs: Tensor, expert_offsets: Tensor, pair_pos: Tensor) -> None:
    """``check_route_contents`` as device-side asserts: no host sync (so also under CUDA graph
    capture), a handful of small kernels; a route that is not one fails with a device-side
    assert (a RuntimeError at once on the CPU)."""
    P = sorted_pairs.shape[0]
    if P == 0:
        return
    offs, kept = expert_offsets, expert_offsets[-1]
    pos = torch.arange(P, device=sorted_pairs.device)
    in_kept = pos < kept
    pairs_ok = torch.where(in_kept, (sorted_pairs >= 0) & (sorted_pairs < P), True).all()
    back = pair_pos[sorted_pairs.clamp(0, P - 1)]
    ok = (offs[0] == 0) & (offs[1:] >= offs[:-1]).all() & (kept <= P) & pairs_ok \
        & torch.where(in_kept, back == pos, True).all() & ((pair_pos >= 0).sum() == kept)
    torch._assert_async(ok, "moe_experts: the route is not one moe_route built (expert_offsets from 0, not "
                        "decreasing; kept pairs in [0, T*k); pair_pos their places, -1 for the others)")


def moe_experts_fwd(
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: Sequence[Tensor],
    w_up: Sequence[Tensor],
    w_down: Sequence[Tensor],
    b_gate: Sequence[Tensor],
    b_up: Sequence[Tensor],
    b_down: Sequence[Tensor],
    activation: str,
    weight_pos: str,
    recompute: bool,
    out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor]:
    """Forward of ``blazec::moe_experts``; returns (y [T, d], preact).

    For each kept pair (token t, slot j, weight w) of expert e:
        g = x[t] Wg^T + bg,  u = x[t] Wu^T + bu (gated),  h = act(g[, u])
        "output": c = w * (h Wd^T + bd)        "hidden": c = (w h) Wd^T + bd
    and y[t] = sum_j c, in slot order, in the accumulate dtype, cast to ``out_dtype``.
    GEMMs run in x's dtype (as nn.Linear would); the routing-weight multiply runs in the
    promoted dtype of h and topk_weights, as eager ``h * w`` would. In "hidden" mode ``w h``
    is cast back to x's dtype for the second GEMM, as eager code must to call the Linear.
    """
    T, d = x.shape
    k = topk_weights.shape[1]
    P = sorted_pairs.shape[0]
    E = expert_offsets.shape[0] - 1
    gated = is_gated(activation)
    I = expert_weight(w_gate, 0).shape[0]
    xdt = x.dtype
    acc_dt = accumulate_dtype(xdt, topk_weights.dtype)
    tw_flat = topk_weights.reshape(-1)

    # One extra zero row for dropped pairs to read (see _slot_sum).
    buf = torch.zeros(P + 1, d, device=x.device, dtype=acc_dt)
    if recompute:
        preact = x.new_empty(0)
    else:
        # Rows past expert_offsets[E] belong to dropped pairs; zero them so the output is
        # deterministic.
        preact = x.new_zeros(P, 2 * I if gated else I)

    offs = expert_offsets.tolist()  # one host sync: the per-expert loop bounds
    check_route_contents(sorted_pairs, offs, pair_pos)
    for e in range(E):
        s0, s1 = offs[e], offs[e + 1]
        if s1 == s0:
            continue
        pairs = sorted_pairs[s0:s1]
        xe = x.index_select(0, torch.div(pairs, k, rounding_mode="floor"))
        g = F.linear(xe, expert_weight(w_gate, e), expert_bias(b_gate, e))
        u = F.linear(xe, expert_weight(w_up, e), expert_bias(b_up, e)) if gated else None
        if not recompute:
            preact[s0:s1, :I] = g
            if gated:
                preact[s0:s1, I:] = u
        h = hidden_forward(activation, g, u)
        we = tw_flat.index_select(0, pairs).unsqueeze(1)
        wd, bd = expert_weight(w_down, e), expert_bias(b_down, e)
        if weight_pos == "output":
            c = F.linear(h, wd, bd) * we
        else:
            c = F.linear((h * we).to(xdt), wd, bd)
        buf[s0:s1] = c

    y = _slot_sum(buf, pair_pos, T, k)
    return y.to(out_dtype if out_dtype is not None else xdt), preact


# ----------------------------------------------------------------------------------------------
# moe_experts: backward
# ----------------------------------------------------------------------------------------------


def wide_grad(grad_y: Tensor, xdt: torch.dtype) -> bool:
    """Whether the backward takes grad_y's rows through a per-row power-of-two scale into x's
    16-bit dtype and keeps q = gy Wd in fp32 (see ``moe_experts_bwd``)."""
    return xdt in (torch.float16, torch.bfloat16) and grad_y.dtype in (torch.float32, torch.float64)


def row_scale(grad_y: Tensor) -> Tensor:
    """[T] fp32 powers of two that bring each row's largest |value| into [0.5, 1); 1 for a row
    of zeros or with a non-finite value. Multiplying by one is exact, dividing by it too."""
    amax = grad_y.detach().abs().amax(dim=1).float() if grad_y.shape[1] else grad_y.new_zeros(grad_y.shape[0])
    ok = torch.isfinite(amax) & (amax > 0)
    _, e = torch.frexp(torch.where(ok, amax, torch.ones_like(amax)))
    return torch.where(ok, torch.ldexp(torch.ones_like(amax), -e), torch.ones_like(amax)).float()


def moe_experts_bwd(
    grad_y: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: Sequence[Tensor],
    w_up: Sequence[Tensor],
    w_down: Sequence[Tensor],
    b_gate: Sequence[Tensor],
    b_up: Sequence[Tensor],
    b_down: Sequence[Tensor],
    preact: Tensor,
    activation: str,
    weight_pos: str,
    recompute: bool,
    overwrite_preact: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    r"""Backward of ``blazec::moe_experts``.

    ``overwrite_preact`` permits writing over ``preact``; the reference never does.

    Returns (dx, d_topk_weights, dw_gate, dw_up, dw_down, db_gate, db_up, db_down). Each
    gradient list holds one stacked tensor, ``[E, out, in]`` (weights) or ``[E, out]`` (biases),
    whether its input list was stacked or per-expert, and is empty for an empty input list
    (see ``stacked_grad_shape``).

    Derivation, for one kept pair n of expert e, with a = x[t] (row vector), scalar w,
    gy = dL/dy[t] and c the pair's contribution (y[t] = sum of c over the token's kept pairs,
    so dL/dc = gy for every kept pair; dropped pairs get no gradient):

        g = a Wg^T + bg,  u = a Wu^T + bu,  h = act(g, u)

    "output" mode, c = w * o with o = h Wd^T + bd:
        do  = w gy
        dw  = <gy, o> = <gy Wd, h> + <gy, bd>        (no need to recompute the second GEMM:
                                                     q = gy Wd is needed for dh anyway)
        dh  = do Wd = w q
        dWd = sum_n do_n^T h_n,      dbd = sum_n do_n
    "hidden" mode, c = (w h) Wd^T + bd:
        q   = gy Wd                  (gradient of w h)
        dw  = <q, h>,   dh = w q
        dWd = sum_n gy_n^T (w h)_n,  dbd = sum_n gy_n
    then through the activation (see ``activations.hidden_backward``):
        dg = dh * act'(g)  (plain);  dg = (dh * u) * a'(g), du = dh * a(g)  (gated)
        dWg = sum_n dg_n^T a_n,  dbg = sum_n dg_n,  dWu = sum_n du_n^T a_n,  dbu = sum_n du_n
        dx[t] = sum over the token's kept pairs of (dg Wg + du Wu), summed in slot order.

    g and u come from ``preact`` (recompute=False) or are recomputed from x (recompute=True);
    h is always recomputed from them. Nothing else from the forward is needed.
    """
    T, d = x.shape
    k = topk_weights.shape[1]
    P = sorted_pairs.shape[0]
    E = expert_offsets.shape[0] - 1
    gated = is_gated(activation)
    I = expert_weight(w_gate, 0).shape[0]
    xdt = x.dtype
    acc_dt = accumulate_dtype(xdt, topk_weights.dtype)
    # h * w runs in the promoted dtype (as eager); in "output" mode c = o * w is in it too, and
    # in "hidden" mode c is the second GEMM's output, in x's dtype.
    p_dt = torch.promote_types(xdt, topk_weights.dtype)
    c_dt = p_dt if weight_pos == "output" else xdt
    tw_flat = topk_weights.reshape(-1)

    wide_gy = wide_grad(grad_y, xdt)
    gy_scale = row_scale(grad_y) if wide_gy else None
    dx_buf = torch.zeros(P + 1, d, device=x.device, dtype=acc_dt)
    dw_buf = torch.zeros(P + 1, device=x.device, dtype=topk_weights.dtype)

    def new_grads(ws: Sequence[Tensor], ndim_expert: int) -> list[Tensor]:
        if not ws:
            return []
        shape = stacked_grad_shape(ws, ndim_expert)
        return [torch.zeros(shape, device=ws[0].device, dtype=ws[0].dtype)]

    dwg, dwu, dwd = new_grads(w_gate, 2), new_grads(w_up, 2), new_grads(w_down, 2)
    dbg, dbu, dbd = new_grads(b_gate, 1), new_grads(b_up, 1), new_grads(b_down, 1)

    def slot(grads: list[Tensor], e: int) -> Optional[Tensor]:
        return grads[0][e] if grads else None

    offs = expert_offsets.tolist()
    check_route_contents(sorted_pairs, offs, pair_pos)
    for e in range(E):
        s0, s1 = offs[e], offs[e + 1]
        if s1 == s0:
            continue
        pairs = sorted_pairs[s0:s1]
        tok = torch.div(pairs, k, rounding_mode="floor")
        xe = x.index_select(0, tok)
        wg, wd = expert_weight(w_gate, e), expert_weight(w_down, e)
        wu = expert_weight(w_up, e) if gated else None
        bd = expert_bias(b_down, e)
        if recompute:
            g = F.linear(xe, wg, expert_bias(b_gate, e))
            u = F.linear(xe, wu, expert_bias(b_up, e)) if gated else None
        else:
            g = preact[s0:s1, :I]
            u = preact[s0:s1, I:] if gated else None
        h = hidden_forward(activation, g, u)
        we = tw_flat.index_select(0, pairs).unsqueeze(1)
        gc = grad_y.index_select(0, tok).to(c_dt)

        if wide_gy:
            # grad_y in a wider dtype than x (fp32 routing weights or sums on 16-bit x): its rows
            # are scaled by a power of two into x's range for the GEMM and q is kept in fp32,
            # so that a loss-scaled (or tiny) gradient neither overflows nor underflows where
            # eager's, multiplied by the weight in the wide dtype, does not
            gs = gy_scale.index_select(0, tok).unsqueeze(1)
            q = ((grad_y.index_select(0, tok) * gs).to(xdt).float() @ wd.float()) / gs
            dw = (q * h.float()).sum(1)
        else:
            q = gc.to(xdt) @ wd  # [n, I]
            dw = (q.to(p_dt) * h).sum(1)
        if weight_pos == "output":
            if bd is not None:
                dw = dw + (gc * bd).sum(1)
            do = (gc * we).to(xdt)
            dwd_e, dbd_e = do.t() @ h, do.sum(0)
        else:
            hw = (h * we).to(xdt)
            dwd_e, dbd_e = gc.t() @ hw, gc.sum(0)
        dh = (q * we).to(xdt)
        dg, du = hidden_backward(activation, dh, g, u)

        dxe = dg @ wg
        slot(dwg, e).copy_(dg.t() @ xe)
        if gated:
            dxe = dxe + du @ wu
            slot(dwu, e).copy_(du.t() @ xe)
        slot(dwd, e).copy_(dwd_e)
        if b_gate:
            slot(dbg, e).copy_(dg.sum(0))
        if b_up:
            slot(dbu, e).copy_(du.sum(0))
        if b_down:
            slot(dbd, e).copy_(dbd_e)
        dx_buf[s0:s1] = dxe
        dw_buf[s0:s1] = dw

    dx = _slot_sum(dx_buf, pair_pos, T, k).to(xdt)
    zero_row = P
    d_tw = dw_buf.index_select(0, torch.where(pair_pos < 0, zero_row, pair_pos)).view(T, k)
    return dx, d_tw, dwg, dwu, dwd, dbg, dbu, dbd
