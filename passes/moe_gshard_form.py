"""Match naive form 2: GShard/Switch dense capacity dispatch (top-1 and top-2).

The form (fairseq/DeepSpeed ``top2gating`` and the Switch top-1 variant), as Dynamo sees it::

    M1 = one_hot(idx1, E);  M2 = one_hot(idx2, E)                 # [T, E] choice masks
    L1 = cumsum(M1, 0) - 1                                       # position in expert buffer
    L2 = cumsum(M2, 0) - 1 + sum(M1, 0, keepdim=True)            # second choices after all firsts
    K1 = M1 * lt(L1, C);  K2 = M2 * lt(L2, C)                    # capacity C: drop the rest
    S1 = sum(L1 * K1, 1);  S2 = sum(L2 * K2, 1)                  # [T] kept positions
    G1 = w1[:, None] * K1;  G2 = w2[:, None] * K2                # w_j [T]: the pair's weight
    combine  = G1[:, :, None] * one_hot(S1, C)[:, None, :] + G2[...] * one_hot(S2, C)[...]
    dispatch = combine.bool().to(x.dtype)
    expert_in  = einsum("tec,td->ecd", dispatch, x)
    expert_out = bmm(act(bmm(expert_in, W_in) + b_in), W_out) + b_out
    out = einsum("tec,ecd->td", combine, expert_out)

Why it is the blaze op: L_j gives pair (t, j) its position among the pairs routed to its
expert in slot-major order (all first choices in token order, then all second choices), so
K_j keeps exactly the first C pairs of each expert in that order: ``moe_route(ids, E, C,
priority="slot")`` with ``ids = [idx1, idx2]``. Kept pairs get distinct buffer slots, so
``expert_in[e, c]`` is the row of the one token at that slot and
``out[t] = sum_j w_j[t] * K_j[t, e] * expert_e(x[t])``. Dropped pairs contribute 0 in both.
A kept pair of weight exactly 0 is not dispatched (its slot stays taken, on a zero row): the
op computes it neither, since a second route leaves such pairs out after the capacity drop
(``drop_zero_weights``), so an expert that overflows on that token gives no ``0 * inf`` =
NaN, which eager does not have either. The weights ``w_j`` are used exactly as the
code computed them, after any renormalization over kept pairs. Unused buffer slots run the
MLP on zeros in eager; their results are multiplied by 0, so blaze skips them.

One difference in the backward: eager's gradient of a kept pair's weight 0 is
<dL/dout[t], expert_e(0)> (its slot's output), where blaze's is 0 (the pair is not
computed). The rewrite is therefore made only where that gradient provably goes nowhere:
where the weights are built from softmax / sigmoid / exp outputs by products with non-negative
masks, sums, and divisions by positive values (``_zero_weight_grad_vanishes``), every path
from a weight's zero back to a parameter multiplies by an exact 0. A zero-initialized gate
scale or a straight-through hard gate is left alone, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from blazec.passes._fx import (
    NoMatch, arg, canonical_equation, check_no_rounding, dtype, einsum_equation, einsum_operands, exact_cast,
    follow_first_args, is_cast, is_fn, is_getitem, is_method, is_mul, same_shape, shape, strip_casts, val,
)
from blazec.passes.moe_expert_mlp import GATED, ExpertMLP, WeightRef, _activation
from blazec.passes.moe_loop_form import _check_dtypes

Node = torch.fx.Node
ONE_HOT = (F.one_hot, torch._C._nn.one_hot)
ADD = (operator.add, torch.add)
SUB = (operator.sub, torch.sub)
S_, N_ = slice(None, None, None), None
# the combine and dispatch einsums, with any subscript letters (DeepSpeed: "sec,ecm->sm", "sec,sm->ecm")
COMBINE_EQ, DISPATCH_EQ = canonical_equation("tec,ecd->td"), canonical_equation("tec,td->ecd")


@dataclass
class GShardMatch:
    out: Node
    idx: list[Node]  # [T] expert id of each choice, first choice first
    w: list[Node]  # [T] weight of each choice
    x: Node
    capacity: int
    experts: dict[int, ExpertMLP]
    priority: str = "slot"  # all first choices fill the buffers before any second choice
    drop_zero_weights: bool = True  # combine.bool() dispatches no pair of weight 0 (see the module docstring)
    links: set[Node] = field(default_factory=set)  # no in-place nodes of its own

    @property
    def top_k(self) -> int:
        return len(self.idx)

    def routing(self, graph: torch.fx.Graph) -> tuple[Node, Node]:
        """Stack the per-choice ids and weights into [T, k] (inserted at the graph's insert point)."""
        return (graph.call_function(torch.stack, (self.idx,), {"dim": 1}),
                graph.call_function(torch.stack, (self.w,), {"dim": 1}))


def _pair(node: object, pred_a, pred_b) -> tuple | None:
    """For ``mul(a, b)`` in either order, (a, b) with pred_a(a) and pred_b(b)."""
    if not is_mul(node):
        return None
    x, y = node.args[0], node.args[1]
    for a, b in ((x, y), (y, x)):
        ra, rb = pred_a(a), pred_b(b)
        if ra is not None and rb is not None:
            return ra, rb
    return None


def _idx(node: object, index: tuple) -> Node | None:
    return node.args[0] if is_getitem(node) and node.args[1] == index else None


def _terms(node: object) -> list:
    """The summands of an add tree; a literal 0 (Python's ``sum()`` start value) is dropped."""
    if is_fn(node, *ADD) and len(node.args) == 2 and not node.kwargs:  # no alpha
        return _terms(node.args[0]) + _terms(node.args[1])
    return [] if isinstance(node, (int, float)) and node == 0 else [node]


def _one_hot(node: object) -> tuple[Node, int] | None:
    if is_fn(node, *ONE_HOT):
        return node.args[0], arg(node, 1, "num_classes", -1)
    return None


def _kept(km: object) -> tuple[Node, Node, int | Node] | None:
    """K = M * lt(L, C) -> (M, L, C); C an int, or a symbolic size's node."""
    def lt(n):
        if is_fn(n, torch.lt, operator.lt) and isinstance(n.args[1], (int, Node)) and not isinstance(n.args[1], bool):
            return n.args[0], n.args[1]
        return None
    r = _pair(km, lambda n: n if _one_hot(n) else None, lt)
    if r is None:
        return None
    m, (loc, c) = r
    return m, loc, c


def _one_hot_capacity(oh: Node, c: object) -> object:
    """The capacity ``c`` that ``one_hot(positions, c)`` (the node ``oh``) reads, as an int
    when it is one or when ``oh``'s last dim is one; else ``c`` unchanged.

    With a symbolic T (a recompile for a second batch size, or ``dynamic=True``) the capacity
    ``ceil(k * cf * T / E)`` is a SymInt. one_hot's output size cannot stay symbolic in its
    classes: tracing it makes Dynamo guard the SymInt to the constant that becomes its last
    dim (the graph is recompiled for another capacity), so that constant is the graph's
    capacity. (Under ``dynamic=True`` a float factor's guard is kept in terms of a symbol the
    restarted trace has since fixed, so the shape environment may not prove the equality.)"""
    witness = (shape(oh) or (None,))[-1]
    if isinstance(c, Node) and isinstance(witness, int) and not isinstance(witness, bool) \
            and isinstance(val(c), torch.SymInt):
        return witness
    return c


def _static_capacity(c: object, witness: object) -> object:
    """``c`` as the int ``witness`` when it is a symbolic size that the shape environment proves
    equal to it; else ``c`` unchanged."""
    if not isinstance(c, Node) or not isinstance(witness, int) or isinstance(witness, bool):
        return c
    v = val(c)
    if isinstance(v, torch.SymInt) and statically_known_true(v == witness):
        return witness
    return c


def _locations(loc: object, m: Node, earlier: list[Node], kept_earlier: list[Node]) -> bool:
    """L == cumsum(M, 0) - 1 (+ sum(M_i, 0, keepdim=True) for each earlier choice i)."""
    terms = _terms(loc)
    base = [t for t in terms if is_fn(t, *SUB) and len(t.args) == 2 and not t.kwargs and t.args[1] == 1
            and is_fn(t.args[0], torch.cumsum)]
    if len(base) != 1:
        return False
    cs = base[0].args[0]
    if cs.args[0] is not m or arg(cs, 1, "dim") != 0:
        return False
    offsets = [t for t in terms if t is not base[0]]
    counted = []
    for t in offsets:
        if not (is_fn(t, torch.sum) or is_method(t, "sum")) or arg(t, 1, "dim") != 0 \
                or arg(t, 2, "keepdim", False) is not True:
            return False
        counted.append(t.args[0])
    if len(counted) != len(earlier):
        return False
    # Counting the earlier choices before or after their capacity drop gives the same kept set:
    # either way, later choices land at or past C exactly when the earlier ones filled C.
    hit = set()
    for c in counted:
        i = next((i for i, (a, b) in enumerate(zip(earlier, kept_earlier)) if c is a or c is b), None)
        if i is None:
            return False
        hit.add(i)
    return hit == set(range(len(earlier)))


def match_gshard(out: Node) -> GShardMatch:
    if not einsum_equation(out) == COMBINE_EQ:
        raise NoMatch("not a combine einsum('tec,ecd->td')")
    combine, expert_out = einsum_operands(out)
    combine, _ = strip_casts(combine)
    check_no_rounding(combine, "on the combine tensor")

    # combine = sum_j G_j[:, :, None] * one_hot(S_j, C)[:, None, :]
    choices = []
    for term in _terms(combine):
        r = _pair(term, lambda n: _idx(n, (S_, S_, N_)), lambda n: _idx(n, (S_, N_, S_)))
        if r is None:
            raise NoMatch("the combine tensor is not a sum of gate[:, :, None] * one_hot(position)[:, None, :]")
        g, loc_oh = r
        oh = _one_hot(loc_oh)
        if oh is None:
            if isinstance(loc_oh, Node) and loc_oh.op == "placeholder":  # computed before a graph break
                raise NoMatch("the one_hot(position, capacity) buffer positions come from another graph: Dynamo "
                              "broke the graph before them (a capacity computed from a batch size marked unbacked "
                              "is data-dependent; leave the batch dim backed for this form)")
            raise NoMatch("buffer positions are not one_hot(position, capacity)")
        s, c_node = oh
        C = _one_hot_capacity(loc_oh, c_node)
        gw = _pair(g, lambda n: _idx(n, (S_, N_)), lambda n: n)
        if gw is None:
            raise NoMatch("a choice's gate is not w[:, None] * kept_mask")
        w, km = gw
        kept = _kept(km)
        if kept is None:
            raise NoMatch("a choice's kept mask is not one_hot(idx, E) * lt(locations, capacity)")
        m, loc, C2 = kept
        C2 = C if C2 is c_node else _static_capacity(C2, C)  # the same size node as one_hot's, or proven equal
        bad = next((c for c in (C2, C) if isinstance(c, Node)), None)
        if isinstance(bad, Node) and isinstance(val(bad), torch.Tensor):
            raise NoMatch(f"the capacity in a choice's drop test lt(locations, capacity) is a tensor ({bad.name}), "
                          "not a size: blazec rewrites a constant capacity")
        if bad is not None:
            raise NoMatch("the capacity in a choice's drop test lt(locations, capacity) is a size computed at run "
                          "time that the graph does not fix to a constant (dynamic shapes: T * capacity_factor / E "
                          "is symbolic); blazec rewrites a constant capacity (compile with dynamic=False, or fix "
                          "the capacity)")
        if C2 != C:
            raise NoMatch(f"capacity {C2} in the drop test differs from one_hot's {C}")
        sl = (is_fn(s, torch.sum) or is_method(s, "sum")) and arg(s, 1, "dim") == 1 and \
            arg(s, 2, "keepdim", False) is False and \
            _pair(s.args[0], lambda n: n if n is loc else None, lambda n: n if n is km else None)
        if not sl:
            raise NoMatch("a choice's position is not sum(locations * kept_mask, 1)")
        choices.append((w, m, km, loc, C))
    if len(choices) not in (1, 2):
        raise NoMatch(f"{len(choices)} choices per token; GShard/Switch forms with top-1 or top-2 are matched")
    # Order the choices by their location offsets: the first has none.
    choices.sort(key=lambda ch: len(_terms(ch[3])))
    Cs = {ch[4] for ch in choices}
    if len(Cs) != 1:
        raise NoMatch("the choices use different capacities")
    C = Cs.pop()
    earlier, kept_earlier = [], []
    E = None
    for w, m, km, loc, _ in choices:
        if not _locations(loc, m, earlier, kept_earlier):
            raise NoMatch("buffer positions are not cumsum(mask, 0) - 1 plus the counts of earlier choices "
                          "(the slot-major GShard order)")
        idx, e_count = _one_hot(m)
        if E is None:
            E = e_count
        elif e_count != E:
            raise NoMatch("the choices one_hot to different expert counts")
        earlier.append(m)
        kept_earlier.append(km)

    # dispatch and the batched expert MLP
    expert_in = follow_first_args(expert_out, lambda n: einsum_equation(n) == DISPATCH_EQ)
    if not einsum_equation(expert_in) == DISPATCH_EQ:
        raise NoMatch("expert inputs are not einsum('tec,td->ecd', dispatch, x)")
    dispatch, x = einsum_operands(expert_in)
    dispatch, _ = strip_casts(dispatch)
    if not (is_method(dispatch, "bool") and strip_casts(dispatch.args[0])[0] is combine):
        raise NoMatch("the dispatch tensor is not combine.bool(): cannot prove it marks the kept pairs")
    experts = _batched_mlp(expert_out, expert_in, E)
    T = shape(x)[0]
    for w, m, *_ in choices:
        if not same_shape(w, (T,)) or not same_shape(_one_hot(m)[0], (T,)):
            raise NoMatch(f"choice weights {shape(w)} / ids do not have shape [T]={T}")
    if not isinstance(C, int) or C < 1:
        raise NoMatch(f"capacity {C} is not a positive constant")
    _check_dtypes(x, experts)
    for w, *_ in choices:
        if not _zero_weight_grad_vanishes(w):
            raise NoMatch(f"a choice's weight ({w.name}) is not built from softmax / sigmoid / exp outputs, "
                          "non-negative masks, sums and positive divisors, so it may be exactly 0 at a kept pair "
                          "with a gradient that matters (a zero-initialized scale, a straight-through gate): "
                          "combine.bool() then leaves the pair undispatched, and eager's gradient of that weight "
                          "is expert_e(0)'s, which the blaze op does not compute")
    return GShardMatch(out, [_one_hot(ch[1])[0] for ch in choices], [ch[0] for ch in choices], x, C, experts)


# --- the gradient of a zero weight ---------------------------------------------------------------

# in place too (DeepSpeed renormalizes with ``gates1_s /= denom_s``): the node's value is the result
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)
_IADD = (operator.iadd,)
_SOFT = (F.softmax, torch.softmax, torch.sigmoid, torch.exp, torch.special.expit)
_SOFT_METHODS = ("softmax", "sigmoid", "exp")
_CMP = (torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne,
        operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne)
