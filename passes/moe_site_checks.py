"""Checks every matched MoE site passes before the dispatch pass rewrites it.

The form matchers (moe_*_form.py) prove that a site computes what the blaze ops compute,
reading the graph's data flow. Three things the data flow alone does not show are checked here,
for every form alike; a site that fails one is left alone and reported as a near miss:

- **In-place mutation.** The blaze op reads ids, weights, x and the expert weights where the
  dispatch ended (its placement), while the dispatch read them where its nodes were. A tensor
  mutated in place in between (``w.mul_``, ``mask[:, 1] = 0``, ``gate.div_``, ``x += ...``) would
  be read after the change by the op and before it by the code it replaces. Refused: a mutation,
  before the placement, of a tensor one of the site's own nodes made (a mask, a gate) or that
  the code derives from ids for the replaced nodes (the op derives it from ids itself; one that
  feeds only the op's inputs, as gathered weights, is computed where it was), of a tensor
  (through any view of it, ``.data`` included, or any op whose value shares its storage) that
  one of the site's nodes read before the mutation, of an op
  input that a node feeding the proof read before it, or of the routing ids at all (the
  matchers prove them in range, and distinct within a row, from the op that made them:
  topk, one_hot, argmax). After the placement, in a graph with a backward: a write to x or
  the routing weights, which the op keeps for backward where the naive code kept gathered
  copies.
- **Autocast.** Under ``torch.autocast`` the expert GEMMs of the naive code run in the autocast
  dtype, while the blaze ops compute in the dtype of their inputs.
- **Grad mode.** A ``torch.no_grad()`` (or ``enable_grad``) region inside the dispatch, as
  around one expert to freeze it: Dynamo records it as ``_set_grad_enabled`` calls, and the
  nodes inside it make no autograd graph. The blaze op is one autograd node at the placement,
  so every node it replaces must run in the placement's grad mode.
- **The op's argument checks.** The matchers accept what the code computes; the op accepts
  experts of one shape. Experts with different hidden sizes, or a weight that only broadcasts
  (a width-1 projection, a stacked parameter with more experts than the router picks from),
  are refused here with the op's own message rather than failing the compile.
"""

from __future__ import annotations

import builtins
import operator
from typing import Iterable, Optional

import torch
import torch.fx

from blazec.passes._fx import NoMatch, is_fn, source_label, val, where_loc, written_args

Node = torch.fx.Node

# Methods and functions whose result may share memory with their first argument.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "expand", "expand_as", "flatten", "unflatten", "narrow", "select", "split", "chunk", "unbind",
    "tensor_split", "as_strided", "detach", "contiguous", "to", "float", "half", "bfloat16", "double",
    "type", "type_as", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold", "__getitem__",
    "real", "imag", "view_as_real", "view_as_complex", "squeeze_", "unsqueeze_",
}
_VIEW_FNS = {
    torch.reshape, torch.permute, torch.transpose, torch.t, torch.unsqueeze, torch.squeeze, torch.flatten,
    torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.swapdims, torch.diagonal, torch.detach, torch.as_strided,
    torch.view_as_real, torch.view_as_complex, torch.unflatten, operator.getitem, builtins.getattr,
}
_DATA_ATTR = getattr(torch._C._autograd, "_get_data_attr", None)  # how Dynamo traces ``t.data``
if _DATA_ATTR is not None:
    _VIEW_FNS.add(_DATA_ATTR)

def _is_tensor(n: object) -> bool:
    return isinstance(n, Node) and isinstance(val(n), torch.Tensor)


def mutated(n: Node) -> Optional[Node]:
    """The tensor node ``n`` writes in place, or None (``written_args`` lists the spellings).
    ``squeeze_`` and ``unsqueeze_`` only change the metadata: they count as views."""
    if n.op == "call_method" and n.target in ("squeeze_", "unsqueeze_"):
        return None
    return next((t for t in written_args(n) if _is_tensor(t)), None)


