"""The MoE dispatch pass: naive expert dispatch in a Dynamo graph becomes two blaze ops.

For every matched site it emits::

    sorted_pairs, expert_offsets, pair_pos = blazec.moe_route(ids, E)
    y, preact = blazec.moe_experts(x, w, sorted_pairs, expert_offsets, pair_pos,
                                   w_gate, w_up, w_down, b_gate, b_up, b_down,
                                   activation, weight_pos, recompute, out_dtype)

and replaces every read of the old accumulator with ``y``. The old dispatch (masks,
``torch.where``, gathers, per-expert MLPs, ``index_add_``) becomes dead and is removed,
including the runtime asserts on its data-dependent sizes, so no data-dependent shape is left.

Forms matched today: the static loop over experts, with ModuleList experts or 3-D stacked
parameters (passes/moe_loop_form.py); all experts on all tokens weighted by a dense top-k gate
(passes/moe_dense_gate_form.py); the per-pair weight gather with bmm
(passes/moe_pair_gather_form.py); DeepSeekMoE's repeated rows with masked assignment
(passes/moe_repeat_form.py); the sort-based grouped form with a per-expert loop over
split rows or torch._grouped_mm, Hugging Face transformers v5's experts among them
(passes/moe_sort_form.py); and GShard/Switch one-hot capacity dispatch, top-1 and
top-2 (passes/moe_gshard_form.py), which becomes ``moe_route`` with the capacity and the
slot-major drop order.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
import torch.fx

import blazec.ops  # noqa: F401 - registers torch.ops.blazec.*
from blazec.passes._fx import (
    LINEAR, ROUTER_IDS, NoMatch, Region, arg, combine_args, copy_graph_module, dtype, einsum_equation, grad_modes, is_fn,
    is_getitem, is_method, module_path, regions, shape, val, where_loc, written_args,
)
from blazec.passes.moe_dense_gate_form import ADD as DENSE_ADD
from blazec.passes.moe_dense_gate_form import (
    _is_term, dense_einsums, einsum_stack, match_dense_einsum, match_dense_gate, match_dense_stack, stacked_outputs,
)
from blazec.passes.moe_expert_mlp import REF_NAMES, weight_list
from blazec.passes.moe_gshard_form import COMBINE_EQ, match_gshard
from blazec.passes.moe_ep import dense_reads_of_expert_params, emit_moe_ep, expert_parameters
from blazec.passes.moe_loop_form import _tensor_index, match_loop
from blazec.passes.moe_pair_gather_form import (
    has_einsum_param_gather, match_pair_gather, match_pair_gather_einsum, pair_einsums,
)
from blazec.passes.moe_repeat_form import match_repeat_assign, repeat_buffer
from blazec.passes.moe_site_checks import (
    _ancestors, autocast_message, autocast_reason, autocast_regions, check_autocast, check_grad_mode, check_no_mutation,
    op_rejection, replaced_nodes,
)
from blazec.passes.moe_sort_form import _token_of, match_sorted, match_sorted_unpermute
from blazec.report import Match, NearMiss, PassReport

Node = torch.fx.Node

# Runtime checks Dynamo inserts for data-dependent sizes; they die with the dispatch they guard.
ASSERT_TARGETS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch._check,
    torch._check_is_size,
}


def moe_dispatch_pass(gm: torch.fx.GraphModule, ctx, outer_autocast: str | None = None) -> PassReport:
    """The MoE rewrite of ``gm``. ``outer_autocast``: for the subgraph of a region, why the graph
    that calls it runs under autocast (an autocast block around a checkpoint call is in that
    graph, not in the region's)."""
    rep = PassReport("moe_dispatch")
    graph = gm.graph
    recompute = getattr(ctx.config, "moe_recompute", "save_preact") == "recompute_gemm1"
    ep = getattr(ctx.config, "expert_parallel", None)
    chunks = getattr(ctx.config, "ep_chunks", 1)
    ep_params: list = []  # (node, tensor) of the expert-parallel layers' weights, registered at the end
    ep_nodes: set[Node] = set()  # the nodes the expert-parallel emissions made
    ep_unmapped: list[str] = []
    ep_single: list[str] = []  # layers rewritten single-process under expert_parallel

    def emit(before, ids, weights, x, experts, out_dtype, where, capacity=-1, priority="token",
             drop_zero_weights=False):
        if _sharded(ep, experts):
            existing = set(graph.nodes)
            with graph.inserting_before(before):
                y = emit_moe_ep(graph, ids, weights, x, experts, out_dtype, recompute, capacity, priority,
                                ep, chunks, drop_zero_weights)
            _copy_source_meta(graph, before, existing)
            ep_nodes.update(n for n in graph.nodes if n not in existing)
            params = expert_parameters(gm, experts)
            if params is None:
                ep_unmapped.append(where)
            else:
                ep_params.extend(params)
            return y
        if ep is not None and ep.world > 1:
            why = (f"E={len(experts)} experts do not split evenly over {ep.world} ranks; this layer is rewritten "
                   "single-process (every rank runs all its experts)")
            rep.near_misses.append(NearMiss("expert_parallel", where, why))
            logging.getLogger("blazec").warning("blaze expert_parallel: the MoE layer at %s: %s", where, why)
            ep_single.append(where)
        return emit_moe(graph, before, ids, weights, x, experts, out_dtype, recompute, capacity, priority,
                        drop_zero_weights)

    autocast = outer_autocast or autocast_reason(graph)
    autocast_in = autocast_regions(graph)
    grad_mode = grad_modes(graph)

    def site_checks(finals, m, ids, weights, accumulation):
        """NoMatch when a matched site fails a check of passes/moe_site_checks.py."""
        if autocast:
            raise NoMatch(autocast)
        if shape(ids) is not None and len(shape(ids)) != 2:  # (GShard's, stacked by the pass, are [T, k])
            raise NoMatch(f"the routing ids have shape {shape(ids)}; the blaze op routes [T, k] ids")
        inputs = [ids, weights, m.x, *_expert_bases(m.experts)]
        site = replaced_nodes(finals, inputs)
        check_autocast(autocast_in, finals, site)
        check_no_mutation(graph, finals, inputs, accumulation)
        check_grad_mode(grad_mode, finals, site)
        why = op_rejection(ids, weights, m.x, m.experts, dtype(finals[-1]))
        if why:
            raise NoMatch(why)

    for acc, index_adds in _accumulators(graph):
        where = f"{module_path(index_adds[0])} ({where_loc(index_adds[0])})"
        sorted_form = _sorted_index(index_adds[0])
        try:
            m = _match(match_sorted if sorted_form else match_loop, acc, index_adds)
            site_checks(index_adds, m, m.ids, m.weights, set(index_adds))
        except NoMatch as e:
            rep.near_misses.append(NearMiss("sort_grouped" if sorted_form else "static_loop", where, str(e)))
            continue
        y = emit(index_adds[-1], m.ids, m.weights, m.x, m.experts, dtype(m.acc), where)
        for ia in index_adds:  # x.index_add_(...) returns x: its users read the final sum too
            ia.replace_all_uses_with(y)
            graph.erase_node(ia)
        if all(_inplace(ia) for ia in index_adds):  # an out-of-place scatter_add leaves acc zero
            m.acc.replace_all_uses_with(y)
        if sorted_form:
            form = "sort_grouped"
        else:
            form = "static_loop_" + ("stacked" if m.experts[0].gate.index is not None else "modulelist")
        rep.matches.append(_describe_match(form, where, m.experts, m.x, m.top_k, recompute, ep=ep, chunks=chunks))

    # index_add_ spelled another way: recognized, not matched; say what to write instead
    by_acc = _index_add_spelled_otherwise(rep, _indexed_iadds(graph),
                                          "{acc}[idx] += ... ({n} index_put(s) of a gathered sum)")
    _index_add_spelled_otherwise(rep, _accumulating_puts(graph),
                                 "{acc}.index_put_((idx,), ..., accumulate=True) ({n} of expert outputs)")

    # Forms whose result is one node (a sum or an einsum) that the blaze op replaces.
    def reports(report_misses, final) -> bool:
        try:
            return bool(report_misses(final))
        except _UNREADABLE:
            return False

    site_links: set[Node] = set()
    for form, candidates, match, report_misses in (
        ("dense_gate", _dense_gate_sums, match_dense_gate, lambda n: True),
        ("pair_weight_gather", _slot_sums, match_pair_gather, _has_param_gather),
        ("pair_weight_gather", pair_einsums, match_pair_gather_einsum, has_einsum_param_gather),
        ("sort_grouped", _slot_sums, match_sorted_unpermute, _has_argsort),
        ("dense_gate_stack", _slot_sums, match_dense_stack, lambda n: stacked_outputs(n) is not None),
        ("dense_gate_einsum", dense_einsums, match_dense_einsum, lambda n: einsum_stack(n) is not None),
        ("repeat_assign", _slot_sums, match_repeat_assign, lambda n: repeat_buffer(n) is not None),
        ("gshard_capacity", _combine_einsums, match_gshard, lambda n: True),
    ):
        for final in candidates(graph):
            where = f"{module_path(final)} ({where_loc(final)})"
            try:
                m = _match(match, final)
            except NoMatch as e:
                if reports(report_misses, final):
                    rep.near_misses.append(NearMiss(form, where, str(e)))
                continue
            capacity, priority = getattr(m, "capacity", -1), getattr(m, "priority", "token")
            existing = set(graph.nodes)
            with graph.inserting_before(final):
                ids, weights = m.routing(graph)
            # in-place nodes of the site that die with it: a dense-gate chain's ``out += term``
            # links, the masked assignments into a repeat form's buffer
            links = m.links
            try:
                # the links (a repeat form's masked assignments are not ancestors of the sum)
                # are part of the site: what they read is what the op must read unchanged
                site_checks([n for n in graph.nodes if n in links] + [final], m, ids, weights, links)
            except NoMatch as e:
                for n in reversed([n for n in graph.nodes if n not in existing]):  # the routing nodes
                    graph.erase_node(n)
                rep.near_misses.append(NearMiss(form, where, str(e)))
                continue
            y = emit(final, ids, weights, m.x, m.experts, dtype(final), where, capacity, priority,
                     getattr(m, "drop_zero_weights", False))
            _copy_source_meta(graph, final, existing)  # the routing nodes (GShard's stacks) too
            final.replace_all_uses_with(y)
            graph.erase_node(final)
            # the in-place links: nothing else reads them (the matchers check), but _remove_dead
            # keeps in-place nodes, and with them the experts they compute
            for n in reversed([n for n in graph.nodes if n in links]):
                if not n.users:
                    graph.erase_node(n)
            site_links.update(links)  # one still read by the dead site is erased with it
            name = f"gshard_top{m.top_k}" if form == "gshard_capacity" else form
            rep.matches.append(_describe_match(name, where, m.experts, m.x, m.top_k, recompute,
                                               capacity if capacity >= 0 else None, ep=ep, chunks=chunks))
    for buf, sets in _masked_assigns(graph, set(by_acc)).items():  # recognized, not matched: say so
        if is_method(buf, "clone") or is_fn(buf, torch.clone):
            rep.near_misses.append(NearMiss(
                "masked_assign", f"{module_path(sets[0])} ({where_loc(sets[0])})",
                f"{len(sets)} assignment(s) of expert outputs into {buf.name}[mask], where {buf.name} is a copy of "
                f"{getattr(buf.args[0], 'name', buf.args[0])}: a token no expert takes keeps its input (Switch "
                "Transformers' dropped tokens pass through), while the blaze op gives such a token 0. Not a form "
                "blazec rewrites; left alone"))
            continue
        rep.near_misses.append(NearMiss(
            "masked_assign", f"{module_path(sets[0])} ({where_loc(sets[0])})",
            f"{len(sets)} assignment(s) of expert outputs into {buf.name}[mask] are not a form blazec rewrites. "
            "The masked-assignment form it rewrites is DeepSeekMoE's: a fresh empty_like(xr) buffer of "
            "xr = x.repeat_interleave(k, dim=0), y[ids.view(-1) == e] = expert_e(xr[ids.view(-1) == e]), read only "
            "by (y.view(T, k, d) * w.unsqueeze(-1)).sum(1); otherwise write acc.index_add_(0, tokens, "
            "expert_e(x[tokens]) * w[tokens, slots, None]) into zeros"))
    rep.notes.extend(_expert_hit_notes(graph))
    for bmm in _dense_repeat_bmms(graph):  # Llama 4's experts: recognized, not expressible
        rep.near_misses.append(NearMiss(
            "dense_bmm", f"{module_path(bmm)} ({where_loc(bmm)})",
            "every expert runs on every token (bmm over x.repeat(E, 1) times per-row router scores), so the "
            "scores scale each expert's input (Llama 4's experts; unpicked experts get a score of 0). The blaze "
            "op scales an expert's output or its hidden activation, and a gated MLP of s * x is not s times one "
            "of those, so this is left alone"))
    if rep.matches:
        _remove_dead(graph, site_links)
    region_single, region_inputs = _region_layers(gm, ctx, rep, autocast, autocast_in)
    ep_single.extend(region_single)
    stale = dense_reads_of_expert_params(gm, ep_nodes)  # owned by an earlier graph's layer, read densely here
    if ep_params or ep_unmapped or ep_single or stale:
        from blazec.expert_parallel import register_expert_params

        owned, shared = _owned_experts(ep_params, ep_nodes, rep)
        register_expert_params(owned, ep_unmapped, ep_single, dense=shared + region_inputs + stale)
    return rep


def _expert_hit_notes(graph: torch.fx.Graph) -> list[str]:
    """A graph that ends by returning ``nonzero`` of a count of one_hot(ids) to the code after
    it: Hugging Face's ``expert_hit`` loop, whose iteration over that tensor Dynamo cannot trace
    (a graph break), so the experts run in eager code the pass never sees. Say so, since the
    graph itself holds no dispatch to report."""
    outputs = set(graph.output_node().all_input_nodes)
    notes = []
    for n in graph.nodes:
        if n in outputs and (is_method(n, "nonzero") or is_fn(n, torch.nonzero)) and any(
                is_fn(a, torch.nn.functional.one_hot, torch._C._nn.one_hot) for a in _ancestors([n])):
            notes.append(
                f"{n.name} ({where_loc(n)}) is nonzero() of a count of one_hot(ids), returned for the code after this "
                "graph: a loop over the experts that got tokens (Hugging Face's expert_hit) breaks the graph there, "
                "so the experts run outside it and are not rewritten. Loop over range(num_experts) instead; an "
                "expert without tokens adds nothing")
    return notes


def _owned_experts(params: list[tuple[Node, torch.Tensor]], ep_nodes: set[Node],
                   rep: PassReport) -> tuple[list, list]:
    """The expert weights that only expert-parallel layers read, which ``sync_grads`` leaves
    alone (their owners hold every rank's contribution).

    A weight also read elsewhere (the same experts called outside the layer, or passed into a
    checkpoint region whose layer is left alone) gets a gradient on every rank there; it is
    reduced as a dense one. That is exact: ranks that do not own it get nothing from the
    expert-parallel layer, so the sum over ranks adds the owner's expert-parallel gradient
    once to every rank's other contributions. Returns (owned, shared) tensors."""
    owned, shared = [], []
    for node, t in params:
        (shared if any(u not in ep_nodes for u in node.users) else owned).append((node, t))
    if shared:
        names = sorted({n.name for n, _ in shared})
        rep.notes.append(f"expert weights also read outside the expert-parallel layers ({', '.join(names[:4])}"
                         f"{', ...' if len(names) > 4 else ''}): sync_grads reduces their gradients as dense ones")
    return [t for _, t in owned], [t for _, t in shared]


_EP_REGION_REASONS = {
    "tag_activation_checkpoint": "runs inside torch.utils.checkpoint, whose forward runs again in the backward: its "
                                 "expert-parallel all_to_alls would too",
    "invoke_subgraph": "runs inside a nested compile region, one subgraph shared by its calls, whose expert weights "
                       "are the subgraph's inputs: the expert-parallel rewrite shards the experts of a layer by their "
                       "parameters",
}


def _region_layers(gm: torch.fx.GraphModule, ctx, rep: PassReport, autocast: str | None,
                   autocast_in: dict[Node, Node]) -> tuple[list[str], list[torch.Tensor]]:
    """Rewrite the MoE layers inside ``torch.utils.checkpoint`` regions (and nested compile
    regions) of ``gm``, in copies of their subgraphs (``gm``'s submodules are shared with the
    graph the pass was given).

    A checkpointed region's forward runs again in the backward; AOTAutograd traces the body,
    blaze ops included, and tags its nodes for recomputation, so the op's forward runs twice as
    the naive code's would. A nested compile region's subgraph serves every call of the region:
    one rewrite covers them all. Under expert parallelism a region's layer is left alone
    (``_EP_REGION_REASONS``). Returns where such layers are and the tensors their regions take
    (each rank runs all their experts, so ``sync_grads`` reduces their gradients as dense ones,
    even where another graph's expert-parallel layer owns them)."""
    ep = getattr(ctx.config, "expert_parallel", None)
    left: list[str] = []
    inputs: list[torch.Tensor] = []
    for name, region in regions(gm).items():
        work = copy_graph_module(region.body)
        # an autocast block around a region's call is in this graph, not in the region's
        around = next((autocast_in[c] for c in region.calls if c in autocast_in), None)
        outer = autocast or (autocast_message(around) if around is not None else None)
        sub = moe_dispatch_pass(work, ctx if ep is None or ep.world <= 1 else _without_ep(ctx), outer)
        rep.notes.extend(sub.notes)
        int_inputs = any(isinstance(v := val(n), torch.Tensor)
                         and not v.is_floating_point() for n in work.graph.find_nodes(op="placeholder"))
        for miss in sub.near_misses:
            if "topk" in miss.reason and int_inputs:  # ids that are a region input: topk's output outside it
                miss = NearMiss(miss.form, miss.where, miss.reason + (
                    " (the layer is inside a checkpoint or nested compile region, and the pass does not follow "
                    "the region's inputs outside it: compute the routing inside the region)"))
            rep.near_misses.append(miss)
        if sub.matches and ep is not None and ep.world > 1:
            why = (f"the MoE layer {_EP_REGION_REASONS[region.kind]}, so it is left alone (every rank runs all "
                   "its experts)")
            for m in sub.matches:
                rep.near_misses.append(NearMiss("expert_parallel", m.where, why))
                logging.getLogger("blazec").warning("blaze expert_parallel: the MoE layer at %s: %s", m.where, why)
                left.append(m.where)
            inputs.extend(_region_tensors(region))
            continue
        if sub.matches:
            rep.matches.extend(sub.matches)
            work.graph.lint()
            work.recompile()
            setattr(gm, name, work)
    return left, inputs


def _region_tensors(region: Region) -> list[torch.Tensor]:
    """The tensors (parameters among them) that Dynamo lifted and the region's calls take as
    operands."""
    out = []
    for call in region.calls:
        for a in call.args[1:]:
            t = a.meta.get("grapharg") if isinstance(a, Node) and a.op == "placeholder" else None
            t = getattr(t, "example", None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def _without_ep(ctx):
    """``ctx`` with expert parallelism off (to find a region's layer without rewriting it for
    expert parallelism)."""
    return dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, expert_parallel=None))