_CMP_METHODS = ("lt", "le", "gt", "ge", "eq", "ne", "bool")
# Ops that move or copy elements without arithmetic: a zero stays that element's zero.
_MOVE = (operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.transpose, torch.permute,
         torch.flatten, torch.gather, torch.index_select, torch.select, torch.narrow)
_MOVE_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "transpose", "permute", "flatten", "expand",
                 "expand_as", "contiguous", "gather", "index_select", "select", "narrow", "t")
_SUM_METHODS = ("sum", "mean")


def _requires_grad(node: object) -> bool:
    return bool(getattr(val(node), "requires_grad", False))


def _widening(node: Node) -> bool:
    """A dtype cast that keeps every value (the same float dtype, or an exact widening)."""
    return is_cast(node) and exact_cast(node) and (dtype(node.args[0]) or torch.bool).is_floating_point


def _nonneg(node: object, seen: dict) -> bool:
    """Provably >= 0 everywhere: masks (one_hot, comparisons, their casts and products),
    softmax-like outputs, sums and products of such, non-negative constants."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node >= 0
    if isinstance(node, bool):
        return True
    if not isinstance(node, Node):
        return False
    if node in seen:
        return seen[node]
    seen[node] = False  # cycles cannot occur; this only guards re-entry
    d = dtype(node)
    if d == torch.bool or is_fn(node, *ONE_HOT, *_CMP) or is_method(node, *_CMP_METHODS) \
            or is_fn(node, *_SOFT) or is_method(node, *_SOFT_METHODS):
        ok = True
    elif is_cast(node) and d is not None and (d.is_floating_point or dtype(node.args[0]) == torch.bool):
        ok = _nonneg(node.args[0], seen)
    elif is_mul(node) or is_fn(node, *_MUL, *ADD, *_IADD) or is_method(node, "add", "mul_", "add_"):
        ok = len(node.args) == 2 and not node.kwargs and all(_nonneg(a, seen) for a in node.args)
    elif is_fn(node, torch.sum, torch.mean, *_MOVE) or is_method(node, *_SUM_METHODS, *_MOVE_METHODS):
        ok = _nonneg(node.args[0], seen)
    else:
        ok = False
    seen[node] = ok
    return ok


def _positive(node: object, seen: dict) -> bool:
    """Provably > 0: a positive constant, clamp(min=c > 0), or a positive plus a non-negative."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node > 0
    if is_fn(node, torch.clamp, torch.clamp_min) or is_method(node, "clamp", "clamp_min", "clamp_", "clamp_min_"):
        lo = arg(node, 1, "min")
        return isinstance(lo, (int, float)) and not isinstance(lo, bool) and lo > 0
    if is_fn(node, *ADD, *_IADD) or is_method(node, "add", "add_"):
        a = node.args
        return len(a) == 2 and not node.kwargs and (
            (_positive(a[0], seen) and _nonneg(a[1], seen)) or (_positive(a[1], seen) and _nonneg(a[0], seen)))
    return False