def root(n: Node, cache: dict) -> Node:
    """The node whose memory ``n`` may be a view of (through view-like ops and in-place ops,
    which return their argument); ``n`` itself when it is a fresh tensor."""
    hit = cache.get(n)
    if hit is not None:
        return hit
    r, seen = n, set()
    while r not in seen:
        seen.add(r)
        src = r.args[0] if r.args else None
        if r.op == "call_function" and r.target is operator.getitem and isinstance(src, Node) \
                and isinstance(val(src), (tuple, list)) and _is_view(src) and src.args and _is_tensor(src.args[0]):
            r = src.args[0]  # a piece of chunk / split / unbind: a view of their input
            continue
        if _is_tensor(src) and (_is_view(r) or mutated(r) is src):
            r = src
            continue
        shared = _storage_source(r)  # a view op not in the lists (broadcast_to, ravel, positive, conj...)
        if shared is None:
            break
        r = shared
    cache[n] = r
    return r


def _storage_id(n: object) -> Optional[int]:
    v = val(n)
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return v.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _storage_source(n: Node) -> Optional[Node]:
    """A tensor input of ``n`` (or of the tuple-valued op ``n`` is an item of) whose example value
    shares ``n``'s storage: ``n`` is a view of it, whatever op made it."""
    sid = _storage_id(n)
    if sid is None:
        return None
    ins = list(n.all_input_nodes)
    if n.op == "call_function" and n.target is operator.getitem and ins and isinstance(val(ins[0]), (tuple, list)):
        ins = list(ins[0].all_input_nodes) + ins[1:]
    return next((a for a in ins if _is_tensor(a) and _storage_id(a) == sid), None)


def _is_view(n: Node) -> bool:
    return (n.op == "call_method" and n.target in _VIEW_METHODS) or (n.op == "call_function" and n.target in _VIEW_FNS)


def _descendants(nodes: Iterable[Node], stop: frozenset | set = frozenset()) -> set[Node]:
    """The nodes computed from ``nodes``; with ``stop``, not through those (they are included)."""
    out, stack = set(), list(nodes)
    while stack:
        for u in stack.pop().users:
            if u not in out:
                out.add(u)
                if u not in stop:
                    stack.append(u)
    return out


def _ancestors(nodes: Iterable[Node]) -> set[Node]:
    out, stack = set(), [n for n in nodes if isinstance(n, Node)]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in out:
                out.add(a)
                stack.append(a)
    return out