def _dense_repeat_bmms(graph: torch.fx.Graph) -> list[Node]:
    """``torch.bmm`` nodes whose batched input is ``(x.repeat(E, 1) * scores).view(E, -1, d)``
    with ``scores`` one per row: every expert on every token, scaled on the way in."""
    out = []
    for n in graph.nodes:
        if not (is_fn(n, torch.bmm) or is_method(n, "bmm")) or not n.args:
            continue
        h = n.args[0]
        while is_method(h, "view", "reshape"):
            h = h.args[0]
        if not is_fn(h, operator.mul, torch.mul) and not is_method(h, "mul"):
            continue
        ops = [a for a in h.args[:2] if isinstance(a, Node)]
        if any(is_method(a, "repeat") and len(shape(a.args[0]) or ()) == 2 for a in ops) and \
                any(len(shape(a) or ()) == 2 and str(shape(a)[-1]) == "1" for a in ops):
            out.append(n)
    return out


def _inplace(combine: Node) -> bool:
    return is_method(combine, "index_add_", "scatter_add_")


# What a matcher raises when it cannot read an unusual spelling (an argument passed by keyword
# where it expects a position): that site is left alone, not the whole graph.
_UNREADABLE = (IndexError, KeyError, TypeError, AttributeError, ValueError)


