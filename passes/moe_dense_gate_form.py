"""Match naive form 5: every expert runs on every token, weighted by a dense [T, E] gate.

The form, as Dynamo sees it::

    w, ids = probs.topk(k)                           # ids distinct within a row
    gate   = zeros_like(probs).scatter(1, ids, w)    # dense [T, E], zero off the top-k
    out    = zeros_like(x)                           # (or the first term itself)
    for e in range(E):
        out = out + gate[:, e:e+1] * expert_e(x)     # or gate[:, e, None], gate[:, e].unsqueeze(-1)

or with each column spelled from the top-k ids and weights themselves (``MaskGate``)::

    out = out + torch.where(ids == e, w, 0).sum(-1, keepdim=True) * expert_e(x)
    out = out + ((ids == e) * w).sum(dim=-1).unsqueeze(-1) * expert_e(x)

or, as one reduction (``match_dense_stack``)::

    out = (torch.stack([expert_e(x) for e in range(E)], dim=1) * gate.unsqueeze(-1)).sum(dim=1)

Since ``gate[t, e]`` is zero unless ``e`` is one of token t's top-k experts, and the top-k
ids of a row are distinct, ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``: exactly
``moe_experts(x, w, route(ids))``. The gradients agree too: the zero entries of the gate
come from ``zeros_like``, which carries no gradient. A masked column is the same value:
its sum over the k slots has one nonzero term at most (the ids of a row are distinct), and
``w * False`` and ``where(False, w, 0)`` are zeros whose gradient is zero too. The one
difference is for non-finite values: eager computes ``0 * inf = nan`` for an unselected expert,
which blaze never runs (and, with ``(ids == e) * w``, for an infinite weight in another slot).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from blazec.passes._fx import (
    NoMatch, arg, canonical_equation, check_combine_dtypes, check_no_rounding, dtype, einsum_equation, eq_mask,
    einsum_operands, is_fn, is_cast, is_getitem, is_method, is_mul, last_dim_broadcast, same_shape, shape,
    slot_sum_product, strip_casts,
)
from blazec.passes.moe_expert_mlp import ExpertMLP, check_consistent, parse_expert
from blazec.passes.moe_loop_form import ZEROS_FNS, _check_dtypes

Node = torch.fx.Node
ADD = (operator.add, torch.add, operator.iadd)


@dataclass
class DenseGateMatch:
    final: Node  # the node holding the finished sum
    ids: Node
    weights: Node
    x: Node
    num_experts: int
    top_k: int
    experts: dict[int, ExpertMLP]
    links: set[Node] = field(default_factory=set)  # the chain's adds (``out += term`` ones are in place)

    @property
    def first(self) -> ExpertMLP:
        return self.experts[0]

    def routing(self, graph: torch.fx.Graph) -> tuple[Node, Node]:
        """(ids [T, k], weights [T, k]) as graph nodes."""
        return self.ids, self.weights


@dataclass(frozen=True)
class MaskGate:
    """The dense gate spelled column by column from the top-k ``ids`` and ``weights``
    themselves (see ``_mask_column``); ``column`` is one such column, for its dtype and place."""

    ids: Node
    weights: Node
    column: Node = field(compare=False)


def _gate_column(node: object) -> tuple[Node | MaskGate, int] | None:
    """``gate[:, e:e+1]`` / ``gate[:, e, None]`` / ``gate[:, e].unsqueeze(-1)`` -> (gate, e), or
    a masked column of the top-k weights (``_mask_column``) -> (MaskGate, e)."""
    return _scatter_column(node) or _mask_column(node)


def _scatter_column(node: object) -> tuple[Node, int] | None:
    unsq = False
    if is_method(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 1):
        node, unsq = node.args[0], True
    if not is_getitem(node) or not isinstance(node.args[1], tuple):
        return None
    idx = node.args[1]
    if len(idx) < 2 or idx[0] != slice(None, None, None):
        return None
    col = idx[1]
    if isinstance(col, slice) and isinstance(col.start, int) and col.stop == col.start + 1 and col.step in (None, 1):
        if len(idx) == 2 and not unsq:
            return node.args[0], col.start
    if isinstance(col, int):
        if (len(idx) == 3 and idx[2] is None and not unsq) or (len(idx) == 2 and unsq):
            return node.args[0], col
    return None


_MASK_CASTS = ("long", "int", "short", "bool", "type")  # besides is_cast's, for a bool mask


def _mask_column(node: object) -> tuple[MaskGate, int] | None:
    """``torch.where(ids == e, w, 0).sum(-1, keepdim=True)`` -> (MaskGate(ids, w), e).

    The column is the sum over the k slots of ``w`` masked to the slots that picked expert e:
    ``torch.where(ids == e, w, 0)`` (or ``zeros_like(w)``, or ``w.where(ids == e, 0)``), or
    ``(ids == e) * w`` with the mask as it is or cast (``.to(w.dtype)``, ``.float()``), either
    order. The sum keeps its dim, or its [T] result is broadcast by ``[:, None]``,
    ``[..., None]`` or ``.unsqueeze(-1)``. This only recognizes the spelling;
    ``_check_mask_gate`` proves the values."""
    total, keep = node, True
    if is_method(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 1):
        total, keep = node.args[0], False
    elif is_getitem(node) and isinstance(node.args[1], tuple) and node.args[1] in (
            (slice(None, None, None), None), (Ellipsis, None)):
        total, keep = node.args[0], False
    if not ((is_method(total, "sum") or is_fn(total, torch.sum)) and arg(total, 1, "dim") in (-1, 1)):
        return None
    if bool(arg(total, 2, "keepdim", False)) is not keep:
        return None
    masked = arg(total, 0, "input")
    if not isinstance(masked, Node):
        return None
    if is_fn(masked, torch.where) or is_method(masked, "where"):
        if is_fn(masked, torch.where):
            cond, w, other = arg(masked, 0, "condition"), arg(masked, 1, "input"), arg(masked, 2, "other")
        else:
            w, cond, other = masked.args[0], arg(masked, 1, "condition"), arg(masked, 2, "other")
        hit = eq_mask(cond)
        zero = (isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0) or (
            is_fn(other, torch.zeros_like) and other.args and other.args[0] is w)
        if hit is None or not zero or not isinstance(w, Node):
            return None
    elif is_mul(masked) and len(masked.args) == 2:
        for m, w in (masked.args, masked.args[::-1]):
            if (is_cast(m) or is_method(m, *_MASK_CASTS)) and m.args and isinstance(m.args[0], Node):
                m = m.args[0]  # a cast of the bool mask: 0 and 1 in any dtype (the column's is checked)
            hit = eq_mask(m)
            if hit is not None and isinstance(w, Node):
                break
        else:
            return None
    else:
        return None
    ids, e = hit
    return MaskGate(ids, w, total), e


def _check_mask_column(gate: MaskGate) -> None:
    """NoMatch unless this column of a masked gate is computed in the routing weights' dtype."""
    w, col = gate.weights, gate.column
    if col.kwargs.get("dtype") not in (None, dtype(w)):
        raise NoMatch(f"the gate column {col.name} is summed in {col.kwargs['dtype']}, not in the routing weights' dtype")
    if dtype(col) != dtype(w):
        raise NoMatch(f"the gate column {col.name} is computed in {dtype(col)} (the mask is cast to it), but the "
                      f"routing weights {w.name} are {dtype(w)}: the blaze op would weigh the experts in {dtype(w)}")


