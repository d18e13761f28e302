"""Match naive form 3: sort-based grouped experts with a per-expert loop over split rows.

The form, as Dynamo sees it (S = T*k pairs, pair p = t*k + j)::

    flat   = ids.reshape(-1)                          # [S]
    perm   = argsort(flat)                            # or sort(flat)[1]; pairs grouped by expert
    tok    = perm // k                                # token of each sorted row
    rows   = x[tok]
    counts = histc(flat.float(), bins=E, min=0, max=E-1)   # or bincount(flat, minlength=E)
    outs   = [expert_e(chunk) for e, chunk in enumerate(rows.split(counts.tolist()))]
    y_rows = cat(outs) * w.reshape(-1)[perm, None]
    out    = zeros_like(x).index_add_(0, tok, y_rows)

Sorted row r is pair ``perm[r]``: token ``perm[r] // k``, weight ``w.flat[perm[r]]`` and, because
``counts`` counts each expert id and the sort groups equal ids, expert ``flat[perm[r]]``. So
``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`` whatever order the sort leaves within
an expert: the blaze op. The same holds for ``torch._grouped_mm(rows, W, offs=cumsum(counts))``
in place of the loop (the bf16 spelling): group e of the sorted rows uses ``W[e]``.

The sum can also put the rows back in pair order and sum each token's k slots
(:func:`match_sorted_unpermute`), weighted there or, as Hugging Face transformers v5's
``grouped_mm`` experts write it, already in sorted order::

    counts = histc(sort(flat)[0].float(), bins=E, min=0, max=E-1)
    h      = grouped_mm(rows.to(W.dtype), W_gate_up.transpose(-2, -1), offs=cumsum(counts, dtype=int32))
    yw     = grouped_mm(act(h), W_down.transpose(-2, -1), offs) * w.reshape(-1)[perm].unsqueeze(-1)
    inv    = empty_like(perm); inv[perm] = arange(S)        # the inverse permutation
    out    = yw[inv].view(T, k, d).sum(dim=1)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from blazec.passes._fx import (
    LINEAR, NoMatch, arg, check_combine_dtypes, check_no_rounding, combine_args, dtype, flat_of, follow_first_args,
    is_fn, is_getitem, is_method, is_mul, same_shape, shape, slot_sum_input, strip_casts, weighted_rows,
)
from blazec.passes.moe_expert_mlp import GATED, ExpertMLP, FinalMatch, WeightRef, _activation, check_consistent, parse_expert
from blazec.passes.moe_loop_form import ZEROS_FNS, _check_acc_reads, _check_dtypes, _ids_bound

Node = torch.fx.Node


@dataclass
class SortMatch:
    acc: Node
    index_add: Node
    ids: Node
    weights: Node
    x: Node
    top_k: int
    experts: dict[int, ExpertMLP]


def _token_of(tok: object) -> tuple[Node, int] | None:
    """(perm, k) for ``perm // k``, ``torch.floor_divide(perm, k)`` or ``perm.div(k,
    rounding_mode="floor" | "trunc")`` (GraniteMoE, JetMoE) with a constant k, else None. Pair
    positions are >= 0, where truncation and flooring agree."""
    if is_fn(tok, operator.floordiv, torch.floor_divide) or is_method(tok, "floor_divide"):
        pass
    elif is_fn(tok, torch.div) or is_method(tok, "div"):
        if arg(tok, 2, "rounding_mode") not in ("floor", "trunc"):
            return None
    else:
        return None
    perm, k = tok.args[0], arg(tok, 1, "other")
    return (perm, k) if isinstance(perm, Node) and isinstance(k, int) and not isinstance(k, bool) and k > 0 else None


def _perm_of(tok: Node) -> tuple[Node, Node, int]:
    """tok = perm // k with perm = argsort(flat) -> (perm, flat, k)."""
    found = _token_of(tok)
    if found is None:
        raise NoMatch("the index_add_ index is not sorted-pair-order // k")
    perm, k = found
    return perm, _sorted_order(perm), k