def _match(matcher, *site):
    """``matcher(*site)``, with an unreadable site turned into a NoMatch (see _UNREADABLE)."""
    try:
        return matcher(*site)
    except _UNREADABLE as e:
        raise NoMatch(f"the matcher could not read this site ({type(e).__name__}: {e}); left alone") from e


def _expert_bases(experts: dict) -> list[Node]:
    """The parameter nodes the experts' weights and biases come from."""
    return [r.base for mlp in experts.values() for r in mlp.refs() if r is not None]


def _setitems(graph: torch.fx.Graph) -> list[Node]:
    """``t[index] = value`` nodes of the graph."""
    return [n for n in graph.nodes
            if is_fn(n, operator.setitem) and len(n.args) == 3 and isinstance(n.args[0], Node)]


def _indexed_iadds(graph: torch.fx.Graph) -> list[Node]:
    """``acc[idx] += v`` (Mistral's reference MoE): ``acc[idx] = acc[idx] + v`` as a setitem of an
    add that reads the same rows, where the added value runs a linear (an expert)."""
    out = []
    for n in _setitems(graph):
        acc, idx, v = n.args
        if not (is_fn(v, operator.iadd, operator.add, torch.add) or is_method(v, "add", "add_")):
            continue
        reads = [a for a in v.args[:2] if is_fn(a, operator.getitem) and a.args[0] is acc and a.args[1] is idx]
        others = [a for a in v.args[:2] if a not in reads]
        if reads and others and any(is_fn(u, *LINEAR) for u in _upstream(others[0], 12)):
            out.append(n)
    return out


