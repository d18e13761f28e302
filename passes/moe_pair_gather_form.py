"""Match naive form 4: per-pair weight gather and bmm.

The form, as Dynamo sees it (S = T*k pairs, pair p = t*k + j)::

    flat = ids.reshape(-1)                                   # [S]
    xs   = x.repeat_interleave(k, dim=0).unsqueeze(1)        # [S, 1, d]: row p is x[p // k]
    h    = act(bmm(xs, W1[flat]))                            # W1 [E, d, I], copied per pair
         # or act(bmm(xs, Wg[flat])) * bmm(xs, Wu[flat])      (gated)
    y    = bmm(h, W2[flat]).squeeze(1)                       # [S, d]
    out  = (y.view(T, k, d) * w.unsqueeze(-1)).sum(dim=1)    # w [T, k]

Hugging Face transformers v5's ``batched_mm`` experts write each projection the other way
round and weight the rows before the slot sum::

    h    = bmm(W1[flat], x.repeat_interleave(k, dim=0).unsqueeze(-1)).squeeze(-1)   # W1 [E, out, in]
    y    = bmm(W2[flat], act(h).unsqueeze(-1)).squeeze(-1)   # a gated h: one gate_up W1, chunk(2)
    out  = (y * w.reshape(-1).unsqueeze(-1)).view(T, k, d).sum(dim=1)

Row p of every tensor belongs to token p // k and slot p % k, and its expert is
``ids[t, j]``, so ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``: the blaze op with the
stacked weights used as they are (transposed views), and no per-pair copy.

The same form with einsums (gpt-fast's Mixtral, ``match_pair_gather_einsum``), weights gathered
as ``[T, k, out, in]`` (or ``[T, k, in, out]``) by the ``[T, k]`` ids themselves::

    h   = act(einsum("ti,taoi->tao", x, W1[ids])) [* einsum("ti,taoi->tao", x, W3[ids])]
    y   = einsum("tao,taio->tai", h, W2[ids])                 # [T, k, d]
    out = einsum("tai,ta->ti", y, w)

(any subscript letters, either operand order).
"""

from __future__ import annotations

import torch
import torch.fx

from blazec.passes._fx import (
    NoMatch, arg, canonical_equation, einsum_equation, einsum_operands, flat_of, is_fn, is_getitem, is_method, is_mul,
    shape, slot_sum_input, weighted_rows,
)
from blazec.passes.moe_expert_mlp import GATED, ExpertMLP, FinalMatch, WeightRef, _activation
from blazec.passes.moe_loop_form import _check_dtypes, _ids_bound

Node = torch.fx.Node


def _check_ids_in_range(ids: Node, E: int) -> None:
    """``P[ids]`` takes any id in [-E, E) (a negative one counts from the end), the blaze op
    only [0, E): the ids must be topk indices over at most E scores, as for the loop form."""
    if len(shape(ids) or ()) != 2:
        raise NoMatch(f"the routing ids have shape {shape(ids)}; the blaze op routes [T, k] ids")
    try:
        bound = _ids_bound(ids)
    except NoMatch:
        raise NoMatch("cannot prove the routing ids lie in [0, E) (P[ids] also takes ids in [-E, 0), counting "
                      "from the end, where the blaze op refuses them): they are not topk indices over the "
                      "experts' scores") from None
    if bound > E:
        raise NoMatch(f"the routing ids are topk indices over {bound} scores, but the gathered weights hold "
                      f"{E} experts")


def _squeezed(node: object, dims: tuple) -> Node | None:
    if is_method(node, "squeeze") and len(node.args) == 2 and node.args[1] in dims:
        return node.args[0]
    return None


def _is_gather(node: object) -> bool:
    return is_getitem(node) and isinstance(node.args[0], Node) and node.args[0].op in ("placeholder", "get_attr")


