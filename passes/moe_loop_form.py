"""Match the static loop over experts (naive form 1) on a Dynamo graph.

The form, as Dynamo unrolls it::

    acc  = zeros(T, d)                                   # or zeros_like / new_zeros
    mask = one_hot(ids, E).permute(2, 1, 0)              # or .permute(2, 0, 1), or ids == e
    for e in range(E):
        slot, tok = torch.where(mask[e])                 # or nonzero(as_tuple=True)
        rows = x[tok]                                    # or x[None, tok].reshape(-1, d)
        y_e  = expert_e(rows) * w[tok, slot, None]       # or w[tok, slot].unsqueeze(-1)
        acc.index_add_(0, tok, y_e.to(acc.dtype))
    ... reads of acc ...

Every semantic condition is checked before a rewrite: one routing source ``ids [T, k]`` and
one routing weight tensor ``w [T, k]`` for all experts, the weight gathered at exactly the
(token, slot) pairs that the mask selected, each expert 0..E-1 present exactly once, the
same input ``x``, a zero-initialized accumulator that nothing reads before the last
``index_add_``, and experts that compute the same function of their own parameters. A
failed condition raises :class:`NoMatch` with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from blazec.passes._fx import (
    NoMatch, arg, check_combine_dtypes, check_no_rounding, combine_args, dtype, eq_mask, is_fn, is_getitem, is_method,
    same_shape, shape, strip_casts,
)
from blazec.passes.moe_expert_mlp import ExpertMLP, check_consistent, parse_expert

Node = torch.fx.Node

ZEROS_FNS = (torch.zeros, torch.zeros_like)


@dataclass
class WhereSite:
    """One ``torch.where(mask[e])`` with what it selects."""

    node: Node
    ids: Node  # [T, k] expert ids
    expert: int
    num_experts: int
    token_pos: int  # which output of where holds token ids
    slot_pos: int


@dataclass
class LoopMatch:
    acc: Node
    index_adds: list[Node]
    ids: Node
    weights: Node  # routing weights [T, k], exactly the tensor the code indexes
    x: Node
    num_experts: int
    top_k: int
    experts: dict[int, ExpertMLP]
    wheres: list[Node]
    region: set[Node]  # every node of the dispatch that the rewrite makes dead

    @property
    def first(self) -> ExpertMLP:
        return self.experts[0]


def _where_site(where: Node) -> WhereSite:
    if is_fn(where, torch.where) and len(where.args) == 1 and not where.kwargs:
        mask = where.args[0]
    elif (is_fn(where, torch.nonzero) or is_method(where, "nonzero")) and arg(where, 1, "as_tuple", False):
        mask = where.args[0]
    else:
        raise NoMatch("index_add_ index is not an output of torch.where(mask) / nonzero(as_tuple=True)")
    # mask[e] of one_hot(ids, E).permute(2, a, b)
    if is_getitem(mask) and isinstance(mask.args[1], int):
        e, perm = mask.args[1], mask.args[0]
        if not (is_method(perm, "permute") or is_fn(perm, torch.permute)):
            raise NoMatch("expert mask is indexed from a tensor that is not one_hot(...).permute(...)")
        dims = perm.args[1:] if is_method(perm, "permute") and not isinstance(perm.args[1], (tuple, list)) else perm.args[1]
        dims = tuple(int(d) for d in dims)
        oh = perm.args[0]
        if not is_fn(oh, F.one_hot, torch._C._nn.one_hot):
            raise NoMatch("expert mask is not built with one_hot")
        ids = oh.args[0]
        E = arg(oh, 1, "num_classes", -1)
        if len(dims) != 3 or dims[0] != 2:
            raise NoMatch(f"one_hot mask permuted with {dims}; the expert axis must come first")
        token_pos, slot_pos = dims[1:].index(0), dims[1:].index(1)
    elif is_fn(mask, operator.eq, torch.eq) or is_method(mask, "eq"):
        found = eq_mask(mask)
        if found is None:
            raise NoMatch("expert mask compares ids with a non-constant expert index")
        ids, e = found
        E, token_pos, slot_pos = None, 0, 1
    else:
        raise NoMatch("expert mask is neither one_hot(ids).permute(...)[e] nor ids == e")
    ids_shape = shape(ids)
    if ids_shape is None or len(ids_shape) != 2:
        raise NoMatch(f"routing ids have shape {ids_shape}; expected [T, k]")
    if dtype(ids) not in (torch.int64, torch.int32):
        raise NoMatch(f"routing ids have dtype {dtype(ids)}; the rewrite takes int64 or int32 ids (topk's "
                      "indices, or a cast of them)")
    if E is not None and (not isinstance(E, int) or E < 1):
        raise NoMatch("one_hot without a static num_classes; the number of experts is unknown")
    return WhereSite(where, ids, e, E, token_pos, slot_pos)


def _outputs(where: Node, pos: int) -> set[Node]:
    return {u for u in where.users if is_getitem(u) and u.args[1] == pos}


def _is_routing_weight(node: object, site: WhereSite) -> Node | None:
    """If ``node`` is ``w[tok, slot, None]`` (or ``w[tok, slot].unsqueeze(-1)``), return ``w``."""
    toks, slots = _outputs(site.node, site.token_pos), _outputs(site.node, site.slot_pos)
    if is_method(node, "unsqueeze") and node.args[1] in (-1, 1):
        node = node.args[0]
        want_none = False
    else:
        want_none = True
    if not is_getitem(node) or not isinstance(node.args[1], tuple):
        return None
    idx = node.args[1]
    if want_none:
        if len(idx) != 3 or idx[2] is not None:
            return None
        idx = idx[:2]
    if len(idx) != 2 or not _among(idx[0], toks) or not _among(idx[1], slots):
        return None
    return node.args[0]


def _among(v: object, nodes) -> bool:
    """``v`` is one of ``nodes``, by identity: an index may be a slice or a tuple holding one,
    which Python 3.11 cannot hash."""
    return any(v is n for n in nodes)


def _rows_source(rows: Node, site: WhereSite) -> Node:
    """``x`` for rows = ``x[tok]`` / ``x[None, tok].reshape(-1, d)`` / ``index_select(x, 0, tok)``
    / ``x.index_select(0, tok)``."""
    toks = _outputs(site.node, site.token_pos)
    r = rows
    if is_method(r, "reshape", "view") and len(shape(r) or ()) == 2:
        inner = r.args[0]
        if is_getitem(inner) and isinstance(inner.args[1], tuple) and len(inner.args[1]) == 2 \
                and inner.args[1][0] is None and _among(inner.args[1][1], toks):
            return inner.args[0]
    if is_getitem(r) and _among(r.args[1], toks):
        return r.args[0]
    if (is_fn(r, torch.index_select) or is_method(r, "index_select")) and arg(r, 1, "dim") in (0, -2) \
            and _among(arg(r, 2, "index"), toks) and len(shape(r.args[0]) or ()) == 2:
        return r.args[0]
    raise NoMatch(f"expert {site.expert}: input rows are not x[tokens] for the tokens routed to it")


def _rows_nodes(rows: Node) -> set[Node]:
    out = {rows}
    if is_method(rows, "reshape", "view"):
        out.add(rows.args[0])
    return out


def match_loop(acc: Node, index_adds: list[Node]) -> LoopMatch:
    """Match one accumulator and its ``index_add_`` chain; raise NoMatch with the reason."""
    if not (is_fn(acc, *ZEROS_FNS) or is_method(acc, "new_zeros")):
        raise NoMatch("the accumulator is not created with zeros/zeros_like/new_zeros")
    acc_shape = shape(acc)
    if acc_shape is None or len(acc_shape) != 2:
        raise NoMatch(f"the accumulator has shape {acc_shape}; expected [T, d]")

    experts: dict[int, ExpertMLP] = {}
    ids = weights = x = None
    E_seen = None
    wheres, region = [], set(index_adds)
    for ia in index_adds:
        index, source = combine_args(ia)  # index_add_, or scatter_add_ of the index broadcast over d
        if not is_method(ia, "index_add_", "scatter_add_"):
            raise NoMatch("the loop sums with an out-of-place index_add / scatter_add; use index_add_")
        if ia.users:
            raise NoMatch("the result of index_add_ is used directly")
        if not is_getitem(index):
            raise NoMatch("index_add_ index is not an output of torch.where(mask)")
        site = _where_site(index.args[0])
        if index.args[1] != site.token_pos:
            raise NoMatch(f"expert {site.expert}: index_add_ uses the slot ids, not the token ids, as the index")
        if ids is None:
            ids, E_seen = site.ids, site.num_experts
        elif site.ids is not ids:
            raise NoMatch(f"expert {site.expert} is routed from a different ids tensor than expert 0")
        if site.expert in experts:
            raise NoMatch(f"expert {site.expert} is accumulated twice")

        contrib, casts = strip_casts(source)
        check_no_rounding(contrib, f"on expert {site.expert}'s contribution")
        region.update(casts)
        rw_of = lambda n, s=site: _is_routing_weight(n, s) is not None  # noqa: E731
        mlp_out, w_node = None, None
        if is_fn(contrib, operator.mul, torch.mul) or is_method(contrib, "mul"):
            a, b = contrib.args[0], contrib.args[1]
            for f, other in ((b, a), (a, b)):
                w = _is_routing_weight(f, site)
                if w is not None:
                    mlp_out, w_node = other, w
                    region.update({contrib, f})
                    break
        if mlp_out is None:  # the weight may scale the hidden state instead (weight_pos="hidden")
            mlp_out = contrib
            for f in (contrib.args[:2] if is_fn(contrib, operator.mul, torch.mul) or is_method(contrib, "mul") else ()):
                if _is_weight_gather(f):
                    raise NoMatch(f"expert {site.expert}: output is scaled by {f.name}, which is not the routing "
                                  "weight w[token, slot] at the (token, slot) pairs its mask selected")
        mlp_out, casts2 = strip_casts(mlp_out)
        check_no_rounding(mlp_out, f"on expert {site.expert}'s output")
        region.update(casts2)

        rows = _find_rows(mlp_out)
        if rows is None:
            raise NoMatch(f"expert {site.expert}: could not find the gathered input rows of the expert MLP")
        x_e = _rows_source(rows, site)
        mlp = parse_expert(mlp_out, rows, site.expert, rw_of)
        if mlp.weight_in_hidden is not None:
            if w_node is not None:
                raise NoMatch(f"expert {site.expert} applies the routing weight twice")
            w_node = _is_routing_weight(mlp.weight_in_hidden, site)
        if w_node is None:
            raise NoMatch(f"expert {site.expert}: output is not scaled by the routing weight w[token, slot]")
        check_combine_dtypes(f"expert {site.expert}", dtype(acc), contrib, mlp_out, x_e, w_node, casts, casts2)
        if x is None:
            x, weights = x_e, w_node
        elif x_e is not x:
            raise NoMatch(f"expert {site.expert} gathers its rows from a different tensor than expert 0")
        elif w_node is not weights:
            raise NoMatch(f"expert {site.expert} takes routing weights from a different tensor")
        experts[site.expert] = mlp
        wheres.append(site.node)
        region |= mlp.nodes | _rows_nodes(rows)

    T_k = shape(ids)
    E = E_seen if E_seen is not None else _ids_bound(ids)
    missing = sorted(set(range(E)) - set(experts))
    extra = sorted(set(experts) - set(range(E)))
    if missing or extra:
        what = f"missing expert(s) {missing}" if missing else f"expert ids {extra} outside [0, {E})"
        raise NoMatch(f"the loop does not cover every expert exactly once: {what}")
    if not same_shape(weights, T_k):
        raise NoMatch(f"routing weights have shape {shape(weights)}, routing ids {T_k}")
    x_shape = shape(x)
    if x_shape is None or len(x_shape) != 2 or str(x_shape[0]) != str(T_k[0]) or not same_shape(acc_shape, x_shape):
        raise NoMatch(f"x {x_shape}, accumulator {acc_shape} and ids {T_k} do not agree on [T, d]")
    if not weights_are_float(weights):
        raise NoMatch("routing weights are not floating point")
    check_consistent(experts)
    _check_dtypes(x, experts)
    _check_acc_reads(acc, index_adds)
    return LoopMatch(acc, index_adds, ids, weights, x, E, int(T_k[1]), experts, wheres, region)


def _ids_bound(ids: Node) -> int:
    """The number of experts when the mask is ``ids == e``: ids must be topk indices over E scores.

    Without one_hot(ids, E) nothing else says how many experts exist, and taking the loop's
    length would drop the pairs of experts the loop leaves out.
    """
    while _int_cast(ids):  # ids.long(), ids.to(torch.int32): [0, E) survives a cast to int32 or int64
        ids = ids.args[0]
    tk = ids.args[0] if is_getitem(ids) and ids.args[1] == 1 else None
    if tk is not None and (is_fn(tk, torch.topk) or is_method(tk, "topk")):
        scores = shape(tk.args[0])
        dim = arg(tk, 2, "dim", -1)
        if scores is not None and dim in (-1, len(scores) - 1) and isinstance(scores[-1], int):
            return int(scores[-1])
    raise NoMatch("cannot prove the routing ids lie in [0, E): they are not topk indices over E expert scores "
                  "(use one_hot(ids, E) for the mask, or route with topk)")


def _int_cast(node: object) -> bool:
    """A cast of an integer tensor to int32 or int64 (values below 2**31 unchanged)."""
    if not (is_method(node, "long", "int", "to", "type") and node.args and dtype(node.args[0]) is not None):
        return False
    src, out = dtype(node.args[0]), dtype(node)
    return not src.is_floating_point and src != torch.bool and out in (torch.int32, torch.int64)


def weights_are_float(node: Node) -> bool:
    dt = dtype(node)
    return dt is not None and dt.is_floating_point


def _tensor_index(index: object) -> bool:
    """Whether a getitem index holds a tensor (a gather of rows), not only slices and ints."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Node) for p in parts)