def _index_add_spelled_otherwise(rep, nodes: list[Node], spelled: str) -> dict[Node, list[Node]]:
    """Report each accumulator ``nodes`` sum into (their first argument) as a static_loop near
    miss: ``spelled`` (with ``{acc}`` and ``{n}``) is not matched, write index_add_. Returns the
    nodes by accumulator."""
    found: dict[Node, list[Node]] = {}
    for n in nodes:
        found.setdefault(n.args[0], []).append(n)
    for acc, sets in found.items():
        rep.near_misses.append(NearMiss(
            "static_loop", f"{module_path(sets[0])} ({where_loc(sets[0])})",
            f"{spelled.format(acc=acc.name, n=len(sets))} is not matched; write "
            f"{acc.name}.index_add_(0, idx, ...) for the same sum, which blazec rewrites"))
    return found


def _accumulating_puts(graph: torch.fx.Graph) -> list[Node]:
    """``acc.index_put_((idx,), v, accumulate=True)`` nodes whose value runs a linear on
    gathered rows (an expert's output): index_add_ spelled another way."""
    out = []
    for n in graph.nodes:
        if not (is_method(n, "index_put_", "index_put") or is_fn(n, torch.index_put_, torch.index_put)):
            continue
        if arg(n, 3, "accumulate", False) is not True or len(n.args) < 3 or not isinstance(n.args[2], Node):
            continue
        if _runs_expert(n.args[2]):
            out.append(n)
    return out