def _pair_linear(node: object, flat: list) -> tuple[Node, bool, Node]:
    """(P, transposed, rows) of one per-pair projection of ``rows``:

    - ``bmm(rows, P[flat])`` (``rows`` [S, 1, in], P [E, in, out]), optionally ``.squeeze(1)``;
    - ``bmm(P[flat], rows.unsqueeze(-1)).squeeze(-1)`` (``rows`` [S, in], P [E, out, in]:
      Hugging Face v5's ``batched_mm`` experts).
    """
    inner = _squeezed(node, (1, -2, 2, -1))
    mm = inner if inner is not None else node
    if not is_fn(mm, torch.bmm):
        raise NoMatch("expected a bmm of the repeated rows with gathered weights")
    a, b = mm.args[:2]
    if _is_gather(a):  # P[e] @ row
        rows = b.args[0] if is_method(b, "unsqueeze") and arg(b, 1, "dim") in (-1, 2) else None
        if rows is None or _squeezed(node, (-1, 2)) is None:
            raise NoMatch("a bmm of gathered weights by rows is not bmm(P[ids], rows.unsqueeze(-1)).squeeze(-1)")
        return _gathered_param(a, flat), False, rows
    if inner is not None and _squeezed(node, (1, -2)) is None:
        raise NoMatch("a bmm of rows by gathered weights is squeezed along another dim than 1")
    return _gathered_param(b, flat), True, a


def _flat_weights(node: object) -> Node | None:
    """``w`` for ``w.reshape(-1).unsqueeze(-1)`` (or ``view(-1)``, ``flatten()``)."""
    if not (is_method(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 1)):
        return None
    return flat_of(node.args[0])


def _pair_products(final: Node) -> tuple[Node, Node, Node]:
    """(the [T, k, d] view, the [S, d] expert outputs, w) of ``(y.view(T, k, d) * w.unsqueeze(-1)).sum(1)``,
    or of ``(y * w.reshape(-1).unsqueeze(-1)).view(T, k, d).sum(1)`` (Hugging Face v5's
    ``batched_mm`` experts): either way row p is pair p, weighted by ``w.flat[p]``."""
    head = slot_sum_input(final)
    if is_mul(head):
        pair = weighted_rows(head)
        if pair is None:
            raise NoMatch("the routing weights are not broadcast with unsqueeze(-1)")
        yv, w = pair
        if not is_method(yv, "view", "reshape"):
            raise NoMatch("expert outputs are not viewed as [T, k, d]")
        return yv, yv.args[0], w
    if not (is_method(head, "view", "reshape") and is_mul(head.args[0])):
        raise NoMatch("the slot sum is not over expert outputs times routing weights")
    prod = head.args[0]
    for a, b in ((prod.args[0], prod.args[1]), (prod.args[1], prod.args[0])):
        w = _flat_weights(b)
        if w is not None:
            return head, a, w
    raise NoMatch("the pair rows are not scaled by w.reshape(-1).unsqueeze(-1)")


def _gathered_param(node: object, flat: list) -> Node:
    """``P[flat]`` with P a 3-D parameter; the same ``flat`` for every gather."""
    if not (is_getitem(node) and isinstance(node.args[0], Node) and node.args[0].op in ("placeholder", "get_attr")
            and isinstance(node.args[1], Node) and len(shape(node.args[0]) or ()) == 3):
        raise NoMatch("a weight operand is not a per-pair gather P[ids] of a 3-D parameter")
    if flat and node.args[1] is not flat[0]:
        raise NoMatch("the weight gathers use different index tensors")
    flat.append(node.args[1])
    return node.args[0]


def _hidden(h: object, project, op: str) -> tuple[str, object, object]:
    """(activation, gate projection, up projection or None) of the hidden ``act(P) [* P]``,
    each projection as ``project(node, "gate" | "up")`` reads it (``op``: its name, for the
    reasons)."""
    act = _activation(h) if isinstance(h, Node) else None
    if act is not None:
        return act[0], project(act[1], "gate"), None
    if is_mul(h):
        for an, un in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
            act = _activation(an) if isinstance(an, Node) else None
            if act is not None and act[0] in GATED:
                return GATED[act[0]], project(act[1], "gate"), project(un, "up")
        raise NoMatch("hidden is a product without a supported gated activation")
    raise NoMatch(f"hidden is not act({op}) or act({op}) * {op}")


