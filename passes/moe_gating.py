"""The MoE gating pass: name the router that feeds each rewritten MoE layer.

Gating stays in plain torch ops (Inductor fuses them well), so this pass
rewrites nothing. It runs after ``moe_dispatch`` and follows each ``blazec.moe_route``'s ids
and each ``blazec.moe_experts``'s weights back to the router, and reports which of the
common variants it is:

- ``softmax_topk_renorm``: softmax over experts, top-k, weights divided by their sum;
- ``softmax_topk``: softmax, then top-k, no renormalization;
- ``topk_softmax``: top-k of the logits, softmax over the k selected;
- ``sigmoid_bias_group_topk``: sigmoid scores, a bias added for selection only, optionally
  group-limited, with weights gathered from the unbiased scores (DeepSeek-V3);
- ``argmax_capacity``: GShard/Switch arg-max choices;
- ``other``: anything else (still correct: the rewrite only needs ids and weights).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F

from blazec.passes._fx import ROUTER_IDS, arg, is_fn, is_getitem, is_method, regions, strip_casts, where_loc
from blazec.report import PassReport

Node = torch.fx.Node
SOFTMAX = (F.softmax, torch.softmax)
TOPK = (torch.topk,)


def moe_gating_pass(gm: torch.fx.GraphModule, ctx) -> PassReport:
    rep = PassReport("moe_gating")
    seen: set[tuple[Node | None, Node | None]] = set()
    graphs = [gm.graph]
    for g in graphs:  # the layers in checkpoint and nested compile regions are in their subgraphs
        graphs.extend(r.body.graph for r in regions(g.owning_module).values())
    for n in (n for g in graphs for n in g.nodes):
        if n.op == "call_function" and n.target is torch.ops.blazec.moe_experts.default:
            ids, weights = routing_inputs(n)
            if (ids, weights) in seen:  # another token chunk of an expert-parallel layer
                continue
            seen.add((ids, weights))
            rep.notes.append(f"router of the MoE layer at {where_loc(n)}: {classify(ids, weights)}")
    return rep


def routing_inputs(experts: Node) -> tuple[Node | None, Node | None]:
    """The router's ``(topk_ids, topk_weights)`` behind a ``moe_experts`` node.

    Single-process: ``moe_route``'s ids and the op's weights. Expert-parallel: the ids and
    weights ``ep_rows`` and ``ep_send`` read, before the split into chunks.
    """
    from blazec.expert_parallel import ep_rows, ep_send

    route = experts.args[2].args[0] if is_getitem(experts.args[2]) else None
    ids = route.meta.get(ROUTER_IDS, route.args[0]) if isinstance(route, Node) else None
    weights = experts.args[1]
    send = weights.args[0] if is_getitem(weights) else None
    if isinstance(send, Node) and send.target is ep_send:
        weights, send_ids = send.args[1], send.args[3]
        rows = send_ids.args[0] if is_getitem(send_ids) else None
        ids = rows.args[0] if isinstance(rows, Node) and rows.target is ep_rows else None
        ids, weights = (_unsplit(t) for t in (ids, weights))
    return ids, weights


def _unsplit(node: object) -> object:
    """``split(t, sizes)[i]`` (or ``tensor_split``) -> ``t``, and then ``t`` without the padding
    rows ``emit_moe_ep`` appends (``cat([t, t.new_zeros(...)])``) to a short batch."""
    if is_getitem(node) and is_fn(node.args[0], torch.split, torch.tensor_split):
        node = node.args[0].args[0]
    if is_fn(node, torch.cat) and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) == 2 \
            and is_method(node.args[0][1], "new_zeros"):
        node = node.args[0][0]
    return node


def _topk(node: object) -> Node | None:
    """The topk call behind ``topk(...)[i]``."""
    if is_getitem(node) and (is_fn(node.args[0], *TOPK) or is_method(node.args[0], "topk")):
        return node.args[0]
    return None


def _back(node: object, steps: int = 6):
    """Nodes reachable backwards through casts, views and arithmetic with constants."""
    out = []
    frontier = [node]
    for _ in range(steps):
        nxt = []
        for f in frontier:
            if not isinstance(f, Node):
                continue
            out.append(f)
            nxt.extend(a for a in f.all_input_nodes)
        frontier = nxt
    return out


def classify(ids: object, weights: object) -> str:
    if isinstance(ids, Node) and is_fn(ids, torch.stack):
        if all(is_fn(i, torch.argmax) for i in ids.args[0]):
            return "argmax_capacity"
    w, _ = strip_casts(weights, exact=False)
    tk_ids = _topk(ids)
    if tk_ids is None:
        return "other"
    scores = arg(tk_ids, 0, "input")
    # selection on (sigmoid + bias), possibly group-masked; weights gathered from the sigmoid
    back = _back(scores)
    sig = [b for b in back if is_fn(b, torch.sigmoid) or is_method(b, "sigmoid")]
    if sig and any(is_fn(b, operator.add) for b in back):
        return "sigmoid_bias_group_topk" if any(is_method(b, "masked_fill") for b in back) else "sigmoid_bias_topk"
    if is_fn(scores, *SOFTMAX) or is_method(scores, "softmax"):
        tk_w = _topk(w) if not is_fn(w, operator.truediv) else _topk(w.args[0])
        if is_fn(w, operator.truediv) or is_method(w, "div") or any(is_fn(b, operator.itruediv) for b in _back(w, 3)):
            return "softmax_topk_renorm"
        if tk_w is tk_ids:
            return "softmax_topk"
    if is_fn(w, *SOFTMAX) or is_method(w, "softmax"):
        src = _topk(strip_casts(w.args[0], exact=False)[0])
        if src is tk_ids:
            return "topk_softmax"
    return "other"