def _check_ascending(srt: Node, what: str) -> None:
    """``argsort``/``sort`` of a 1-D tensor, ascending (dim and descending by position or keyword)."""
    if arg(srt, 1, "dim", -1) not in (-1, 0):
        raise NoMatch(f"{what} are sorted along an unexpected dimension")
    if arg(srt, 2, "descending", False) is not False:
        raise NoMatch(f"{what} are sorted in descending order (or the order is not a constant)")


def _counts_ok(counts: Node, flat: Node, E: int) -> bool:
    """counts[e] == number of pairs with id e, for ids in [0, E)."""
    c, _ = strip_casts(counts)
    if is_method(c, "long", "int"):
        c = c.args[0]
    if is_fn(c, torch.histc):
        src, _ = strip_casts(c.args[0])
        bins, lo, hi = arg(c, 1, "bins"), arg(c, 2, "min"), arg(c, 3, "max")
        # integer v in [0, E-1] lands in bin floor(v * E / (E - 1)) = v: exact for E >= 2
        return _same_ids(src, flat) and bins == E and lo == 0 and hi == E - 1 and E >= 2
    if is_fn(c, torch.bincount):  # weights would make the counts sums of weights
        return _same_ids(arg(c, 0, "input"), flat) and arg(c, 1, "weights") is None and arg(c, 2, "minlength") == E
    return _one_hot_counts(c, flat, E)


def _same_flat(a: object, flat: Node) -> bool:
    """``a`` is ``flat``, or another ``reshape(-1)`` / ``flatten()`` of the same ids."""
    return a is flat or (flat_of(a) is not None and flat_of(a) is flat_of(flat))


def _sort_of(node: object, output: int) -> Node | None:
    """The ``sort`` call of ``sort(t)[output]`` (0: the values, 1: the indices), else None."""
    if is_getitem(node) and node.args[1] == output and (is_fn(node.args[0], torch.sort)
                                                         or is_method(node.args[0], "sort")):
        return node.args[0]
    return None


def _is_argsort(node: object) -> bool:
    return is_fn(node, torch.argsort) or is_method(node, "argsort")


def _same_ids(a: object, flat: Node) -> bool:
    """``a`` holds the ids of ``flat`` as a multiset (what a count reads): :func:`_same_flat`, or
    the sorted values ``sort(flat)[0]`` (Hugging Face's ``histc(expert_ids_g, ...)``)."""
    a, _ = strip_casts(a)
    srt = _sort_of(a, 0)
    return _same_flat(srt.args[0] if srt is not None else a, flat)


def _one_hot_counts(c: Node, flat: Node, E: int) -> bool:
    """``zeros(T, E).scatter(1, ids, 1).long().sum(0)`` (GraniteMoE, JetMoE): each pair sets
    its own entry of its token's row, since topk ids are distinct within a row and lie in
    [0, E), so column e sums to the count of id e. The integer cast comes before the sum."""
    if not (is_method(c, "sum") and arg(c, 1, "dim") in (0, -2, (0,), [0]) and not arg(c, 2, "keepdim", False)
            and "dtype" not in c.kwargs):
        return False
    g = c.args[0]
    if not (is_method(g, "long", "int") or (is_method(g, "to") and g.args[1:] in ((torch.int64,), (torch.int32,)))):
        return False
    g = g.args[0]
    if not ((is_method(g, "scatter") or is_fn(g, torch.scatter)) and arg(g, 1, "dim") in (1, -1)
            and arg(g, 3, "value", arg(g, 3, "src")) == 1 and "reduce" not in g.kwargs):
        return False
    base, ids = g.args[0], arg(g, 2, "index")
    if ids is not flat_of(flat) or not (is_fn(base, *ZEROS_FNS) or is_method(base, "new_zeros")):
        return False
    if tuple(map(str, shape(base) or ())) != tuple(map(str, (shape(ids)[0], E))):
        return False
    try:
        return _ids_bound(ids) == E
    except NoMatch:
        return False