def _runs_expert(v: Node) -> bool:
    """Whether ``v`` runs a linear on gathered rows (an expert's output)."""
    return any(is_fn(u, *LINEAR) and any(is_fn(r, operator.getitem) and _tensor_index(r.args[1])
                                         for r in _upstream(u, 6))
               for u in [v, *_upstream(v, 12)])


def _masked_assigns(graph: torch.fx.Graph, skip: set[Node]) -> dict[Node, list[Node]]:
    """``buf[index] = v`` nodes left in the graph whose index is a tensor and whose value runs a
    linear on gathered rows (an expert's output), by buffer, where a buffer has several (one
    per expert). Buffers in ``skip`` (already reported) and buffers a repeat-form slot sum
    reads (its matcher said why it failed) are left out."""
    reported = {repeat_buffer(f) for f in _slot_sums(graph)} | skip
    out: dict[Node, list[Node]] = {}
    for n in _setitems(graph):
        buf, idx, v = n.args
        if buf in reported or not isinstance(idx, Node) or not isinstance(v, Node):
            continue
        if _runs_expert(v):
            out.setdefault(buf, []).append(n)
    return {buf: sets for buf, sets in out.items() if len(sets) > 1}  # one masked linear is no MoE


def _inter(mlp) -> int:
    s = shape(mlp.down.base)
    return int(s[-2] if mlp.down.transposed else s[-1])