def _check_mask_gate(gate: MaskGate) -> tuple[Node, Node, int]:
    """(ids, w, E) for a masked gate whose values are the scatter gate's, else NoMatch."""
    ids, w = gate.ids, gate.weights
    if not same_shape(ids, w) or len(shape(ids) or ()) != 2:
        raise NoMatch(f"the masked gate's ids {shape(ids)} and weights {shape(w)} are not both [T, k]")
    return ids, w, _topk_experts(ids)


def _gate_routing(gate: Node | MaskGate) -> tuple[Node, Node, int]:
    """(ids, w, E) of a dense gate, either spelling."""
    return _check_mask_gate(gate) if isinstance(gate, MaskGate) else _scatter_gate(gate)


def _gate_dtype_node(gate: Node | MaskGate) -> Node:
    """The node whose dtype the gate's columns have."""
    return gate.weights if isinstance(gate, MaskGate) else gate


def _topk_experts(ids: Node) -> int:
    """E, for ids that are topk's indices over the experts (the last dim of [T, E] scores), so
    distinct within a row and in [0, E); NoMatch otherwise."""
    if not (is_getitem(ids) and ids.args[1] == 1 and (is_fn(ids.args[0], torch.topk) or is_method(ids.args[0], "topk"))):
        raise NoMatch("cannot prove the gate's expert ids are distinct within a row (they do not come from topk)")
    tk = ids.args[0]
    scores, tdim = shape(arg(tk, 0, "input")), arg(tk, 2, "dim", -1)
    if scores is None or len(scores) != 2 or tdim not in (-1, 1):
        raise NoMatch(f"the gate's expert ids come from topk over dim {tdim} of a {len(scores or ())}-D tensor, "
                      "not over the experts (the last dim of [T, E] scores): they may repeat within a row")
    return int(scores[1])