def match_sorted(acc: Node, index_adds: list[Node]) -> SortMatch:
    if len(index_adds) != 1:
        raise NoMatch("a sorted dispatch combines with exactly one index_add_")
    (ia,) = index_adds
    if not (is_fn(acc, *ZEROS_FNS) or is_method(acc, "new_zeros")):
        raise NoMatch("the accumulator is not created with zeros/zeros_like/new_zeros")
    tok, source = combine_args(ia)
    perm, flat, k = _perm_of(tok)
    ids = flat_of(flat)
    if ids is None or len(shape(ids) or ()) != 2 or int(shape(ids)[1]) != k:
        raise NoMatch(f"the sorted ids are not ids[T, {k}].reshape(-1)")

    src, src_casts, weights, y_rows = _scaled_sorted_rows(source, perm, "combined rows")
    experts, x = sorted_experts(y_rows, perm, k, flat)
    y, y_casts = strip_casts(y_rows)
    check_combine_dtypes("the sorted experts", dtype(acc), src, y, x, weights, src_casts, y_casts)
    xs = shape(x)
    if xs is None or len(xs) != 2 or str(xs[0]) != str(shape(ids)[0]) or not same_shape(acc, xs):
        raise NoMatch(f"x {xs}, ids {shape(ids)} and the accumulator {shape(acc)} do not agree on [T, d]")
    if not same_shape(weights, ids):
        raise NoMatch(f"routing weights {shape(weights)} and ids {shape(ids)} differ in shape")
    check_consistent(experts)
    _check_dtypes(x, experts)
    _check_acc_reads(acc, index_adds)
    return SortMatch(acc, ia, ids, weights, x, k, experts)


# torch._grouped_mm, and torch.nn.functional.grouped_mm where it exists and Dynamo keeps it
# (torch 2.13 inlines it to torch._grouped_mm)
GROUPED_MM = tuple(f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None)


# Hugging Face transformers' own grouped GEMM, which its experts call under torch.compile for
# dtypes other than bf16 (torch._grouped_mm traces only for bf16): the same products,
# ``input[rows of group e] @ weight[e]``, as a loop over the groups
# (transformers/integrations/moe.py, ``grouped_mm_fallback(input, weight, offs)``)
HF_GROUPED_MM = "transformers::grouped_mm_fallback"


def _is_grouped_mm(node: object) -> bool:
    if not (isinstance(node, Node) and node.op == "call_function"):
        return False
    if node.target in GROUPED_MM:
        return True
    packet = getattr(node.target, "_overloadpacket", node.target)
    return getattr(packet, "_qualified_op_name", None) == HF_GROUPED_MM


def _untransposed(W: object) -> tuple[object, bool]:
    """(P, True) for ``P.transpose(-2, -1)`` (or ``(1, 2)``, ``.mT``, ``permute(0, 2, 1)``) of a
    3-D ``P``: a weight stored [E, out, in] passed to grouped_mm as [E, in, out] (Hugging Face
    v5's experts); else (W, False)."""
    if not isinstance(W, Node) or len(shape(W) or ()) != 3:
        return W, False
    if (is_method(W, "transpose") or is_fn(W, torch.transpose)) and \
            {d % 3 for d in W.args[1:3] if isinstance(d, int)} == {1, 2} and len(W.args) == 3:
        return W.args[0], True
    if is_method(W, "permute") and tuple(a % 3 for a in (W.args[1:] if len(W.args) > 2 else W.args[1])) == (0, 2, 1):
        return W.args[0], True
    if is_fn(W, getattr) and W.args[1] == "mT":
        return W.args[0], True
    return W, False