def _sorted_index(combine: Node) -> bool:
    """Whether rows are summed by ``perm // k`` (the sorted form) rather than by where() tokens
    (the loop form; its index_add_ or scatter_add_ reads a where() output)."""
    try:
        index, _ = combine_args(combine)
    except (NoMatch, *_UNREADABLE):  # an index it cannot read: look through its broadcast
        index = arg(combine, 2, "index")
        while is_method(index, "expand", "expand_as", "reshape", "view", "unsqueeze") or \
                (is_getitem(index) and isinstance(index.args[1], tuple) and index.args[1][-1:] == (None,)):
            index = index.args[0]
    if _token_of(index) is not None:
        return True
    return not (is_getitem(index) and (is_fn(index.args[0], torch.where) or is_method(index.args[0], "nonzero")))


def _dense_gate_sums(graph: torch.fx.Graph) -> list[Node]:
    """Last adds of chains ``acc + gate[:, e:e+1] * expert_e(x)`` (their result is not summed further)."""
    out = []
    for n in graph.nodes:
        if is_fn(n, *DENSE_ADD) and any(_is_term(a) for a in n.args[:2]):
            if not any(is_fn(u, *DENSE_ADD) and any(_is_term(a) for a in u.args[:2]) for u in n.users):
                out.append(n)
    return out


def _combine_einsums(graph: torch.fx.Graph) -> list[Node]:
    return [n for n in graph.nodes if einsum_equation(n) == COMBINE_EQ]


def _slot_sums(graph: torch.fx.Graph) -> list[Node]:
    return [n for n in graph.nodes if (is_method(n, "sum") or is_fn(n, torch.sum)) and n.args
            and len(shape(n.args[0]) or ()) == 3]


