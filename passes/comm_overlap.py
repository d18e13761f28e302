"""Communication scheduling: issue functional collectives early, wait on them late.

Runs at stage ``"post_grad"`` on each partitioned forward/backward graph (aten level). A
functional collective (``torch.ops._c10d_functional.all_reduce``, ``all_gather_into_tensor``,
``reduce_scatter_tensor``, ``all_to_all_single``, ...) returns a tensor that is only valid
after ``_c10d_functional.wait_tensor``. Traced code puts the wait right after the collective,
which serializes communication and compute. This pass moves

- each collective up to right after the last node that produces one of its inputs, and
- each wait down to right before the first node that uses its result,

so the compute in between runs while the transfer is in flight. Only collectives and waits
move; every other node keeps its relative order, and no data dependency changes.

Ordering rules (why each exists):

- **Prioritized, deterministic issue order** (``comm_order="priority"``, the default). Every
  rank must issue collectives on a process group in the same order, or they deadlock (NCCL)
  or pair up the wrong buffers (gloo). The graph is the same on every rank and the reorder is
  a pure function of it, so every rank issues the same sequence. Each collective rises to its
  bound (its last input, or the nearest barrier above it); collectives that land at the same
  point go in the order their results are first needed (the critical path: the one whose
  consumer comes first goes first), ties in program order. A collective ready earlier is
  issued earlier even when it is needed later: holding it back would idle the link. Eager code
  and other graphs run before or after this graph, never inside it, so they do not interleave
  with the reordered collectives.
- ``comm_order="program"`` keeps the traced order instead: no collective rises above the one
  before it. The report then notes where the first uses come in a different order.
- **Side effects are barriers.** Neither a collective nor a wait crosses a node that mutates
  a tensor (``copy_``, in-place ops, out= ops, in-place collectives such as
  ``all_reduce_``), a node FX considers impure (asserts, prints, ...), or a random op
  (``nondeterministic_seeded``), nor the wait of an in-place collective (its buffer is
  written until then). Those nodes never move, so their mutual order, and the order of every
  read and write around them, is unchanged. In-place collectives are not moved at all, nor
  are their waits.
- A wait also stays before any other user of its collective's output that came after it
  (``wait_tensor`` returns its input, so code may read the buffer directly once waited).
- A wait goes before the first op that Inductor's reinplace pass, which runs after this one,
  may turn into an in-place write to the collective's input (``index_put``, the view
  scatters, the foreach ops, ``all_reduce``), moving up there when the traced code waits
  later. Peers read the input until the wait; with ``backend="inductor"`` alone (torch
  2.13.0, 2 gloo ranks, 2026-11-28) such a write after ``all_to_all_single(a)`` reached them.

The pass is a pure function of the graph: it reads no process group and is unit-testable on
graphs traced under ``FakeTensorMode``. The report has one entry per collective: a match
when it or its wait moved, a note when both already sat at their bounds, a near miss when
its wait could not be found. Each entry gives the op, the issue and wait positions (node
indices in the graph) before and after, the compute nodes between issue and wait before and
after, the FLOPs of the matmuls/convolutions between them when shapes are known, and the
heavy ops (matmuls, blaze ops) the transfer overlaps. A final note prints the whole schedule
(issues, waits and the ops between them), which ``blazec dump`` shows.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from blazec.passes.registry import PassContext
from blazec.report import Match, NearMiss, PassReport

NAME = "comm_overlap"
_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


def _is_c10d(node: torch.fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace in _NAMESPACES


def _is_wait(node: torch.fx.Node) -> bool:
    return _is_c10d(node) and node.target.overloadpacket.__name__ == "wait_tensor"


def _is_collective(node: torch.fx.Node) -> bool:
    return _is_c10d(node) and not _is_wait(node)


def _mutates(node: torch.fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


def _is_barrier(node: torch.fx.Node) -> bool:
    """A node that neither collectives nor waits may cross."""
    if node.op != "call_function":
        return False
    if _is_wait(node):
        # the wait of an in-place collective: its buffer is being written until then
        src = node.args[0] if node.args else None
        if isinstance(src, torch.fx.Node) and src.target is operator.getitem and src.args:
            src = src.args[0]
        return isinstance(src, torch.fx.Node) and _is_collective(src) and _mutates(src)
    if _is_collective(node):
        return _mutates(node)  # in-place collective: pinned, and others do not cross it
    t = node.target
    if _mutates(node):
        return True
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
        return True
    try:
        return node.is_impure()
    except Exception:  # pragma: no cover - defensive: unknown targets count as side-effecting
        return True


# Functional ops that Inductor's reinplace pass (run after this pass) may turn into in-place
# writes to their first argument: index_put, the view scatters, the foreach ops, all_reduce.
_REINPLACEABLE = {"index_put", "_unsafe_index_put", "slice_scatter", "select_scatter", "diagonal_scatter",
                  "as_strided_scatter", "all_reduce", "all_reduce_coalesced"}


def _may_write_in_place(node: torch.fx.Node, storages: set) -> bool:
    """Whether Inductor may make ``node`` write in place into one of ``storages``
    (``_storage`` keys of a collective's inputs)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not node.args:
        return False
    name = t.overloadpacket.__name__
    if name not in _REINPLACEABLE and not name.startswith("_foreach_"):
        return False
    first = node.args[0]
    return any(_storage(a) in storages for a in (first if isinstance(first, (list, tuple)) else [first]))


def _storage(node: object) -> object:
    """What identifies the storage ``node`` reads: the storage of its example value when the
    graph has them (post-grad graphs do; views share their base's), else the node a chain of
    view ops (``slice``, ``view``, and ``split`` / ``unbind`` / ``chunk`` through their
    getitems) starts from."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        from torch.multiprocessing.reductions import StorageWeakRef

        return StorageWeakRef(val.untyped_storage())
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.args:
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            src = node.args[0]
            if isinstance(src.target, torch._ops.OpOverload) and src.target.is_view:
                node = src.args[0]  # a view op with several outputs
                continue
        if isinstance(node.target, torch._ops.OpOverload) and node.target.is_view:
            node = node.args[0]
            continue
        break
    return node


def _is_compute(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and not _is_c10d(node) and node.target is not operator.getitem


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    out = []
    for s in val.shape:
        if isinstance(s, torch.SymInt):  # read the hint: int(s) would guard and specialize the size
            if s.node.hint is None:  # unbacked
                return None
            s = s.node.hint
        out.append(int(s))
    return tuple(out)


def _flops(node: torch.fx.Node) -> int | None:
    """FLOPs of a matmul-like node from its output shape (None when unknown, 0 for other ops)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    name = node.target.overloadpacket.__name__
    out = _shape(node)
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a = _shape(node.args[1] if name in ("addmm", "baddbmm") else node.args[0])
        if out is None or a is None:
            return None
        k = a[-1]
        numel = 1
        for s in out:
            numel *= s
        return 2 * numel * k
    if name == "convolution":
        w = _shape(node.args[1])
        if out is None or w is None:
            return None
        numel = 1
        for s in out:
            numel *= s
        per = 1
        for s in w[1:]:
            per *= s
        return 2 * numel * per
    return 0


def _between(nodes: list[torch.fx.Node], i: int, j: int) -> tuple[int, int | None]:
    """(compute nodes, FLOPs or None when a matmul's shape is unknown) strictly between i and j."""
    count, flops = 0, 0
    for n in nodes[i + 1 : j]:
        if _is_compute(n):
            count += 1
            f = _flops(n)
            flops = None if (f is None or flops is None) else flops + f
    return count, flops


_HEAVY = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_grouped_mm", "_scaled_grouped_mm"}


def _heavy(node: torch.fx.Node) -> str | None:
    """The op name of a node worth overlapping with (matmuls, convolutions, blaze ops)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    name = t.overloadpacket.__name__
    return name if t.namespace == "blazec" or name in _HEAVY else None


def _heavy_between(nodes: list[torch.fx.Node], i: int, j: int) -> list[str]:
    """Names of the heavy ops strictly between i and j, with a count when one repeats."""
    counts: dict[str, int] = {}
    for n in nodes[i + 1 : j]:
        h = _heavy(n)
        if h:
            counts[h] = counts.get(h, 0) + 1
    return [h if k == 1 else f"{h}x{k}" for h, k in counts.items()]


def schedule_lines(graph: torch.fx.Graph) -> list[str]:
    """The communication schedule of ``graph`` as text: issues, waits, and the ops between."""
    out: list[str] = []
    pending: list[torch.fx.Node] = []

    def flush() -> None:
        if pending:
            heavy = [h for h in (_heavy(n) for n in pending) if h]
            counts = {h: heavy.count(h) for h in dict.fromkeys(heavy)}
            desc = ", ".join(h if k == 1 else f"{h} x{k}" for h, k in counts.items())
            out.append(f"    .. {len(pending)} op(s)" + (f": {desc}" if desc else ""))
            pending.clear()

    for n in graph.nodes:
        if _is_collective(n):
            flush()
            out.append(f"  issue {n.name} ({_op_name(n)})")
        elif _is_wait(n):
            flush()
            src = n.args[0]
            while isinstance(src, torch.fx.Node) and src.target is operator.getitem:
                src = src.args[0]
            out.append(f"  wait  {getattr(src, 'name', src)}")
        elif _is_compute(n):
            pending.append(n)
    flush()
    return out


def _op_name(node: torch.fx.Node) -> str:
    return node.target.overloadpacket.__name__


def _raise_bound(nodes: list[torch.fx.Node], c: torch.fx.Node, lo: int) -> int:
    """Index of the node ``c`` must stay below: its last input, ``lo``, or the nearest barrier."""
    i = nodes.index(c)
    lo = max([lo] + [nodes.index(a) for a in c.all_input_nodes if a in nodes])
    for k in range(i - 1, lo, -1):
        if _is_barrier(nodes[k]) or nodes[k].op == "placeholder":
            return k
    return lo


def _raise_in_program_order(nodes: list[torch.fx.Node], colls: list[torch.fx.Node]) -> None:
    """``comm_order="program"``: no collective rises above the collective before it."""
    prev: torch.fx.Node | None = None
    for c in colls:
        if not _mutates(c):
            lo = _raise_bound(nodes, c, nodes.index(prev) if prev is not None else -1)
            i = nodes.index(c)
            if lo + 1 < i:
                nodes.pop(i)
                nodes.insert(lo + 1, c)
        prev = c


def _raise_by_priority(nodes: list[torch.fx.Node], colls: list[torch.fx.Node],
                       waits: dict[torch.fx.Node, torch.fx.Node | None]) -> None:
    """``comm_order="priority"``: each collective rises to its bound; collectives that land at
    the same point go in the order their results are first needed (program order on ties)."""
    original = {n: i for i, n in enumerate(nodes)}

    def need(c: torch.fx.Node) -> int:
        w = waits[c]
        uses = [original[u] for u in w.users] if w is not None else []
        return min(uses, default=len(original))

    anchors = {}
    for c in colls:  # bounds in the original order
        if not _mutates(c):
            k = _raise_bound(nodes, c, -1)
            anchors[c] = nodes[k] if k >= 0 else None
    # A collective that reads another collective's output directly stays where it is.
    movable = [c for c in anchors if not (anchors[c] is not None and _is_collective(anchors[c]))]
    for c in movable:
        nodes.remove(c)
    groups: dict[torch.fx.Node | None, list[torch.fx.Node]] = {}
    for c in movable:
        groups.setdefault(anchors[c], []).append(c)
    for anchor, group in groups.items():
        group.sort(key=lambda c: (need(c), original[c]))
        at = nodes.index(anchor) + 1 if anchor is not None else 0
        nodes[at:at] = group


def schedule_comms(graph: torch.fx.Graph, order: str = "priority") -> PassReport:
    """Reorder ``graph`` in place (collectives early, waits late) and report per collective.

    ``order`` is ``"priority"`` or ``"program"``; see the module docstring.
    """
    report = PassReport(name=NAME)
    nodes = list(graph.nodes)
    colls = [n for n in nodes if _is_collective(n)]
    if not colls:
        return report

    # Each collective's waits, through getitem for collectives that return a list.
    waits: dict[torch.fx.Node, torch.fx.Node | None] = {}
    outputs: dict[torch.fx.Node, list[torch.fx.Node]] = {}  # collective -> [itself, getitems]
    for c in colls:
        outs = [c] + [u for u in c.users if u.op == "call_function" and u.target is operator.getitem]
        outputs[c] = outs
        ws = [u for o in outs for u in o.users if _is_wait(u)]
        waits[c] = min(ws, key=nodes.index) if ws else None
    all_waits = [w for c in colls for o in outputs[c] for w in o.users if _is_wait(w)]

    before = {c: (nodes.index(c), nodes.index(waits[c]) if waits[c] is not None else None) for c in colls}
    before_between = {
        c: _between(nodes, before[c][0], before[c][1]) if waits[c] is not None else None for c in colls
    }

    # 1. Raise collectives: right after the last input, never above a barrier.
    if order == "program":
        _raise_in_program_order(nodes, colls)
    else:
        _raise_by_priority(nodes, colls, waits)

    # 2. Sink waits, in program order (waits that share a bound keep their order): right
    #    before the first user of the waited value, never below a barrier, and never below
    #    another user of the collective's output that followed the wait.
    for w in sorted(all_waits, key=nodes.index):
        i = nodes.index(w)
        c = next(c for c in colls if w.args and w.args[0] in outputs[c])
        if _mutates(c):
            continue
        users = list(w.users)
        users += [u for o in outputs[c] for u in o.users if u is not w and not _is_wait(u)
                  and u.target is not operator.getitem and nodes.index(u) > i]
        hi = min((nodes.index(u) for u in users), default=len(nodes) - 1)
        for k in range(i + 1, hi):
            if _is_barrier(nodes[k]):
                hi = k
                break
        if hi - 1 > i:
            nodes.pop(i)
            nodes.insert(hi - 1, w)

    # 3. A wait goes before the first op Inductor may turn into an in-place write to its
    #    collective's input (``index_put(a, ...)`` after ``all_to_all_single(a)`` becomes
    #    ``index_put_`` on a's buffer, which peers may still be reading until the wait). Traced
    #    code can have that order too: the wait is then moved up to that op.
    for c in colls:
        ws = sorted((u for o in outputs[c] for u in o.users if _is_wait(u)), key=nodes.index)
        if not ws or _mutates(c):
            continue
        storages = {_storage(a) for a in c.all_input_nodes}
        lo, hi = nodes.index(c), nodes.index(ws[-1])
        writer = next((nodes[k] for k in range(lo + 1, hi) if _may_write_in_place(nodes[k], storages)), None)
        for w in ws if writer is not None else []:
            # the wait, and the getitem it reads (a coalesced collective's, left where it was
            # traced when the collective rose), go right before the writer
            for n in (w.args[0], w):
                if n is not c and nodes.index(n) > nodes.index(writer):
                    nodes.remove(n)
                    nodes.insert(nodes.index(writer), n)

    # Apply the order to the graph.
    if nodes != list(graph.nodes):
        anchor = nodes[0]
        for n in nodes[1:]:
            if anchor.next is not n:
                anchor.append(n)
            anchor = n
    graph.lint()

    # 4. Report.
    first_use: dict[torch.fx.Node, int] = {}
    for c in colls:
        iss0, wait0 = before[c]
        op = _op_name(c)
        if waits[c] is None:
            report.near_misses.append(NearMiss(op, c.name, "no wait_tensor on its result; left in place"))
            continue
        iss1, wait1 = nodes.index(c), nodes.index(waits[c])
        n0, f0 = before_between[c]
        n1, f1 = _between(nodes, iss1, wait1)
        details: dict[str, Any] = {
            "op": op, "issue": f"{iss0}->{iss1}", "wait": f"{wait0}->{wait1}",
            "compute_between": f"{n0}->{n1}",
        }
        if f1 is not None:
            details["flops_between"] = f"{f0 if f0 is not None else '?'}->{f1}"
        heavy = _heavy_between(nodes, iss1, wait1)
        if heavy:
            details["overlaps"] = ",".join(heavy)
        uses = [nodes.index(u) for u in waits[c].users]
        first_use[c] = min(uses) if uses else len(nodes)
        if (iss0, wait0) != (iss1, wait1):
            report.matches.append(Match("overlap", c.name, details))
        else:
            reason = "in-place collective, not moved" if _mutates(c) else "already at its bounds"
            report.notes.append(f"{c.name}: {reason} ({', '.join(f'{k}={v}' for k, v in details.items())})")
    ordered = [c for c in colls if c in first_use]
    by_use = sorted(ordered, key=lambda c: first_use[c])
    issued = sorted(ordered, key=nodes.index)
    if order == "priority" and issued != ordered:
        report.notes.append(
            "collectives issued in the order " + ", ".join(c.name for c in issued)
            + " (program order: " + ", ".join(c.name for c in ordered) + ")"
        )
    report.notes.append("schedule after the pass:\n" + "\n".join(schedule_lines(graph)))
    if order == "program" and by_use != ordered:
        report.notes.append(
            "collectives kept in program order " + ", ".join(c.name for c in ordered)
            + "; their results are first used in the order " + ", ".join(c.name for c in by_use)
        )
    return report


def comm_overlap_pass(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassReport:
    """Registry entry point (stage ``"post_grad"``); see the module docstring."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    order = getattr(getattr(ctx, "config", None), "comm_order", "priority")
    return schedule_comms(graph, order)