def check_no_mutation(graph: torch.fx.Graph, finals: list[Node], inputs: list[Node],
                      accumulation: set[Node]) -> None:
    """NoMatch when a tensor the site reads is written in place between its reads and the
    placement ``finals[-1]`` (module docstring). ``finals``: the nodes the op replaces;
    ``inputs``: what the op reads, ids first (ids, weights, x, the expert weights);
    ``accumulation``: the site's own in-place sums, which the op reproduces."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    place = pos[finals[-1]]
    feeds_inputs = _ancestors(inputs) | {n for n in inputs if isinstance(n, Node)}
    dispatch = _ancestors(finals) | set(finals)  # with the nodes that also feed the inputs
    # the nodes the rewrite replaces; a tensor they read that the op does not take (it derives
    # it from ids, as GShard's masks) must not be written before the placement at all
    site = dispatch - feeds_inputs
    cache: dict = {}
    made = {root(n, cache) for n in site if _is_tensor(n)}
    first_read: dict[Node, int] = {}  # root -> position of the site's first read of it
    for n in site:
        for a in n.all_input_nodes:
            if _is_tensor(a):
                r = root(a, cache)
                first_read[r] = min(first_read.get(r, place), pos[n])
    # what the op reads: its inputs, and for the [T, k] stacks the pass builds (GShard's
    # per-choice ids and weights), what they stack
    read = [a for n in inputs if isinstance(n, Node)
            for a in ([n, *n.args[0]] if is_fn(n, torch.stack) and isinstance(n.args[0], (list, tuple)) else [n])]
    input_roots = {root(n, cache) for n in read if _is_tensor(n)}
    # The op derives from ids everything the code computes from them (masks, positions, kept
    # pairs): a write to any of those before the placement breaks the matcher's proof, even one
    # made before anything reads it (GShard's one_hot masks feed its weights and its drops).
    ids_nodes = [a for a in ([inputs[0], *inputs[0].args[0]] if is_fn(inputs[0], torch.stack) else [inputs[0]])
                 if isinstance(a, Node)]
    # Only those that reach the replaced nodes: a tensor computed from ids that feeds nothing but
    # the op's inputs (DeepSeek-V3's ``w = scores.gather(1, ids); w /= w.sum()``, then ``w * s``)
    # is computed, and written, where it was, for the op as for the code.
    from_ids = {root(m, cache) for m in _descendants(ids_nodes) & dispatch if _is_tensor(m)} - input_roots
    aliases: dict[Node, list[Node]] = {}
    for m in dispatch:
        if _is_tensor(m):
            aliases.setdefault(root(m, cache), []).append(m)
    from_ids = {r for r in from_ids if _descendants(aliases.get(r, [r]), stop=set(read)) & site}
    # The matchers prove facts about the ids from where they come from (topk indices lie in
    # [0, E) and are distinct within a row): a write to them anywhere before the placement,
    # even one both the code and the op would see, can break that proof.
    ids_roots = {root(a, cache) for a in ids_nodes if _is_tensor(a)}
    for n in graph.nodes:
        i = pos[n]
        if i >= place:
            break
        t = mutated(n)
        if t is None or n in accumulation:
            continue
        r = root(t, cache)
        if r in ids_roots:
            raise NoMatch(
                f"{_describe(n)} ({where_loc(n)}) writes in place the routing ids ({r.name}) before the dispatch's "
                "end; the matcher proved them in range (and distinct within a row) from the op that made them, "
                "which no longer holds. Left alone")
        if (r in made and r not in feeds_inputs) or r in from_ids or first_read.get(r, place) < i or \
                (r in first_read and r not in input_roots) or \
                (r in input_roots and _read_before(n, r, dispatch, pos, cache)):
            raise NoMatch(
                f"{_describe(n)} ({where_loc(n)}) writes in place a tensor the dispatch reads "
                f"({r.name}) before its end; the blaze op would read it after the write. Left alone")
    _check_kept_unchanged(graph, pos, finals[-1], inputs, cache)


def _check_kept_unchanged(graph: torch.fx.Graph, pos: dict, place_node: Node, inputs: list[Node],
                          cache: dict) -> None:
    """NoMatch when a tensor the blaze op keeps for backward is written in place after the
    placement in a graph that needs a backward (``w.data.mul_(2)``, or a ``w.mul_`` under
    no_grad):
    - x or the routing weights: the code the op replaces kept gathered copies (``x[tok]``,
      ``w[tok, slot]``), so its gradients did not see the write, and the op's would (or autograd
      would refuse the op's saved tensor);
    - the expert weights and biases: the op keeps them all, while the code's linears keep a
      weight only when their input needs a gradient (none when x needs none), and the op's
      ``recompute_gemm1`` backward recomputes GEMM 1 from them where the code kept its result."""
    weights, x = inputs[1], inputs[2]
    if not getattr(val(place_node), "requires_grad", True):
        return  # no backward (no_grad, inference): the op reads them only at the placement
    copies = "the code it replaces kept gathered copies"
    mine = ("the code's linears keep a weight only when their input needs a gradient, and the op's "
            "recompute_gemm1 backward recomputes from the weights what the code kept")
    named = [(x, "the expert input", copies), (weights, "the routing weights", copies)]
    named += [(w, "an expert parameter", mine) for w in inputs[3:]]
    kept: dict = {}
    for n, what, why in named:
        if _is_tensor(n):
            kept.setdefault(root(n, cache), (what, why))
    for n in graph.nodes:
        if pos[n] <= pos[place_node]:
            continue
        t = mutated(n)
        r = root(t, cache) if t is not None else None
        hit = kept.get(r)
        if hit is not None:
            what, why = hit
            raise NoMatch(
                f"{_describe(n)} ({where_loc(n)}) writes in place {what} ({source_label(r)}) after the dispatch; the "
                f"blaze op keeps it for backward and {why}, so the gradients would differ. Left alone")


def _read_before(n: Node, r: Node, dispatch: set[Node], pos: dict, cache: dict) -> bool:
    """Whether a node of the dispatch reads ``r``, which the op reads at the placement, before the
    write ``n`` and without feeding it (``w /= w.sum()`` reads w to write it): a node that feeds
    both the proof and the op's inputs, as GShard's masks feed its weights."""
    feeds_n = _ancestors([n])
    return any(pos[m] < pos[n] and m is not n and m not in feeds_n
               and any(_is_tensor(a) and root(a, cache) is r for a in m.all_input_nodes) for m in dispatch)


def _describe(n: Node) -> str:
    if n.op == "call_method":
        return f"the in-place {n.target}"
    name = getattr(n.target, "__name__", str(n.target))
    return {"setitem": "an item assignment", "iadd": "a +=", "isub": "a -=", "imul": "a *=",
            "itruediv": "a /="}.get(name, f"the in-place {name}")


def replaced_nodes(finals: list[Node], inputs: list[Node]) -> set[Node]:
    """The nodes a rewrite replaces: ``finals`` and their ancestors that do not feed the op's
    ``inputs`` (ids, weights, x and the expert weights are computed where they were)."""
    return (_ancestors(finals) | set(finals)) - (_ancestors(inputs) | {n for n in inputs if isinstance(n, Node)})


def check_grad_mode(mode: dict[Node, bool], finals: list[Node], site: set[Node]) -> None:
    """NoMatch when a node of ``site`` (``replaced_nodes``) runs in another grad mode
    (``grad_modes``) than the placement ``finals[-1]``."""
    place = mode[finals[-1]]
    odd = [n for n in mode if n in site and mode[n] != place and _differentiable(n)]  # in graph order
    if odd:
        n = odd[0]
        raise NoMatch(
            f"{n.name} ({where_loc(n)}) runs with grad {'enabled' if mode[n] else 'disabled'} inside the dispatch, "
            f"whose end runs with it {'enabled' if place else 'disabled'} (a torch.no_grad() or enable_grad() "
            "region around part of the experts' code): the blaze op is one autograd node and cannot leave "
            "part of the experts without gradients. Left alone")


_FACTORIES = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
_FACTORY_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "zero_"}


def _differentiable(n: Node) -> bool:
    """Whether grad mode changes what ``n`` records: a float result computed from a float input
    that requires grad (not index math, masks, or a fresh buffer such as the accumulator)."""
    v = val(n)
    if not (isinstance(v, torch.Tensor) and v.dtype.is_floating_point):
        return False
    if is_fn(n, *_FACTORIES) or (n.op == "call_method" and n.target in _FACTORY_METHODS):
        return False
    return any(isinstance(a := val(m), torch.Tensor) and a.dtype.is_floating_point and a.requires_grad
               for m in n.all_input_nodes)


def autocast_reason(graph: torch.fx.Graph) -> Optional[str]:
    """Why the whole graph runs under autocast (the ambient state Dynamo traced it in and guards
    on), or None. Autocast regions inside the graph are checked per site (``check_autocast``)."""
    for device in ("cuda", "cpu"):
        try:
            on = torch.is_autocast_enabled(device)
        except (TypeError, RuntimeError):  # a torch without the device argument, or no such device
            on = False
        if on:
            return (f"torch.autocast is enabled for {device}: the naive expert GEMMs run in "
                    f"{torch.get_autocast_dtype(device)}, the blaze ops in their inputs' dtype. Left alone")
    return None


def _autocast_fn(n: Node, name: str) -> bool:
    return n.op == "call_function" and getattr(n.target, "__name__", "") == name


def autocast_regions(graph: torch.fx.Graph) -> dict[Node, Node]:
    """For each node inside an enabled autocast region of the graph, the region's
    ``_enter_autocast`` node. Per device type, the innermost region decides: ``enabled=False``
    inside an enabled region of the same device turns it off (as ERNIE's fp32 router does), one
    for another device (``torch.cuda.amp.autocast(enabled=False)`` inside a CPU region) does
    not. A node counts as inside when any device's autocast is on at it."""
    stack: list[Node] = []
    out: dict[Node, Node] = {}
    for n in graph.nodes:
        if _autocast_fn(n, "_enter_autocast"):
            stack.append(n)
            continue
        if _autocast_fn(n, "_exit_autocast"):
            enter = n.args[0] if n.args else None
            if enter in stack:
                stack.remove(enter)
            elif stack:
                stack.pop()
            continue
        seen: set = set()
        for enter in reversed(stack):
            device = enter.args[0] if enter.args else None
            if device in seen:
                continue
            seen.add(device)
            if bool(enter.args[2] if len(enter.args) > 2 else True):
                out[n] = enter
                break
    return out


def autocast_message(enter: Node) -> str:
    return (f"an autocast region in the compiled code ({where_loc(enter)}) covers the dispatch: the naive expert "
            f"GEMMs run in the autocast dtype, the blaze ops in their inputs' dtype. Left alone")


def check_autocast(regions: dict[Node, Node], finals: list[Node], site: set[Node]) -> None:
    """NoMatch when the placement ``finals[-1]`` or a node of ``site`` (``replaced_nodes``) runs
    in an enabled autocast region (``autocast_regions``); the ids, weights and x may come from one."""
    hit = next((regions[n] for n in [finals[-1], *site] if n in regions), None)
    if hit is not None:
        raise NoMatch(autocast_message(hit))


def op_rejection(ids: Node, weights: Node, x: Node, experts: dict, out_dtype) -> Optional[str]:
    """``blazec::moe_experts``'s own argument check's error for this site's arguments, run on
    the nodes' example values (shapes only), or None when it accepts them or there are no
    example values to run it on."""
    vx, vi, vw = _fake(x), _fake(ids), _fake(weights)
    mode = getattr(vx, "fake_mode", None)
    if mode is None or vi is None or vw is None:
        return None
    from blazec.ops.experts import check_experts_args
    from blazec.passes.moe_expert_mlp import weight_values

    E, first = len(experts), experts[0]
    # no autograd: the compile may run under the caller's saved-tensor hooks
    with torch.no_grad(), mode:
        lists = [weight_values(list(refs)) for refs in zip(*(experts[e].refs() for e in range(E)))]
        if any(v is None for v in lists):
            return None
        P = vi.numel()  # moe_route's outputs: [T*k] pair orders, [E+1] offsets
        pairs, offsets = vx.new_empty((P,), dtype=torch.int64), vx.new_empty((E + 1,), dtype=torch.int64)
        try:
            check_experts_args(vx, vw, pairs, offsets, pairs, *lists, first.activation,
                               "hidden" if first.weight_in_hidden is not None else "output", out_dtype)
        except ValueError as e:
            return f"the blaze op rejects this site's experts: {e}. Left alone"
    return None


def _fake(n: object):
    """A node's example value; for a ``torch.stack`` of nodes the pass inserted, their stack."""
    v = val(n)
    if v is not None or not isinstance(n, Node):
        return v
    if is_fn(n, torch.stack) and isinstance(n.args[0], (list, tuple)):
        parts = [val(a) for a in n.args[0]]
        if parts and all(isinstance(p, torch.Tensor) for p in parts):
            mode = getattr(parts[0], "fake_mode", None)
            if mode is not None:
                with mode:
                    return torch.stack(parts, dim=n.kwargs.get("dim", 0))
    return None