def _scatter_gate(gate: Node) -> tuple[Node, Node, int]:
    """gate = zeros_like(P).scatter(1, ids, w) -> (ids, w, E); ids must come from topk."""
    if is_method(gate, "scatter_"):
        raise NoMatch("the dense gate is built with the in-place scatter_ (gpt-oss's spelling); blazec rewrites "
                      "the out-of-place zeros_like(p).scatter(1, topk ids, topk weights)")
    if not (is_method(gate, "scatter") or is_fn(gate, torch.scatter)):
        raise NoMatch("the dense gate is not built with scatter(dim=1, topk ids, topk weights)")
    base, dim, ids, src = gate.args[0], arg(gate, 1, "dim"), arg(gate, 2, "index"), arg(gate, 3, "src")
    if src is None:
        src = gate.kwargs.get("value")
    if not (is_fn(base, *ZEROS_FNS) or is_method(base, "new_zeros")):
        raise NoMatch("the dense gate is not zero off the selected experts (scatter base is not zeros)")
    gshape = shape(gate)
    if gshape is None or len(gshape) != 2 or dim not in (1, -1):
        raise NoMatch("the dense gate is not a [T, E] scatter along dim 1")
    if not isinstance(src, Node):
        raise NoMatch("the dense gate scatters a constant, not per-token routing weights")
    if gate.kwargs.get("reduce") is not None or len(gate.args) > 4:
        raise NoMatch("the dense gate scatter uses a reduce mode, not a plain scatter of the weights")
    _topk_experts(ids)
    if not same_shape(ids, src):
        raise NoMatch(f"gate ids {shape(ids)} and weights {shape(src)} differ in shape")
    return ids, src, int(gshape[1])


def match_dense_gate(final: Node) -> DenseGateMatch:
    """``final`` is the last add of a chain ``acc + gate[:, e:e+1] * expert_e(x)``."""
    terms: list[Node] = []
    node = final
    while is_fn(node, *ADD) and len(node.args) == 2 and not node.kwargs:
        acc, term = node.args
        if _is_term(acc) and not _is_term(term):
            acc, term = term, acc
        terms.append(term)
        if isinstance(acc, Node) and is_fn(acc, *ZEROS_FNS) or is_method(acc, "new_zeros"):
            # With ``out += term`` every link is the base tensor: another reader of it (an alias)
            # would see the partial sums of the in-place adds the rewrite leaves behind.
            others = [u.name for u in acc.users if u is not node]
            if others:
                raise NoMatch(f"the accumulator ({acc.name}) of the expert outputs is also read by "
                              f"{', '.join(others)} (an alias of an in-place sum, or another use)")
            break
        if isinstance(acc, Node) and len(acc.users) != 1:
            raise NoMatch(f"a partial sum ({acc.name}) of the expert outputs is used elsewhere")
        node = acc
    else:
        terms.append(node)  # the chain starts with a bare first term
    experts: dict[int, ExpertMLP] = {}
    gate = x = None
    for term in reversed(terms):
        term, term_casts = strip_casts(term)
        check_no_rounding(term, "on a term of the expert sum")
        if not (is_fn(term, operator.mul, torch.mul) or is_method(term, "mul")):
            raise NoMatch(f"{getattr(term, 'name', term)} is not gate[:, e] * expert_e(x)")
        a, b = term.args[0], term.args[1]
        col = _gate_column(a) or _gate_column(b)
        if col is None:
            raise NoMatch(f"{term.name} is not scaled by one column of a dense gate")
        mlp_out = b if _gate_column(a) else a
        g, e = col
        if gate is None:
            gate = g
        elif g != gate:  # the same scatter node, or masks of the same ids and weights
            raise NoMatch(f"expert {e} is weighted by a different gate tensor")
        if e in experts:
            raise NoMatch(f"expert {e} is added twice")
        if isinstance(g, MaskGate):
            _check_mask_column(g)
        x = _add_expert(experts, e, mlp_out, x, final, term, _gate_dtype_node(g), term_casts)
    ids, weights, E = _gate_routing(gate)
    missing = sorted(set(range(E)) - set(experts))
    if missing:
        raise NoMatch(f"the sum does not cover every expert: missing expert(s) {missing}")
    extra = sorted(set(experts) - set(range(E)))
    if extra:
        raise NoMatch(f"the sum weighs expert outputs by gate column(s) {extra} besides columns 0..{E - 1} "
                      "(a negative column repeats one of them)")
    m = _finish(final, ids, weights, x, E, experts)
    m.links = chain_links(final)
    return m


