"""Forward/backward partition of the joint graph, and the report of what forward saves.

The partitioner is PyTorch's min-cut rematerialization partitioner, with blaze's checkpoint
solver (``blazec.passes.checkpoint``) deciding which values it saves: with the
``memory_budget`` option the solver picks the cheapest plan within the budget, without it
torch's own min-cut choice is kept and the solver only reports on it. Whatever picks the
cut, this file reads the result the same way: the partitioned forward graph returns the user outputs
first (``num_fwd_outputs`` of them) and then the saved tensors and symbolic sizes, and the
backward graph takes those as inputs. So the saved set is exactly the forward graph's
outputs past ``num_fwd_outputs``, which makes the byte count device-independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from blazec.report import PartitionReport, SavedTensor


@dataclass
class CheckpointPartitionReport(PartitionReport):
    """A :class:`PartitionReport` with the checkpoint solver's plan (``None`` when the
    solver did not run, e.g. a graph with nothing to save, or ``checkpoint_error``)."""

    checkpoint: Any = None  # blazec.passes.checkpoint.CheckpointPlan
    checkpoint_error: str | None = None

    def lines(self) -> list[str]:
        out = super().lines()
        if self.checkpoint is not None:
            out += ["  " + line for line in self.checkpoint.lines()]
        if self.checkpoint_error:
            out.append(f"  checkpoint solver: {self.checkpoint_error}")
        return out

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["checkpoint"] = None if self.checkpoint is None else self.checkpoint.to_json()
        return d


def partition_joint(gm: torch.fx.GraphModule, joint_inputs, config, **kwargs: Any):
    """Split ``gm`` into forward and backward graphs. Returns ``(fw, bw, PartitionReport)``.

    The report is a :class:`CheckpointPartitionReport`; its ``checkpoint`` field holds the
    plan (solver, budget, saved tensors with their byte formulas, recomputed nodes with
    their cost, MoE choices).
    """
    from blazec.passes.checkpoint import install

    with install(config) as session:
        fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
    name = "min_cut_rematerialization_partition"
    if session.plan is not None and session.plan.budget_spec is not None:
        name += " + blaze checkpoint solver"
    rep = saved_tensor_report(fw, kwargs["num_fwd_outputs"], name)
    rep.num_bwd_nodes = len(bw.graph.nodes)
    rep.checkpoint = session.plan
    rep.checkpoint_error = session.error
    return fw, bw, rep


def saved_tensor_report(fw: torch.fx.GraphModule, num_fwd_outputs: int, partitioner: str) -> CheckpointPartitionReport:
    """List the tensors a partitioned forward graph saves for backward."""
    rep = CheckpointPartitionReport(partitioner=partitioner, num_fwd_nodes=len(fw.graph.nodes))
    from blazec.passes.checkpoint_model import alias_root

    out = fw.graph.find_nodes(op="output")[0]
    saved = [n for n in out.args[0][num_fwd_outputs:] if isinstance(n, torch.fx.Node)]
    tensors = [n for n in saved if isinstance(n.meta.get("val"), torch.Tensor)]
    rep.saved_symints = len(saved) - len(tensors)
    # Saved tensors are counted by storage, as the checkpoint plan counts them: a view of an
    # input or a constant keeps nothing new; the views of one base keep the base's bytes once,
    # counted on the base when it is saved, else on its first saved view.
    owner: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in sorted(tensors, key=lambda n: alias_root(n) is not n):  # bases before views
        owner.setdefault(alias_root(node), node)
    for node in tensors:
        s = _saved(node, node.meta["val"])
        root = alias_root(node)
        if not s.is_input and root is not node:
            if root.op in ("placeholder", "get_attr"):
                s.view_of = f"{'input' if root.op == 'placeholder' else 'constant'} {root.name}"
            elif owner[root] is not node:
                s.view_of = root.name
            else:  # the first saved view of a base that is not saved: it keeps all of the base
                base = _saved(root, root.meta["val"]) if isinstance(root.meta.get("val"), torch.Tensor) else s
                s.bytes, s.bytes_expr, s.keeps = base.bytes, base.bytes_expr, root.name
        rep.saved.append(s)
    return rep


def _saved(node: torch.fx.Node, val: torch.Tensor) -> SavedTensor:
    itemsize = val.element_size()
    dims = [_expr(s) for s in val.shape]
    # A product of sizes and the item size: sympy's own Mul already folds the integers and
    # gathers equal symbols into powers, which is all sympy.simplify did here, at 4-17 ms a call.
    bytes_expr = sympy.Mul(*dims, itemsize)
    hints = [_hint(s) for s in val.shape]
    return SavedTensor(
        name=node.name,
        shape=[str(d) for d in dims],
        dtype=str(val.dtype).replace("torch.", ""),
        bytes=math.prod(hints) * itemsize,
        bytes_expr=str(bytes_expr),
        is_input=node.op == "placeholder",
        estimated=bool(free_unbacked_symbols(bytes_expr)),
    )


def _expr(s: int | torch.SymInt) -> sympy.Expr:
    if isinstance(s, torch.SymInt):
        return s.node.expr
    return sympy.Integer(int(s))


def _hint(s: int | torch.SymInt) -> int:
    """The concrete size of a dimension at the example inputs (the size hint)."""
    if not isinstance(s, torch.SymInt):
        return int(s)
    node = s.node
    if node.hint is not None:
        return int(node.hint)
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint  # torch >= 2.13

        return int(optimization_hint(s, fallback=torch._inductor.config.unbacked_symint_fallback))
    except ImportError:
        pass
    try:
        return int(node.shape_env.size_hint(node.expr))
    except Exception:  # noqa: BLE001 - an unbacked size has no hint; use Inductor's fallback
        return int(torch._inductor.config.unbacked_symint_fallback)
