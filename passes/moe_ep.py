"""Expert-parallel emission for the MoE rewrite (used by ``passes/moe_dispatch.py``).

When ``expert_parallel`` is set, each matched MoE site becomes, instead of one ``moe_route`` +
``moe_experts`` over all E experts, a software-pipelined chain over ``ep_chunks`` token chunks::

    keep = kept_pairs(ids, E, capacity, priority)            # only for capacity forms
    x_0.., ids_0.., w_0.. = split(x / ids / w, N)            # only for N > 1 (T // N rows each,
                                                              # the first one the rest too)
    P(0) ... P(N-1); splits = ep_exchange_counts(counts of every chunk); rows(0) ... rows(N-1)
    D(0); D(1); C(0); R(0); D(2); C(1); R(1); S(0); ...; C(N-1); R(N-1); S(N-2); S(N-1)
    y = cat(y_0, ..., y_N-1)

with ``P(i) = ep_plan`` (which ranks chunk i's tokens go to, local), one exchange of all
chunks' row counts (the layer's one host sync), ``rows(i) = ep_rows`` (the row order, sized
by the exchanged counts), ``D(i) = ep_send`` (all_to_all of chunk i's rows to the
expert owners),
``C(i) = local_route + moe_experts`` over this rank's E/W experts, ``R(i) = ep_return``
(all_to_all back) and ``S(i) = ep_sum`` (each token's rows summed). Emitting chunk i+1's
dispatch before chunk i's experts, and chunk i-1's sum after them, is the pipeline: the
post-grad ``comm_overlap`` pass sinks each collective's wait to its first use, so D(i+1) and
R(i-1) are in flight while C(i) computes.
The chunks are independent (a token's combine stays inside its chunk), so the result is the
same for any N. Autograd derives the backward chain, with its own reverse all_to_alls, from
this one.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from blazec.expert_parallel import (EPGroup, ep_exchange_counts, ep_plan, ep_return, ep_rows, ep_send, ep_sum,
                                    kept_pairs, local_route)
from blazec.passes._fx import shape
from blazec.passes.moe_expert_mlp import REF_NAMES, weight_list

Node = torch.fx.Node


def expert_parameters(gm: torch.fx.GraphModule, experts: dict) -> list[tuple[Node, torch.Tensor]] | None:
    """The real parameter tensors behind every expert's weights and biases, each with the graph
    node that holds it (None if any is unknown).

    Dynamo lifts parameters to placeholders whose ``grapharg`` holds the tensor; FX graphs
    hold them as ``get_attr`` nodes of the module.
    """
    out = []
    for e in range(len(experts)):
        for ref in experts[e].refs():
            if ref is None:
                continue
            t = graph_tensor(gm, ref.base)
            if t is None:
                return None
            out.append((ref.base, t))
    return out


def graph_tensor(gm: torch.fx.GraphModule, node: Node) -> torch.Tensor | None:
    """The real tensor a placeholder (Dynamo's ``grapharg``) or ``get_attr`` node holds, if known."""
    t = None
    if node.op == "placeholder":
        try:
            t = node.meta["grapharg"].example
        except Exception:  # noqa: BLE001 - not a Dynamo graph, or the tensor is gone
            t = None
    elif node.op == "get_attr":
        t = gm
        for part in str(node.target).split("."):
            t = getattr(t, part, None)
    return t if isinstance(t, torch.Tensor) else None


def dense_reads_of_expert_params(gm: torch.fx.GraphModule, ep_nodes: set[Node]) -> list[torch.Tensor]:
    """Weights that an earlier graph's expert-parallel layer owns and that this graph reads
    outside its own expert-parallel layers: a recompile where the MoE rewrite declined (under
    autocast, say), or the model compiled again without ``expert_parallel``. Every rank gets a
    gradient for them here, so ``sync_grads`` must reduce them as dense ones."""
    from blazec.expert_parallel import is_expert_param

    out = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr") and any(u not in ep_nodes for u in n.users):
            t = graph_tensor(gm, n)
            if t is not None and is_expert_param(t):
                out.append(t)
    return out


def local_weight_lists(graph: torch.fx.Graph, experts: dict, lo: int, n_local: int) -> dict[str, list[Node]]:
    """The op's weight-list arguments restricted to experts ``[lo, lo + n_local)``."""
    out = {}
    for a in REF_NAMES:
        refs = [getattr(experts[e], a) for e in range(len(experts))]
        if refs[0] is not None and refs[0].index is not None:  # stacked: a row range of the parameter
            out[a] = [graph.call_function(torch.narrow, (v, 0, lo, n_local))
                      for v in weight_list(graph, refs, len(experts))]
        else:
            out[a] = weight_list(graph, refs[lo:lo + n_local], n_local)
    return out


def emit_moe_ep(graph: torch.fx.Graph, ids: Node, weights: Node, x: Node, experts: dict,
                out_dtype: torch.dtype, recompute: bool, capacity: int, priority: str,
                group: EPGroup, chunks: int, drop_zero_weights: bool = False) -> Node:
    """Insert the expert-parallel chain at the graph's insertion point; return the node of ``y``.

    ``drop_zero_weights``: pairs of weight exactly 0 count toward ``capacity`` but are not sent
    (GShard's form, see ``moe_dispatch._route_without_zero_weights``)."""
    E = len(experts)
    n_local = E // group.world
    first = experts[0]
    call = graph.call_function

    def items(node: Node, n: int) -> list[Node]:
        return [call(operator.getitem, (node, i)) for i in range(n)]

    keep = call(kept_pairs, (ids, E, capacity, priority)) if capacity >= 0 else None
    if drop_zero_weights:
        nonzero = call(torch.ne, (weights, 0))
        keep = nonzero if keep is None else call(torch.logical_and, (keep, nonzero))
    lists = local_weight_lists(graph, experts, group.rank * n_local, n_local)
    # Every rank runs ``chunks`` chunks (each one's collectives pair with the other ranks'),
    # however many tokens it has. A token count known to be below it gets dropped padding rows
    # (kept False: never sent), so that no chunk is statically empty (Inductor refuses to
    # gather from a dimension of size 0), and the padding is cut from y.
    # the token count when static; x is the model's own node (ids and weights may be the
    # pass's, without example values)
    rows = shape(x)
    T = rows[0] if rows and isinstance(rows[0], int) else None
    pad = chunks - T if T is not None and T < chunks else 0
    if pad:
        if keep is None:
            keep = call(torch.ones_like, (ids,), {"dtype": torch.bool})

        def padded(t: Node) -> Node:  # t and pad zero rows (False for keep)
            zeros = graph.call_method("new_zeros", (t, (pad, graph.call_method("size", (t, 1)))))
            return call(torch.cat, ([t, zeros],))

        x, ids, weights, keep = (padded(t) for t in (x, ids, weights, keep))
    if chunks > 1:
        sizes = _chunk_sizes(graph, x, chunks, None if T is None else T + pad)
        split = [items(call(torch.split, (t, sizes)), chunks) if t is not None else [None] * chunks
                 for t in (x, ids, weights, keep)]
        parts = list(zip(*split))
    else:
        parts = [(x, ids, weights, keep)]

    plans = [items(call(ep_plan, (idsi, keepi, n_local, group.world)), 3) for _, idsi, _, keepi in parts]
    exchanged = call(ep_exchange_counts, ([p[2] for p in plans], group.world, group.name))
    splits = [items(call(operator.getitem, (exchanged, i)), 2) for i in range(len(parts))]
    rows = [items(call(ep_rows, (parts[i][1], plans[i][0], plans[i][1], splits[i][0], n_local)), 3)
            for i in range(len(parts))]
    sent: dict[int, list[Node]] = {}

    def dispatch(i: int) -> None:
        xi, _, wi, _ = parts[i]
        send_tok, send_ids, mine = rows[i]
        sent[i] = items(call(ep_send, (xi, wi, send_tok, send_ids, mine, *splits[i], group.name)), 3)

    def compute_and_return(i: int) -> Node:
        rx, rids, rw = sent[i]
        in_splits, out_splits = splits[i]
        sorted_pairs, offsets, pair_pos = items(call(local_route, (rids, n_local)), 3)
        out = call(torch.ops.blazec.moe_experts.default, (
            rx, rw, sorted_pairs, offsets, pair_pos,
            lists["gate"], lists["up"], lists["down"], lists["b_gate"], lists["b_up"], lists["b_down"],
            first.activation, "hidden" if first.weight_in_hidden is not None else "output", recompute,
            out_dtype))
        y_local = call(operator.getitem, (out, 0))
        return call(ep_return, (y_local, in_splits, out_splits, group.name))

    def total(i: int) -> Node:
        return call(ep_sum, (back[i], parts[i][0], rows[i][0]))

    n = len(parts)
    back: dict[int, Node] = {}
    ys: list[Node] = []
    dispatch(0)
    for i in range(n):
        if i + 1 < n:
            dispatch(i + 1)
        back[i] = compute_and_return(i)
        if i >= 1:
            ys.append(total(i - 1))
    ys.append(total(n - 1))
    y = ys[0] if n == 1 else call(torch.cat, (ys, 0))
    return call(torch.narrow, (y, 0, 0, T)) if pad else y


def _chunk_sizes(graph: torch.fx.Graph, x: Node, chunks: int, T: int | None) -> list:
    """Row counts of the token chunks of ``x`` (``T`` rows when known statically): ``q = T //
    chunks`` each, the first one also the rest ``T - chunks * q``. ``tensor_split``'s sizes
    branch on ``T % chunks``, which with a symbolic T put a guard on it into the graph: a
    compile per residue, and with more chunks than Dynamo's recompile limit, the model run
    without the rewrite on some steps."""
    if T is not None:
        q = T // chunks
        return [T - (chunks - 1) * q] + [q] * (chunks - 1)
    n = graph.call_method("size", (x, 0))
    q = graph.call_function(operator.floordiv, (n, chunks))
    first = graph.call_function(operator.sub, (n, graph.call_function(operator.mul, (q, chunks - 1))))
    return [first] + [q] * (chunks - 1)