def match_pair_gather(final: Node) -> FinalMatch:
    yv, y, w = _pair_products(final)
    flat, xs, layout = [], [], {}

    def project(node: object, role: str) -> Node:
        """One first-layer projection of the pair rows; a chunk of one gate_up bmm sets its half."""
        half = None
        if is_getitem(node) and is_method(node.args[0], "chunk") and arg(node.args[0], 1, "chunks") == 2 \
                and node.args[1] in (0, 1):
            mm = node.args[0].args[0]
            nd = len(shape(mm) or ())
            if arg(node.args[0], 2, "dim", 0) not in (-1, nd - 1):
                raise NoMatch("the gate/up projection is chunked along another dim than its features")
            width = int(shape(mm)[-1])
            half = (0, width // 2) if node.args[1] == 0 else (width // 2, width)
            node = mm
        P, transposed, rows = _pair_linear(node, flat)
        if xs and rows is not xs[0]:
            raise NoMatch("the first-layer bmm's do not read the same repeated rows")
        xs.append(rows)
        layout[role] = (transposed, half)
        return P

    down, down_t, h = _pair_linear(y, flat)  # the second projection reads h, not the rows
    name, gate, up = _hidden(h, project, "bmm")
    ri = xs[0].args[0] if is_method(xs[0], "unsqueeze") and arg(xs[0], 1, "dim") == 1 else xs[0]
    if not (is_method(ri, "repeat_interleave") and isinstance(arg(ri, 1, "repeats"), int) and arg(ri, 2, "dim") == 0):
        raise NoMatch("the pair rows are not x.repeat_interleave(k, dim=0) (with .unsqueeze(1) before a bmm)")
    x, k = ri.args[0], arg(ri, 1, "repeats")
    ids = flat[0].args[0] if is_method(flat[0], "reshape", "view", "flatten") else None
    if ids is None or (is_method(flat[0], "reshape", "view") and tuple(flat[0].args[1:]) not in ((-1,), ((-1,),))):
        raise NoMatch("the weight gather index is not ids.reshape(-1)")
    T = shape(x)[0]
    want = (str(T), str(k))  # symbolic sizes compare by expression, without guarding on them
    if any(tuple(map(str, (shape(n) or ())[:2])) != want for n in (ids, w, yv)):
        raise NoMatch(f"ids {shape(ids)}, weights {shape(w)} and the [T, k, d] view disagree with T={T}, k={k}")
    E = int(shape(gate)[0])
    if any(int(shape(P)[0]) != E for P in (down, up) if P is not None):
        raise NoMatch("the gathered weight tensors have different numbers of experts")
    _check_ids_in_range(ids, E)
    experts = {}
    for e in range(E):  # the stacked weights as they are (views), never per-pair copies
        experts[e] = ExpertMLP(name, WeightRef(gate, e, transposed=layout["gate"][0], rows=layout["gate"][1]),
                               None if up is None else WeightRef(up, e, transposed=layout["up"][0],
                                                                 rows=layout["up"][1]),
                               WeightRef(down, e, transposed=down_t), None, None, None)
    _check_dtypes(x, experts)
    return FinalMatch(final, ids, w, x, k, experts)



# ---------------------------------------------------------------------------------------------
# The einsum spelling

def _eqs(table: dict[str, tuple]) -> dict[str, tuple]:
    return {canonical_equation(k): v for k, v in table.items()}


# equation -> (operand of the experts' outputs, operand of the routing weights)
_FINAL = _eqs({"tai,ta->ti": (0, 1), "ta,tai->ti": (1, 0)})
# equation -> (rows operand, gathered weight operand, transposed: the weight is [in, out])
_UP = _eqs({"ti,taoi->tao": (0, 1, False), "taoi,ti->tao": (1, 0, False),
            "ti,taio->tao": (0, 1, True), "taio,ti->tao": (1, 0, True)})
_DOWN = _eqs({"tao,taio->tai": (0, 1, False), "taio,tao->tai": (1, 0, False),
              "tao,taoi->tai": (0, 1, True), "taoi,tao->tai": (1, 0, True)})


def pair_einsums(graph: torch.fx.Graph) -> list[Node]:
    """Candidate results of the einsum spelling: ``einsum("tai,ta->ti", y, w)`` nodes."""
    return [n for n in graph.nodes if einsum_equation(n) in _FINAL]


def has_einsum_param_gather(final: Node) -> bool:
    """Whether the experts' outputs come from an einsum with a gathered 3-D parameter (so a
    failed match is a near miss)."""
    ops = einsum_operands(final)
    y = ops[_FINAL[einsum_equation(final)][0]] if len(ops) == 2 else None
    return einsum_equation(y) in _DOWN and any(
        is_getitem(o) and isinstance(o.args[0], Node) and o.args[0].op in ("placeholder", "get_attr")
        for o in einsum_operands(y))


def _projection(node: object, table: dict, rows: list, flat: list, what: str) -> tuple[Node, bool]:
    eq = einsum_equation(node)
    if eq not in table:
        raise NoMatch(f"the {what} projection is not an einsum of the rows with gathered weights "
                      f"(einsum('ti,taoi->tao', x, W[ids]) or the like)")
    ops = einsum_operands(node)
    if len(ops) != 2:
        raise NoMatch(f"the {what} einsum has {len(ops)} operands")
    r, wi, transposed = table[eq]
    if rows and ops[r] is not rows[0]:
        raise NoMatch(f"the {what} einsum does not read the same rows as the others")
    rows.append(ops[r])
    return _gathered_param(ops[wi], flat), transposed


def match_pair_gather_einsum(final: Node) -> FinalMatch:
    ops = einsum_operands(final)
    if len(ops) != 2:
        raise NoMatch("the combine einsum does not take two operands")
    iy, iw = _FINAL[einsum_equation(final)]
    y, w = ops[iy], ops[iw]
    flat: list = []
    down, down_t = _projection(y, _DOWN, [], flat, "down")
    h = einsum_operands(y)[_DOWN[einsum_equation(y)][0]]
    xs: list = []
    name, (gate, gate_t), up_proj = _hidden(h, lambda n, what: _projection(n, _UP, xs, flat, what), "einsum")
    up, up_t = up_proj if up_proj is not None else (None, False)
    x, ids = xs[0], flat[0]
    if len(shape(x) or ()) != 2 or len(shape(ids) or ()) != 2:
        raise NoMatch(f"the rows {shape(x)} are not [T, d] or the gather index {shape(ids)} is not [T, k]")
    T, k = shape(ids)
    if not isinstance(k, int):
        raise NoMatch(f"the number of experts per token {k} is not a constant")
    want = (str(shape(x)[0]), str(k))  # symbolic sizes compare by expression, without guarding on them
    if tuple(map(str, shape(ids))) != want or any(tuple(map(str, (shape(n) or ())[:2])) != want for n in (w, y)) \
            or len(shape(w) or ()) != 2:
        raise NoMatch(f"ids {shape(ids)}, weights {shape(w)} and the experts' outputs {shape(y)} disagree with "
                      f"T={shape(x)[0]}, k={k}")
    E = int(shape(gate)[0])
    if any(int(shape(P)[0]) != E for P in (down, up) if P is not None):
        raise NoMatch("the gathered weight tensors have different numbers of experts")
    _check_ids_in_range(ids, E)
    experts = {}
    for e in range(E):
        experts[e] = ExpertMLP(name, WeightRef(gate, e, transposed=gate_t),
                               None if up is None else WeightRef(up, e, transposed=up_t),
                               WeightRef(down, e, transposed=down_t), None, None, None)
    _check_dtypes(x, experts)
    return FinalMatch(final, ids, w, x, k, experts)