def _find_rows(mlp_out: Node) -> Node | None:
    """The expert's input: walk first arguments down to the gathered rows."""
    seen = 0
    node = mlp_out
    while isinstance(node, Node) and seen < 12:
        if is_getitem(node) and not is_method(node.args[0], "chunk") and not is_fn(node.args[0], torch.chunk) \
                and _tensor_index(node.args[1]):
            return node
        if is_fn(node, torch.index_select) or is_method(node, "index_select") or \
                (is_method(node, "reshape", "view") and is_getitem(node.args[0])):
            return node
        nxt = node.args[0] if node.args else None
        if is_fn(node, operator.mul, torch.mul) or is_method(node, "mul"):
            # gated product or routing-weight scaling: follow the branch that leads to a linear
            nxt = node.args[0] if not _is_weight_gather(node.args[0]) else node.args[1]
        node, seen = nxt, seen + 1
    return None


def _is_weight_gather(node: object) -> bool:
    if is_method(node, "unsqueeze"):
        node = node.args[0]
    return is_getitem(node) and isinstance(node.args[1], tuple)


def _check_dtypes(x: Node, experts: dict[int, ExpertMLP]) -> None:
    xd = dtype(x)
    if xd not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise NoMatch(f"x has dtype {xd}; blaze ops support float32/float16/bfloat16/float64")
    for e, m in experts.items():
        for ref in (m.gate, m.up, m.down):
            if ref is not None and dtype(ref.base) != xd:
                raise NoMatch(f"expert {e} weights are {dtype(ref.base)} while x is {xd}")


def _check_acc_reads(acc: Node, index_adds: list[Node]) -> None:
    order = {n: i for i, n in enumerate(acc.graph.nodes)}
    last = max(order[n] for n in index_adds)
    for u in acc.users:
        if u in index_adds:
            continue
        if order[u] < last:
            raise NoMatch(f"the accumulator is read by {u.name} before the last index_add_")
