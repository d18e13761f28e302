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

- **Collectives keep their program order.** Every rank must issue collectives on a process
  group in the same order, or they deadlock (NCCL) or pair up the wrong buffers (gloo). The
  graph is the same on every rank, so any *deterministic* reorder inside one graph would be
  safe for that graph alone; but other collectives that this pass cannot see (eager code
  between graphs, a graph break, another process group driven from Python, a recompile that
  only some ranks take) interleave with these in program order, and keeping program order is
  the one choice that stays correct with all of them. So a collective is never raised above
  the collective before it. The priority the design asks for (the collective whose result is
  needed first goes first) is therefore what program order gives in traced code; where the
  first consumers come in a different order than the issues, the report says so in a note
  instead of reordering.
- **Side effects are barriers.** Neither a collective nor a wait crosses a node that mutates
  a tensor (``copy_``, in-place ops, out= ops, in-place collectives such as
  ``all_reduce_``), a node FX considers impure (asserts, prints, ...), or a random op
  (``nondeterministic_seeded``). Those nodes never move, so their mutual order, and the
  order of every read and write around them, is unchanged. In-place collectives are not
  moved at all.
- A wait also stays before any other user of its collective's output that came after it
  (``wait_tensor`` returns its input, so code may read the buffer directly once waited).

The pass is a pure function of the graph: it reads no process group and is unit-testable on
graphs traced under ``FakeTensorMode``. The report has one entry per collective: a match
when it or its wait moved, a note when both already sat at their bounds, a near miss when
its wait could not be found. Each entry gives the op, the issue and wait positions (node
indices in the graph) before and after, the compute nodes between issue and wait before and
after, and the FLOPs of the matmuls/convolutions between them when shapes are known.
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
    if node.op != "call_function" or _is_wait(node):
        return False
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


def _is_compute(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and not _is_c10d(node) and node.target is not operator.getitem


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except Exception:  # symbolic without hint
        return None


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


def _op_name(node: torch.fx.Node) -> str:
    return node.target.overloadpacket.__name__


def schedule_comms(graph: torch.fx.Graph) -> PassReport:
    """Reorder ``graph`` in place (collectives early, waits late) and report per collective."""
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

    # 1. Raise collectives, in program order: right after the last input, never above the
    #    previous collective or a barrier.
    prev: torch.fx.Node | None = None
    for c in colls:
        i = nodes.index(c)
        if _mutates(c):
            prev = c
            continue
        lo = max((nodes.index(a) for a in c.all_input_nodes), default=-1)
        if prev is not None:
            lo = max(lo, nodes.index(prev))
        for k in range(i - 1, lo, -1):
            if _is_barrier(nodes[k]) or nodes[k].op == "placeholder":
                lo = k
                break
        if lo + 1 < i:
            nodes.pop(i)
            nodes.insert(lo + 1, c)
        prev = c

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

    # Apply the order to the graph.
    if nodes != list(graph.nodes):
        anchor = nodes[0]
        for n in nodes[1:]:
            if anchor.next is not n:
                anchor.append(n)
            anchor = n
    graph.lint()

    # 3. Report.
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
        uses = [nodes.index(u) for u in waits[c].users]
        first_use[c] = min(uses) if uses else len(nodes)
        if (iss0, wait0) != (iss1, wait1):
            report.matches.append(Match("overlap", c.name, details))
        else:
            reason = "in-place collective, not moved" if _mutates(c) else "already at its bounds"
            report.notes.append(f"{c.name}: {reason} ({', '.join(f'{k}={v}' for k, v in details.items())})")
    ordered = [c for c in colls if c in first_use]
    by_use = sorted(ordered, key=lambda c: first_use[c])
    if by_use != ordered:
        report.notes.append(
            "collectives kept in program order " + ", ".join(c.name for c in ordered)
            + "; their results are first used in the order " + ", ".join(c.name for c in by_use)
        )
    return report


def comm_overlap_pass(gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassReport:
    """Registry entry point (stage ``"post_grad"``); see the module docstring."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    return schedule_comms(graph)