def _has_argsort(final: Node) -> bool:
    """Whether ``final`` reads a sort of pairs (``argsort``, or ``sort`` as Hugging Face's experts
    write it), so that a failed sorted match is a near miss."""
    return any(is_fn(n, torch.argsort, torch.sort) or is_method(n, "argsort", "sort") for n in _upstream(final, 8))


def _upstream(node: Node, depth: int) -> list[Node]:
    """The nodes within ``depth`` input edges above ``node``, each once (a graph of diamonds,
    residual adds or a cat of many inputs would otherwise repeat them exponentially)."""
    out, seen, frontier = [], {node}, [node]
    for _ in range(depth):
        frontier = [a for f in frontier for a in f.all_input_nodes if a not in seen and not seen.add(a)]
        out.extend(frontier)
    return out


def _has_param_gather(final: Node) -> bool:
    """Whether a bmm with a per-pair weight gather feeds ``final`` (so a failed match is a near miss)."""
    stack, seen = [final], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_fn(n, torch.bmm) and any(_is_param_gather(a) for a in n.args[:2]):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _accumulators(graph: torch.fx.Graph) -> list[tuple[Node, list[Node]]]:
    """Tensors that ``index_add_`` (or ``index_add``, ``scatter_add``) sums rows into, with those
    calls in graph order."""
    found: dict[Node, list[Node]] = {}
    chained: set[Node] = set()  # out-of-place sums: what sums into one of them continues its chain
    for n in graph.nodes:
        if not ((is_method(n, "index_add_", "index_add", "scatter_add", "scatter_add_")
                 or is_fn(n, torch.scatter_add, torch.index_add))
                and isinstance(arg(n, 0, "input"), Node)):
            continue
        if not is_method(n, "index_add_", "index_add") and not is_fn(n, torch.index_add) \
                and arg(n, 1, "dim") not in (0, -2):
            continue  # counts along another dim (DeepSeek's aux loss: ce.scatter_add_(1, ids, ones)), not rows
        acc = arg(n, 0, "input")
        if not _inplace(n):
            chained.add(n)
        if acc in chained:
            continue  # acc = acc.index_add(...) again: one site, reported at its first sum
        found.setdefault(acc, []).append(n)
    return list(found.items())


def emit_moe(graph: torch.fx.Graph, before: Node, ids: Node, weights: Node, x: Node, experts: dict,
             out_dtype: torch.dtype, recompute: bool, capacity: int = -1, priority: str = "token",
             drop_zero_weights: bool = False) -> Node:
    """Insert ``moe_route`` + ``moe_experts`` before ``before``; return the node of ``y``.

    ``drop_zero_weights``: pairs of weight exactly 0 count toward ``capacity`` but are not
    computed (see :func:`_route_without_zero_weights`)."""
    E = len(experts)
    first = experts[0]
    refs = dict(zip(REF_NAMES, map(list, zip(*(experts[e].refs() for e in range(E))))))
    existing = set(graph.nodes)
    with graph.inserting_before(before):
        route = graph.call_function(torch.ops.blazec.moe_route.default, (ids, E, capacity, priority))
        sorted_pairs, offsets, pair_pos = (graph.call_function(operator.getitem, (route, i)) for i in range(3))
        if drop_zero_weights:
            sorted_pairs, offsets, pair_pos = _route_without_zero_weights(graph, ids, weights, pair_pos, E, priority)
        lists = {a: weight_list(graph, r, E) for a, r in refs.items()}
        out = graph.call_function(
            torch.ops.blazec.moe_experts.default,
            (x, weights, sorted_pairs, offsets, pair_pos,
             lists["gate"], lists["up"], lists["down"], lists["b_gate"], lists["b_up"], lists["b_down"],
             first.activation, "hidden" if first.weight_in_hidden is not None else "output", recompute,
             out_dtype),
        )
        y = graph.call_function(operator.getitem, (out, 0))
    _copy_source_meta(graph, before, existing)
    return y