def _grouped(node: object, groups: list) -> tuple[Node, Node, bool]:
    """(rows, W, transposed) of a GEMM over rows in sorted-pair order, group e by W[e]:

    - ``torch._grouped_mm(rows, W, offs=O)``: ``rows @ W[e]`` (transposed);
    - ``torch.cat([F.linear(c, W[e]) for e, c in enumerate(rows.split(sizes))])``: GraniteMoE's
      and JetMoE's ``ParallelExperts``.

    W is a 3-D parameter. ``groups`` collects each GEMM's ``O`` or ``sizes``; all must be the same
    (the caller proves the first are the per-expert counts)."""
    if _is_grouped_mm(node):
        if arg(node, 3, "bias") is not None or arg(node, 4, "out_dtype") is not None:
            raise NoMatch("torch._grouped_mm with bias or out_dtype is not matched")
        rows, group = node.args[0], ("offs", arg(node, 2, "offs"))
        W, flipped = _untransposed(arg(node, 1, "mat_b", arg(node, 1, "weight")))  # torch's name, transformers'
        transposed = not flipped  # rows @ W[e], or rows @ P[e].T = F.linear(rows, P[e])
    elif is_fn(node, torch.cat) and arg(node, 1, "dim", 0) in (0, -2):
        rows, W, sizes = _split_linears(node)
        group, transposed = ("sizes", tuple(sizes)), False
    else:
        raise NoMatch("a projection is neither torch._grouped_mm of the sorted rows nor a concatenation of "
                      "per-expert linears of their split")
    if groups and group != groups[0]:
        raise NoMatch("the grouped GEMMs use different group offsets or split sizes")
    groups.append(group)
    if not (isinstance(W, Node) and W.op in ("placeholder", "get_attr") and len(shape(W) or ()) == 3):
        raise NoMatch("a grouped GEMM weight is not a 3-D parameter")
    return rows, W, transposed


def _split_linears(cat: Node) -> tuple[Node, Node, list]:
    """(rows, W, sizes) for ``torch.cat([F.linear(c, W[e]) for e, c in enumerate(rows.split(sizes))])``."""
    split = W = None
    for e, part in enumerate(cat.args[0]):
        if not (is_fn(part, *LINEAR) and arg(part, 2, "bias") is None):
            raise NoMatch(f"part {e} of a concatenated projection is not a linear without bias")
        chunk, w = part.args[0], arg(part, 1, "weight")
        if not (_is_split_chunk(chunk) and chunk.args[1] == e) or (split is not None and chunk.args[0] is not split):
            raise NoMatch(f"part {e} of a concatenated projection does not read chunk {e} of one split")
        if not (is_getitem(w) and w.args[1] == e and (W is None or w.args[0] is W)):
            raise NoMatch(f"part {e} of a concatenated projection does not use W[{e}] of one stacked weight")
        split, W = chunk.args[0], w.args[0]
    if split is None:
        raise NoMatch("an empty concatenation")
    sizes = arg(split, 1, "split_size_or_sections", arg(split, 1, "split_size"))
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(cat.args[0]):
        raise NoMatch("the split sizes are not one count per expert")
    return split.args[0], W, list(sizes)


def sorted_experts(y_rows: Node, perm: Node, k: int, flat: Node) -> tuple[dict[int, ExpertMLP], Node]:
    """The experts and ``x`` behind expert outputs in sorted-pair order (grouped_mm or split loop)."""
    y, _ = strip_casts(y_rows)
    check_no_rounding(y, "on the expert outputs")
    grouped = _is_grouped_mm(y) or _splits_hidden(y, perm, k)
    return _grouped_experts(y, perm, k, flat) if grouped else _split_experts(y, perm, k, flat)