def _vanishes(node: object, seen: dict, vseen: dict) -> bool:
    """Property Z of a node n: n >= 0, and wherever an element of n is 0, a change of the
    gradient reaching that element changes no gradient upstream (it is multiplied by an exact 0
    on every path).

    Z holds for a tensor without a gradient that is >= 0; for softmax, sigmoid and exp outputs
    (their backward multiplies by the output: softmax's dlogits = s * (g - <s, g>)); for a
    product of Z factors (a zero element has a zero factor, whose gradient is killed by Z, and
    the other factor's gradient is multiplied by that zero); for sums, einsums and adds of Z
    terms (non-negative terms summing to 0 are all 0); for a Z numerator over a positive
    denominator (the denominator's gradient is multiplied by the numerator's 0); and through
    moves, views and exact widening casts. A product or quotient that underflows to 0 from
    nonzero factors escapes the argument: the gradient that then differs from eager's is
    scaled by the factor's tiny value (subnormal), below the rounding of the rest."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node >= 0
    if not isinstance(node, Node):
        return False
    if not _requires_grad(node):
        return _nonneg(node, seen)
    if node in vseen:
        return vseen[node]
    vseen[node] = False
    a = node.args
    if is_fn(node, *_SOFT) or is_method(node, *_SOFT_METHODS):
        ok = True
    elif is_mul(node) or is_fn(node, *_MUL, *ADD, *_IADD) or is_method(node, "add", "mul_", "add_"):
        ok = len(a) == 2 and not node.kwargs and all(_vanishes(x, seen, vseen) for x in a)
    elif is_fn(node, *_DIV) or is_method(node, "div", "div_"):
        ok = len(a) == 2 and not node.kwargs and _vanishes(a[0], seen, vseen) and _positive(a[1], seen)
    elif is_getitem(node) and (is_fn(a[0], torch.topk) or is_method(a[0], "topk")) and a[1] == 0:  # topk values
        ok = _vanishes(a[0].args[0], seen, vseen)
    elif is_fn(node, torch.sum, torch.mean, *_MOVE) or is_method(node, *_SUM_METHODS, *_MOVE_METHODS):
        ok = _vanishes(a[0], seen, vseen)
    elif is_fn(node, torch.einsum):
        ok = all(_vanishes(x, seen, vseen) for x in einsum_operands(node))
    elif is_cast(node):
        ok = _widening(node) and _vanishes(a[0], seen, vseen)
    else:
        ok = False
    vseen[node] = ok
    return ok


def _zero_weight_grad_vanishes(w: Node) -> bool:
    """Whether eager's and blaze's gradients of a GShard weight that is exactly 0 at a kept
    pair (see the module docstring) reach the parameters alike: w has no gradient, or Z holds
    for it (``_vanishes``)."""
    return not _requires_grad(w) or _vanishes(w, {}, {})


def _bmm_bias(node: object, inp: object, what: str) -> tuple[WeightRef, WeightRef | None]:
    """``bmm(inp, W) [+ b]`` with W [E, in, out] and b [E, 1, out]."""
    bias = None
    if is_fn(node, *ADD):
        if len(node.args) != 2 or node.kwargs:
            raise NoMatch(f"the {what} bias is added with extra arguments (alpha)")
        node, bias = node.args[0], node.args[1]
    if not (is_fn(node, torch.bmm) and node.args[0] is inp):
        raise NoMatch(f"the {what} projection is not bmm(expert buffer, W) [+ b]")
    W = node.args[1]
    if not (isinstance(W, Node) and W.op in ("placeholder", "get_attr") and len(shape(W) or ()) == 3):
        raise NoMatch(f"the {what} weight is not a 3-D parameter")
    wref = WeightRef(W, 0, transposed=True)
    bref = None
    if bias is not None:
        # Added to the [E, C, out] buffer, only [E, 1, out] is per expert: [E, out] broadcasts
        # over the capacity axis (per slot), [out] or [1, 1, out] is shared by all experts.
        bs, ws = shape(bias), shape(W)
        if not (isinstance(bias, Node) and bias.op in ("placeholder", "get_attr")):
            raise NoMatch(f"the {what} bias is not a parameter")
        if bs is None or len(bs) != 3 or str(bs[0]) != str(ws[0]) or bs[1] != 1 or str(bs[2]) != str(ws[2]):
            raise NoMatch(f"the {what} bias has shape {list(bs or ())}: only a per-expert [E, 1, out] = "
                          f"{[ws[0], 1, ws[2]]} bias is matched (it broadcasts over the capacity axis otherwise, "
                          "or is shared by all experts)")
        bref = WeightRef(bias, 0, squeeze=1)
    return wref, bref


def _batched_mlp(expert_out: Node, expert_in: Node, E: int) -> dict[int, ExpertMLP]:
    down, b_down = _bmm_bias(expert_out, _down_input(expert_out), "down")
    h = _down_input(expert_out)
    act = _activation(h)
    up = b_up = None
    if act is not None:
        name = act[0]
        gate, b_gate = _bmm_bias(act[1], expert_in, "gate")
    elif is_mul(h):
        name = None
        for a, u in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
            act = _activation(a) if isinstance(a, Node) else None
            if act is not None and act[0] in GATED:
                name = GATED[act[0]]
                gate, b_gate = _bmm_bias(act[1], expert_in, "gate")
                up, b_up = _bmm_bias(u, expert_in, "up")
                break
        if name is None:
            raise NoMatch("the expert hidden is a product without a supported gated activation")
    else:
        raise NoMatch("the expert hidden is not act(bmm) or act(bmm) * bmm")
    for ref in (gate, up, down):
        if ref is not None and int(shape(ref.base)[0]) != E:
            raise NoMatch(f"expert weights have {shape(ref.base)[0]} experts, the gate routes to {E}")

    def at(ref, e):
        return None if ref is None else WeightRef(ref.base, e, ref.transposed, ref.rows, ref.squeeze)

    return {e: ExpertMLP(name, at(gate, e), at(up, e), at(down, e), at(b_gate, e), at(b_up, e), at(b_down, e))
            for e in range(E)}


def _down_input(expert_out: Node) -> Node:
    node = expert_out.args[0] if is_fn(expert_out, *ADD) else expert_out
    if not is_fn(node, torch.bmm):
        raise NoMatch("the expert output is not bmm(hidden, W_out) [+ b_out]")
    return node.args[0]