def chain_links(final: Node) -> set[Node]:
    """The ``acc + gate[:, e:e+1] * expert_e(x)`` links of a dense-gate chain (``+=`` ones are
    in-place sums the op reproduces)."""
    links, stack = set(), [final]
    while stack:
        n = stack.pop()
        if n in links or not (is_fn(n, *ADD) and any(_is_term(a) for a in n.args[:2])):
            continue
        links.add(n)
        stack.extend(a for a in n.args[:2] if isinstance(a, Node))
    return links


def _add_expert(experts: dict, e: int, out: Node, x: Node | None, final: Node, prod: Node, gate: Node,
                prod_casts: list[Node]) -> Node:
    """Parse expert ``e`` from its output ``out`` (weighted by ``gate`` in ``prod``) into
    ``experts``; return the input every expert reads (``x``, or this one's for the first)."""
    mlp_out, y_casts = strip_casts(out)
    check_no_rounding(mlp_out, f"on expert {e}'s output")
    rows = _rows_of(mlp_out)
    if x is not None and rows is not x:
        raise NoMatch(f"expert {e} reads a different input than expert 0")
    experts[e] = parse_expert(mlp_out, rows, e, lambda n: False)
    check_combine_dtypes(f"expert {e}", dtype(final), prod, mlp_out, rows, gate, prod_casts, y_casts)
    return rows


def _finish(final: Node, ids: Node, weights: Node, x: Node, E: int, experts: dict) -> DenseGateMatch:
    xs = shape(x)
    if xs is None or len(xs) != 2 or str(xs[0]) != str(shape(ids)[0]) or not same_shape(final, xs):
        raise NoMatch(f"x {xs}, gate ids {shape(ids)} and the output {shape(final)} do not agree on [T, d]")
    check_consistent(experts)
    _check_dtypes(x, experts)
    return DenseGateMatch(final, ids, weights, x, E, int(shape(ids)[1]), experts)


def _is_term(node: object) -> bool:
    if not isinstance(node, Node):
        return False
    n, _ = strip_casts(node, exact=False)  # which adds are terms; match_dense_gate checks the casts
    return (is_fn(n, operator.mul, torch.mul) or is_method(n, "mul")) and any(
        _gate_column(a) is not None for a in n.args[:2])


def _rows_of(mlp_out: Node) -> Node:
    """The tensor the expert's first projection reads (the expert input)."""
    node = mlp_out
    for _ in range(8):
        if not isinstance(node, Node) or not node.args:
            break
        src = node.args[0]
        if isinstance(src, Node) and src.op == "placeholder":
            return src
        if is_fn(node, torch._C._nn.linear) and not _is_expert_internal(src):
            return src
        node = src
    raise NoMatch("could not find the expert's input tensor")


