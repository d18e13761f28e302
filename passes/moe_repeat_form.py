"""Match DeepSeekMoE's training-path dispatch: repeated rows and masked assignment.

The form (DeepSeekMoE, DeepSeek-V2/V3 ``MoE.forward`` when training), S = T*k pairs,
pair p = t*k + j::

    flat = ids.view(-1)                                      # [S]
    xr   = x.repeat_interleave(k, dim=0)                     # [S, d]: row p is x[p // k]
    y    = torch.empty_like(xr)                              # or zeros_like / new_empty / new_zeros
    for e in range(E):
        y[flat == e] = expert_e(xr[flat == e])
    out  = (y.view(T, k, -1) * w.unsqueeze(-1)).sum(dim=1)  # w [T, k]

A boolean mask keeps row order, so the rows assigned to ``y[flat == e]`` are
``expert_e(xr[p])`` for exactly the pairs p routed to e. When every expert 0..E-1 is assigned
once and the ids provably lie in [0, E) (topk over E scores), every row of ``y`` is written:
``y[p] = expert_{ids[t, j]}(x[t])`` and ``out[t] = sum_j w[t, j] * y[t*k + j]``, which is the
blaze op in "output" mode. The [S, d] copy of x and the [S, d] buffer are not built.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from blazec.passes._fx import (
    NoMatch, arg, check_no_rounding, dtype, eq_mask, is_fn, is_getitem, is_method, is_mul, same_shape, shape,
    slot_sum_product, strip_casts, weighted_rows, where_loc,
)
from blazec.passes.moe_expert_mlp import FinalMatch, check_consistent, parse_expert
from blazec.passes.moe_loop_form import _check_dtypes, _find_rows, _ids_bound

Node = torch.fx.Node

_BUFFER_FNS = (torch.empty_like, torch.zeros_like)


def assignments(buf: Node) -> list[Node]:
    """The ``buf[mask] = value`` nodes that write ``buf``, in graph order."""
    return [u for u in buf.users if is_fn(u, operator.setitem) and u.args[0] is buf]


def repeat_buffer(final: Node) -> Node | None:
    """For ``(buf.view(T, k, d) * w.unsqueeze(-1)).sum(1)``, ``buf`` when it has masked
    assignments (so a failed match is this form's near miss), else None."""
    prod = final.args[0] if final.args else None
    if not is_mul(prod):
        return None
    for a in prod.args[:2]:
        if is_method(a, "view", "reshape") and isinstance(a.args[0], Node) and assignments(a.args[0]):
            return a.args[0]
    return None


def _expert_mask(mask: object, flat: Node | None) -> tuple[Node, int]:
    """(flat ids, e) for ``flat == e`` / ``flat.eq(e)``."""
    if not (is_fn(mask, operator.eq, torch.eq) or is_method(mask, "eq")):
        raise NoMatch("a row mask is not flat_ids == e")
    found = eq_mask(mask)
    if found is None:
        raise NoMatch("a row mask compares the ids with a non-constant expert index")
    a, b = found
    if flat is not None and a is not flat:
        raise NoMatch(f"expert {b}: its rows are selected from a different ids tensor than expert 0's")
    return a, b


def match_repeat_assign(final: Node) -> FinalMatch:
    """Match the form at the slot sum ``final``; raise NoMatch with the reason."""
    prod = slot_sum_product(final)
    if len(prod.users) != 1:  # the buffer's writes die with the site: nothing else may read it
        raise NoMatch(f"the weighted rows {prod.name} are also read outside the slot sum")
    pair = weighted_rows(prod)
    if pair is None:
        raise NoMatch("the routing weights are not broadcast with unsqueeze(-1)")
    yv, w = pair
    if not is_method(yv, "view", "reshape") or len(yv.users) != 1:
        raise NoMatch("the assigned buffer is not viewed as [T, k, d] for the weighted sum alone")
    buf = yv.args[0]
    writes = assignments(buf)
    if not writes:
        raise NoMatch("the [T, k, d] rows are not a buffer written by masked assignments")
    if set(buf.users) != set(writes) | {yv}:
        others = sorted(u.name for u in buf.users if u is not yv and u not in writes)
        raise NoMatch(f"the assigned buffer {buf.name} is also read by {', '.join(others)}")
    pos = {n: i for i, n in enumerate(final.graph.nodes)}
    if pos[prod] < max(pos[s] for s in writes):
        raise NoMatch("the weighted sum reads the buffer before its last assignment")

    flat, experts, xr = None, {}, None
    for s in writes:
        mask, value = s.args[1], s.args[2]
        flat, e = _expert_mask(mask, flat)
        if e in experts:
            raise NoMatch(f"expert {e}'s rows are assigned twice")
        out, _ = strip_casts(value)
        check_no_rounding(out, f"on expert {e}'s output")
        rows = _find_rows(out)
        if rows is None or not is_getitem(rows):
            raise NoMatch(f"expert {e}: could not find the masked input rows of the expert MLP")
        read = _expert_mask(rows.args[1], flat)[1]
        if read != e:
            raise NoMatch(f"expert {e} reads the rows of expert {read} ({where_loc(rows)})")
        if xr is None:
            xr = rows.args[0]
        elif rows.args[0] is not xr:
            raise NoMatch(f"expert {e} reads its rows from a different tensor than expert 0")
        if dtype(out) != dtype(buf):
            raise NoMatch(f"expert {e}'s output is {dtype(out)}, the buffer {dtype(buf)}")
        experts[e] = parse_expert(out, rows, e, lambda n: False)

    if not ((is_method(xr, "repeat_interleave") or is_fn(xr, torch.repeat_interleave))
            and isinstance(arg(xr, 1, "repeats"), int)
            and arg(xr, 2, "dim") in (0, -2) and arg(xr, 3, "output_size") is None):
        raise NoMatch("the expert rows are not x.repeat_interleave(k, dim=0)")
    x, k = xr.args[0], arg(xr, 1, "repeats")
    if not (is_method(flat, "view", "reshape", "flatten") and isinstance(flat.args[0], Node)):
        raise NoMatch("the row masks do not compare ids.view(-1) with the expert index")
    if is_method(flat, "view", "reshape") and tuple(flat.args[1:]) not in ((-1,), ((-1,),)):
        raise NoMatch("the row masks do not compare ids.view(-1) with the expert index")
    if is_method(flat, "flatten") and (len(flat.args) > 1 or flat.kwargs):
        raise NoMatch("the row masks do not compare ids.flatten() with the expert index")
    ids = flat.args[0]
    xs, ids_shape = shape(x), shape(ids)
    if xs is None or len(xs) != 2 or ids_shape is None or len(ids_shape) != 2:
        raise NoMatch(f"x {xs} and ids {ids_shape} are not [T, d] and [T, k]")
    T = xs[0]
    want = (str(T), str(k))  # symbolic sizes compare by expression, without guarding on them
    if any(tuple(map(str, (shape(n) or ())[:2])) != want for n in (ids, w, yv)):
        raise NoMatch(f"ids {ids_shape}, weights {shape(w)} and the [T, k, d] view disagree with T={T}, k={k}")
    if not same_shape(yv, (T, k, xs[1])):
        raise NoMatch(f"the buffer is viewed as {shape(yv)}, not [T, k, d] = [{T}, {k}, {xs[1]}]")
    if dtype(ids) not in (torch.int64, torch.int32):
        raise NoMatch(f"routing ids have dtype {dtype(ids)}; the rewrite takes int64 or int32 ids (topk's "
                      "indices, or a cast of them)")
    w_dt = dtype(w)
    if w_dt is None or not w_dt.is_floating_point:
        raise NoMatch("routing weights are not floating point")
    _check_buffer(buf, xr)

    E = _ids_bound(ids)
    missing = sorted(set(range(E)) - set(experts))
    extra = sorted(set(experts) - set(range(E)))
    if missing or extra:
        what = f"missing expert(s) {missing}" if missing else f"expert ids {extra} outside [0, {E})"
        raise NoMatch(f"the loop does not assign every expert's rows exactly once: {what} (rows of a "
                      "missing expert would keep the buffer's initial contents)")
    check_consistent(experts)
    _check_dtypes(x, experts)
    return FinalMatch(final, ids, w, x, k, experts, links=set(writes))  # the writes die with the site


def _check_buffer(buf: Node, xr: Node) -> None:
    """``buf`` is a fresh [S, d] tensor of the rows' dtype; its contents are all overwritten."""
    fresh = is_fn(buf, *_BUFFER_FNS) or is_method(buf, "new_empty", "new_zeros") or \
        is_fn(buf, torch.empty, torch.zeros)
    if not fresh:
        raise NoMatch(f"the assigned buffer {buf.name} is not a fresh empty/zeros tensor")
    if not same_shape(buf, xr) or dtype(buf) != dtype(xr):
        raise NoMatch(f"the assigned buffer is {shape(buf)} {dtype(buf)}, the repeated rows "
                      f"{shape(xr)} {dtype(xr)}")