def _route_without_zero_weights(graph: torch.fx.Graph, ids: Node, weights: Node, pair_pos: Node, E: int,
                                priority: str) -> tuple[Node, Node, Node]:
    """The route of the kept pairs of nonzero weight, at the graph's insertion point.

    GShard's ``combine.bool()`` dispatches no pair of weight exactly 0: its slot stays taken
    (it counts toward the capacity) but the expert runs on a zero row there, so eager's output
    and dL/dx get nothing from it even where ``expert_e(x[t])`` overflows, where the op's
    ``0 * inf`` would be NaN. Such pairs go to a spare expert E in a second route, over the
    same priority order (``moe_route_sink``, which drops them), whose offsets and pair
    positions read as the first route's minus those pairs."""
    call = graph.call_function
    kept = call(torch.ops.aten.ge.Scalar, (pair_pos, 0))
    nonzero = call(torch.ops.aten.ne.Scalar, (call(torch.ops.aten.reshape.default, (weights, [-1])), 0))
    keep = call(torch.ops.aten.logical_and.default, (kept, nonzero))
    flat_ids = call(torch.ops.aten.reshape.default, (ids, [-1]))
    spare = graph.call_method("view_as", (call(torch.ops.aten.where.ScalarOther, (keep, flat_ids, E)), ids))
    route = call(torch.ops.blazec.moe_route_sink.default, (spare, E, priority))
    route.meta[ROUTER_IDS] = ids  # the router's ids, for moe_gating's report
    return tuple(call(operator.getitem, (route, i)) for i in range(3))


def _copy_source_meta(graph: torch.fx.Graph, before: Node, existing: set[Node]) -> None:
    """The new nodes carry the replaced code's source location, so dumps and errors point at it."""
    for n in graph.nodes:
        if n not in existing:
            for key in ("stack_trace", "nn_module_stack"):
                if key in before.meta:
                    n.meta[key] = before.meta[key]


def _sharded(ep, experts: dict) -> bool:
    """Whether the site is emitted expert-parallel: a group of several ranks that E divides."""
    return ep is not None and ep.world > 1 and len(experts) % ep.world == 0


def _describe_match(form: str, where: str, experts: dict, x: Node, top_k: int, recompute: bool,
                    capacity: int | None = None, ep=None, chunks: int = 1) -> Match:
    first = experts[0]
    details = {}
    if _sharded(ep, experts):
        local = ep.local_experts(len(experts))
        details["expert_parallel"] = (f"rank {ep.rank}/{ep.world} runs experts {local.start}..{local.stop - 1}, "
                                      f"{chunks} chunk(s)")
    return Match(form, where, {
        "E": len(experts), "k": top_k, "d": int(shape(x)[1]), "I": _inter(first), "activation": first.activation,
        "bias": any(b is not None for b in (first.b_gate, first.b_up, first.b_down)),
        "weight_pos": "hidden" if first.weight_in_hidden is not None else "output",
        "capacity": capacity, "dtype": str(dtype(x)).replace("torch.", ""),
        "recompute": "gemm1" if recompute else "activation only"} | details)


def _remove_dead(graph: torch.fx.Graph, links: set[Node] = frozenset()) -> None:
    """Erase nodes nothing reads, including the asserts on sizes of erased ``torch.where``s and
    the rewritten sites' in-place ``links`` (an inverse permutation written by ``scatter_`` is
    read by the dead site)."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph.nodes)):
            if n.op in ("placeholder", "output") or n.users:
                continue
            if n.target in ASSERT_TARGETS:
                if _guards_only_dead(n):
                    graph.erase_node(n)
                    changed = True
                continue
            if _pure(n) or n in links:
                graph.erase_node(n)
                changed = True


def _guards_only_dead(assert_node: Node) -> bool:
    """An assert whose inputs are all size expressions of nodes that only feed asserts."""
    stack, seen = list(assert_node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if any(u.target not in ASSERT_TARGETS and u not in seen and not _is_sym(u) for u in n.users):
            return False
        if _is_sym(n) or n.target is torch.ops.aten.sym_size.int:
            stack.extend(n.all_input_nodes)
    return True


def _is_sym(n: Node) -> bool:
    v = val(n)
    return isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)) or n.target is torch.ops.aten.sym_size.int


def _pure(n: Node) -> bool:
    """Safe to erase when unused: it writes nothing in place (``written_args``: in-place methods
    and functions, ``inplace=True`` by keyword or position, schema writes, ``out=``) and FX does
    not call it impure."""
    if n.op not in ("call_method", "call_function") or written_args(n):
        return False
    return n.op == "call_method" or not n.is_impure()


# ---------------------------------------------------------------------------------------
# Other naive forms: recognized, reported, left alone.


def _is_param_gather(n: object) -> bool:
    """``P[idx]`` of a 3-D parameter with a tensor index: a per-pair weight copy."""
    return isinstance(n, Node) and is_fn(n, operator.getitem) and isinstance(n.args[0], Node) \
        and n.args[0].op in ("placeholder", "get_attr") and len(shape(n.args[0]) or ()) == 3 \
        and isinstance(n.args[1], Node)