def _splits_hidden(y: Node, perm: Node, k: int) -> bool:
    """Whether ``y`` concatenates per-expert down projections of a split of the experts' hidden
    (``ParallelExperts``), not per-expert MLPs of a split of ``x[perm // k]``."""
    if not (is_fn(y, torch.cat) and y.args[0] and is_fn(y.args[0][0], *LINEAR)):
        return False
    chunk = y.args[0][0].args[0]
    if not _is_split_chunk(chunk):
        return False
    rows = chunk.args[0].args[0]
    return not (is_getitem(rows) and _same_tok(rows.args[1], perm, k))


def _grouped_experts(out: Node, perm: Node, k: int, flat: Node) -> tuple[dict[int, ExpertMLP], Node]:
    """y_rows = _grouped_mm(act(g) [* u], W_down, offs) with g, u grouped GEMMs of x[perm // k]."""
    groups: list = []
    h, down, down_t = _grouped(out, groups)
    h, _ = strip_casts(h)  # Hugging Face's input.to(weight.dtype): exact here, or refused below
    check_no_rounding(h, "on the expert hidden before the down projection")
    act = _activation(h)
    chunk_of = {}
    if act is not None:
        name, gate_in, up_in = act[0], act[1], None
    elif is_mul(h):
        name = gate_in = up_in = None
        for a, u in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
            act = _activation(a) if isinstance(a, Node) else None
            if act is not None and act[0] in GATED:
                name, gate_in, up_in = GATED[act[0]], act[1], u
                break
        if name is None:
            raise NoMatch("the expert hidden is a product without a supported gated activation")
    else:
        raise NoMatch("the expert hidden is not act(grouped_mm) or act(grouped_mm) * grouped_mm")
    rows = None
    refs = {}
    for role, node in (("gate", gate_in), ("up", up_in)):
        if node is None:
            continue
        if is_getitem(node) and is_method(node.args[0], "chunk") and arg(node.args[0], 1, "chunks") == 2 \
                and arg(node.args[0], 2, "dim", 0) in (-1, 1):
            mm = node.args[0].args[0]
            width = int(shape(mm)[-1])
            chunk_of[role] = (0, width // 2) if node.args[1] == 0 else (width // 2, width)
            node = mm
        r, W, t = _grouped(node, groups)
        r, _ = strip_casts(r)
        check_no_rounding(r, "on the gathered rows before the grouped GEMM")
        if rows is not None and r is not rows:
            raise NoMatch("the gate and up projections read different rows")
        rows, refs[role] = r, (W, t)
    if not (is_getitem(rows) and _same_tok(rows.args[1], perm, k)):
        raise NoMatch("the grouped GEMM rows are not x[perm // k]")
    x = rows.args[0]
    E = int(shape(down)[0])
    kind, group = groups[0]
    if kind == "offs":
        offsets, _ = strip_casts(group)
        if not (is_fn(offsets, torch.cumsum) and arg(offsets, 1, "dim") == 0 and _counts_ok(offsets.args[0], flat, E)):
            raise NoMatch("cannot prove the group offsets are the cumulative per-expert counts of the sorted ids")
    elif len(group) != E:
        raise NoMatch(f"{len(group)} split sizes for {E} experts")
    else:
        _check_split_sizes(group, flat, E)

    def ref(role, e):
        if role not in refs:
            return None
        return WeightRef(refs[role][0], e, transposed=refs[role][1], rows=chunk_of.get(role))

    experts = {e: ExpertMLP(name, ref("gate", e), ref("up", e), WeightRef(down, e, transposed=down_t), None, None, None)
               for e in range(E)}
    return experts, x


def _split_experts(y_rows: Node, perm: Node, k: int, flat: Node) -> tuple[dict[int, ExpertMLP], Node]:
    """Experts and x for ``y_rows = cat([expert_e(chunk_e) for e, chunk_e in enumerate(x[perm // k].split(counts))])``."""
    y_rows, _ = strip_casts(y_rows)
    if not (is_fn(y_rows, torch.cat) and arg(y_rows, 1, "dim", 0) in (0, -2)):
        raise NoMatch("expert outputs are not concatenated in sorted order (torch.cat)")
    outs = list(y_rows.args[0])
    E = len(outs)
    experts: dict[int, ExpertMLP] = {}
    split = x = None
    for e, out in enumerate(outs):
        out, _ = strip_casts(out)
        check_no_rounding(out, f"on expert {e}'s output")
        if dtype(out) != dtype(outs[e]):
            raise NoMatch(f"expert {e}'s output is cast to {dtype(outs[e])} before the routing-weight multiply")
        chunk = follow_first_args(out, _is_split_chunk)
        if not (is_getitem(chunk) and chunk.args[1] == e):
            raise NoMatch(f"output {e} of the concatenation does not come from split chunk {e}")
        if split is None:
            split = chunk.args[0]
        elif chunk.args[0] is not split:
            raise NoMatch(f"expert {e} reads a different split than expert 0")
        experts[e] = parse_expert(out, chunk, e, lambda n: False)
    if not (is_fn(split, torch.split) or is_method(split, "split")):
        raise NoMatch("expert inputs are not rows.split(counts)")
    rows, sizes = split.args[0], arg(split, 1, "split_size_or_sections", arg(split, 1, "split_size"))
    if not (is_getitem(rows) and _same_tok(rows.args[1], perm, k)):
        raise NoMatch("the split rows are not x[perm // k]")
    x = rows.args[0]
    if not isinstance(sizes, (list, tuple)) or len(sizes) != E:
        raise NoMatch("the split sizes are not one count per expert")
    _check_split_sizes(sizes, flat, E)
    return experts, x


def _check_split_sizes(sizes, flat: Node, E: int) -> None:
    """NoMatch unless ``sizes`` is ``counts.tolist()`` (``counts[e].item()`` each, as Dynamo
    traces it) of the per-expert counts of the sorted ids."""
    counts = None
    for e, s in enumerate(sizes):
        c = s.args[0] if is_method(s, "item") else None
        if not (is_getitem(c) and c.args[1] == e):
            raise NoMatch(f"split size {e} is not counts[{e}]")
        if counts is None:
            counts = c.args[0]
        elif c.args[0] is not counts:
            raise NoMatch("split sizes come from different count tensors")
    if not _counts_ok(counts, flat, E):
        raise NoMatch("cannot prove the split sizes are the per-expert counts of the sorted ids "
                      "(expected histc(ids, bins=E, min=0, max=E-1) or bincount(ids, minlength=E))")


def _is_split_chunk(node: Node) -> bool:
    return is_getitem(node) and (is_fn(node.args[0], torch.split) or is_method(node.args[0], "split"))


def _same_tok(node: object, perm: Node, k: int) -> bool:
    return _token_of(node) == (perm, k)


def _scaled_sorted_rows(node: object, perm: Node, what: str) -> tuple[Node, list[Node], Node, Node]:
    """(product, the exact casts after it, w, y_rows) for sorted expert outputs ``y_rows`` scaled
    by their routing weights ``w.reshape(-1)[perm, None]`` (a :func:`_weight_gather` spelling)."""
    prod, casts = strip_casts(node)
    check_no_rounding(prod, f"on the {what}")
    if not is_mul(prod):
        raise NoMatch(f"the {what} are not expert outputs scaled by the routing weights")
    for a, b in ((prod.args[0], prod.args[1]), (prod.args[1], prod.args[0])):
        w = _weight_gather(b, perm)
        if w is not None:
            return prod, casts, w, a
    raise NoMatch(f"the {what} are not scaled by w.reshape(-1)[perm, None] (or [perm].unsqueeze(-1)) "
                  "for the same sort order")


def _weight_gather(node: object, perm: Node) -> Node | None:
    """``w.reshape(-1)[perm, None]``, or ``w.reshape(-1)[perm]`` broadcast with ``.unsqueeze(-1)``,
    ``[:, None]`` or ``[..., None]`` (GraniteMoE) -> w."""
    full = slice(None, None, None)
    if (is_method(node, "unsqueeze") and arg(node, 1, "dim") in (-1, 1)) or \
            (is_getitem(node) and isinstance(node.args[1], tuple) and node.args[1] in ((full, None), (Ellipsis, None))):
        node = node.args[0]
        if is_getitem(node) and node.args[1] is perm:
            return flat_of(node.args[0])
        return None
    if is_getitem(node) and isinstance(node.args[1], tuple) and len(node.args[1]) == 2 \
            and node.args[1][0] is perm and node.args[1][1] is None:
        return flat_of(node.args[0])
    return None


def _sorted_order(perm: object) -> Node:
    """``flat`` for a pair order ``perm`` = ``argsort(flat)`` or ``sort(flat)[1]`` (ascending)."""
    srt = perm if _is_argsort(perm) else _sort_of(perm, 1)
    if srt is None:
        raise NoMatch("the pair order is not argsort/sort of the flattened expert ids")
    _check_ascending(srt, "the expert ids")
    return srt.args[0]


def _inverse_of(inv: object, read: Node) -> tuple[Node, set[Node]]:
    """(perm, in-place nodes) for an inverse permutation ``inv`` of ``perm`` that ``read`` indexes by:

    - ``argsort(perm)``;
    - ``inv = empty_like(perm); inv[perm] = arange(S)`` (Hugging Face v5's experts), or
      ``empty_like(perm).scatter_(0, perm, arange(S))`` (or ``scatter``): every entry is written,
      since ``perm`` is a permutation of ``0..S-1`` (the caller proves it is a sort's order of S
      ids). The write must be the buffer's only other use and come before ``read``; an in-place
      one is returned, to be removed with the site.
    """
    if _is_argsort(inv):
        _check_ascending(inv, "the sorted positions (the inverse permutation)")
        return inv.args[0], set()
    what = ("expert outputs are not put back in pair order with argsort(perm) or an inverse permutation "
            "written as inv[perm] = arange(S)")
    if is_method(inv, "scatter_", "scatter") or is_fn(inv, torch.scatter):  # written as it is made
        buf, write = inv.args[0], inv
    elif isinstance(inv, Node):
        buf, writes = inv, [u for u in inv.users if u is not read]
        if len(writes) != 1:
            raise NoMatch(f"the inverse permutation {inv.name} has {len(writes)} uses besides the read, not one write")
        (write,) = writes
        order = {n: i for i, n in enumerate(inv.graph.nodes)}
        if order[write] > order[read]:
            raise NoMatch(f"the inverse permutation {inv.name} is read before it is written")
    else:
        raise NoMatch(what)
    if not (is_fn(buf, torch.empty_like, torch.zeros_like) and isinstance(buf.args[0], Node)):
        raise NoMatch(what)
    perm = buf.args[0]
    if write is inv and list(buf.users) != [write]:
        raise NoMatch(f"the inverse permutation's buffer {buf.name} has uses besides its write")
    if is_fn(write, operator.setitem) and write.args[0] is buf and write.args[1] is perm:
        src = write.args[2]
    elif (is_method(write, "scatter_", "scatter") or is_fn(write, torch.scatter)) and write.args[0] is buf \
            and arg(write, 1, "dim") == 0 and arg(write, 2, "index") is perm and "reduce" not in write.kwargs:
        src = arg(write, 3, "src")
    else:
        raise NoMatch(f"the inverse permutation {inv.name} is written by {write.name}, not as inv[perm] = arange(S)")
    if not _arange_of(src, perm):
        raise NoMatch(f"the inverse permutation {inv.name} is not written with arange(len(perm))")
    if dtype(buf) not in (torch.int64, torch.int32):
        raise NoMatch(f"the inverse permutation {inv.name} is not an int32/int64 index")
    return perm, ({write} if is_fn(write, operator.setitem) or is_method(write, "scatter_") else set())


def _arange_of(src: object, perm: Node) -> bool:
    """``src`` is ``arange(S)`` (start 0, step 1) with S the length of 1-D ``perm``."""
    if not is_fn(src, torch.arange):
        return False
    # arange(end), arange(start, end) or arange(start, end, step); the length is read from the shape
    start = src.args[0] if len(src.args) >= 2 else src.kwargs.get("start", 0)
    step = src.args[2] if len(src.args) >= 3 else src.kwargs.get("step", 1)
    ps, ss = shape(perm), shape(src)
    return (start == 0 and step == 1 and ps is not None and ss is not None and len(ps) == 1
            and tuple(map(str, ss)) == tuple(map(str, ps)))


def match_sorted_unpermute(final: Node) -> FinalMatch:
    """The sorted form combined by inverse permutation, weighted after it or before it::

        y = y_rows[inv]                                          # back to pair order
        out = (y.view(T, k, d) * w.unsqueeze(-1)).sum(dim=1)

        yw = y_rows * w.reshape(-1)[perm].unsqueeze(-1)          # Hugging Face v5's experts
        out = yw[inv].view(T, k, d).sum(dim=1)

    with ``inv = argsort(perm)``, or ``inv = empty_like(perm); inv[perm] = arange(S)``. Row p of
    ``y`` is pair p (token p // k, slot p % k); row p of ``yw[inv]`` is sorted row ``inv[p]``,
    which is pair ``perm[inv[p]] = p``, times ``w.flat[perm[inv[p]]] = w.flat[p]``. Either way
    ``out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])``, with the products in the same dtype.
    """
    head = slot_sum_input(final)  # NoMatch naming what differs from a slot sum
    weighted_before = not is_mul(head)
    if not weighted_before:
        prod = head
        yv, w = weighted_rows(prod) or (None, None)
        if yv is None or not is_method(yv, "view", "reshape"):
            raise NoMatch("expert outputs are not viewed as [T, k, d] and weighted by w.unsqueeze(-1)")
    elif is_method(head, "view", "reshape"):
        yv = head
    else:
        raise NoMatch("the slot sum is not over expert outputs times routing weights, nor over weighted rows "
                      "viewed as [T, k, d]")
    unperm, contrib_casts = strip_casts(yv.args[0])
    check_no_rounding(unperm, "on the expert outputs")
    if not (is_getitem(unperm) and isinstance(unperm.args[1], Node)):
        raise NoMatch("expert outputs are not put back in pair order with y_rows[inv] (an inverse permutation)")
    perm, links = _inverse_of(unperm.args[1], unperm)
    flat = _sorted_order(perm)
    ids = flat_of(flat)
    k = int(shape(ids)[1]) if ids is not None and len(shape(ids) or ()) == 2 else None
    if k is None:
        raise NoMatch("the sorted ids are not ids[T, k].reshape(-1)")
    if weighted_before:
        prod, more, w, y_rows = _scaled_sorted_rows(unperm.args[0], perm, "rows put back in pair order")
        contrib_casts = contrib_casts + more
        y_casts: list[Node] = []
    else:
        y_rows, y_casts = unperm.args[0], contrib_casts
        contrib_casts = []
    experts, x = sorted_experts(y_rows, perm, k, flat)
    y, more = strip_casts(y_rows)
    check_combine_dtypes("the sorted experts", dtype(final), prod, y, x, w, contrib_casts, y_casts + more)
    T = shape(x)[0]
    want = (str(T), str(k))
    if any(tuple(map(str, (shape(n) or ())[:2])) != want for n in (ids, w, yv)):
        raise NoMatch(f"ids {shape(ids)}, weights {shape(w)} and the [T, k, d] view disagree with T={T}, k={k}")
    check_consistent(experts)
    _check_dtypes(x, experts)
    return FinalMatch(final, ids, w, x, k, experts, links=links)