def _is_expert_internal(node: object) -> bool:
    from blazec.passes.moe_expert_mlp import _activation

    return isinstance(node, Node) and (
        _activation(node) is not None or is_fn(node, operator.mul, torch.mul) or is_method(node, "mul", "chunk")
        or is_getitem(node) and is_method(node.args[0], "chunk"))


def _is_expert_stack(node: object) -> bool:
    """``torch.stack(outs, dim=1)`` of a list of expert outputs."""
    return is_fn(node, torch.stack) and arg(node, 1, "dim", 0) in (1, -2) \
        and isinstance(arg(node, 0, "tensors"), (list, tuple))


def stacked_outputs(final: Node) -> Node | None:
    """For ``(torch.stack(outs, dim=1) * gate[..., None]).sum(1)``, the stack node, else None."""
    prod = final.args[0] if final.args else None
    if not is_mul(prod):
        return None
    return next((a for a in prod.args[:2] if _is_expert_stack(a)), None)


def match_dense_stack(final: Node) -> DenseGateMatch:
    """``final`` is ``(torch.stack([expert_e(x) for e], dim=1) * gate.unsqueeze(-1)).sum(dim=1)``
    with the dense top-k gate of the chain form: the same sum, spelled as one reduction."""
    prod = slot_sum_product(final, "expert")
    stack = stacked_outputs(final)
    if stack is None:
        raise NoMatch("the expert sum is not over torch.stack(expert outputs, dim=1) times a gate")
    gate = last_dim_broadcast(prod.args[1] if prod.args[0] is stack else prod.args[0])
    if gate is None:
        raise NoMatch("the stacked expert outputs are not weighted by gate.unsqueeze(-1) of a [T, E] gate")
    return _match_stacked(final, prod, stack, gate)


def _match_stacked(final: Node, prod: Node, stack: Node, gate: Node) -> DenseGateMatch:
    """The match of ``final``, which sums ``stack``'s expert outputs weighted by the dense top-k
    ``gate`` (their product, or the contraction itself, is ``prod``)."""
    ids, weights, E = _scatter_gate(gate)
    outs = list(arg(stack, 0, "tensors"))
    if len(outs) != E:
        raise NoMatch(f"{len(outs)} expert outputs are stacked against a gate over {E} experts")
    experts: dict[int, ExpertMLP] = {}
    x = None
    for e, out in enumerate(outs):
        x = _add_expert(experts, e, out, x, final, prod, gate, [])
    return _finish(final, ids, weights, x, E, experts)


# equation -> (gate operand, stack operand), in canonical form (any subscript letters)
_EINSUMS = {canonical_equation("te,ted->td"): (0, 1), canonical_equation("ted,te->td"): (1, 0)}


def dense_einsums(graph: torch.fx.Graph) -> list[Node]:
    """``torch.einsum("te,ted->td", gate, torch.stack(outs, dim=1))`` nodes (either operand order)."""
    return [n for n in graph.nodes if einsum_equation(n) in _EINSUMS]


def _einsum_gate_stack(final: Node) -> tuple[object, object] | None:
    """(gate, stack) operands of a dense-gate einsum, else None."""
    ops = einsum_operands(final)
    if len(ops) != 2:
        return None
    g, st = _EINSUMS[einsum_equation(final)]
    return ops[g], ops[st]


def einsum_stack(final: Node) -> Node | None:
    """The stacked expert outputs a dense-gate einsum reads, else None (not this form)."""
    pair = _einsum_gate_stack(final)
    return pair[1] if pair is not None and _is_expert_stack(pair[1]) else None


def match_dense_einsum(final: Node) -> DenseGateMatch:
    """``final`` is ``torch.einsum("te,ted->td", gate, torch.stack([expert_e(x) for e], dim=1))``
    with the dense top-k gate: ``sum_e gate[t, e] * expert_e(x)[t]``, the chain form's sum as one
    contraction."""
    stack = einsum_stack(final)
    if stack is None:
        raise NoMatch("the einsum does not contract a gate with torch.stack(expert outputs, dim=1)")
    gate = _einsum_gate_stack(final)[0]
    if not isinstance(gate, Node) or len(shape(gate) or ()) != 2:
        raise NoMatch("the einsum's gate is not a [T, E] tensor")
    return _match_stacked(final, final, stack, gate)
