"""Small helpers for matching torch-level Dynamo graphs.

Dynamo graphs spell one operation several ways: ``torch.where(m)`` or ``m.nonzero(as_tuple=True)``,
``F.linear`` as ``torch._C._nn.linear``, ``x.view`` or ``x.reshape``, ``t[0]`` as
``operator.getitem``. These helpers let matchers ask "is this a linear?" or "strip the
casts" without caring about the spelling, and read arguments by name whether they were
passed by position or keyword.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

Node = torch.fx.Node


class NoMatch(Exception):
    """Raised by matchers with the reason a site is not the pattern; becomes a near miss."""


# torch 2.11's Dynamo records ``tensor == x`` as ``call_method("__eq__")`` where later versions
# record ``call_function(operator.eq)``; the comparisons are matched under either spelling.
_DUNDER = {operator.eq: "__eq__", operator.ne: "__ne__", operator.lt: "__lt__", operator.le: "__le__",
           operator.gt: "__gt__", operator.ge: "__ge__"}


def is_fn(node: Any, *targets: Any) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return is_method(node, *(_DUNDER[t] for t in targets if t in _DUNDER))
    return node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, passed by position ``index`` or by keyword.

    For call_method nodes, position 0 is ``self``.
    """
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The example value (a FakeTensor) Dynamo recorded for a node, or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same_shape(a: Any, b: Any) -> bool:
    """Shapes equal as expressions. Symbolic sizes are compared without guarding on them."""
    sa = a if isinstance(a, tuple) else shape(a)
    sb = b if isinstance(b, tuple) else shape(b)
    return sa is not None and sb is not None and tuple(map(str, sa)) == tuple(map(str, sb))


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


LINEAR = (torch._C._nn.linear, F.linear)
MATMUL = (operator.matmul, torch.matmul, torch.mm)
MUL = (operator.mul, torch.mul)


def is_linear(node: Any) -> bool:
    return is_fn(node, *LINEAR)


def is_mul(node: Any) -> bool:
    return is_fn(node, *MUL) or is_method(node, "mul")


def is_getitem(node: Any) -> bool:
    return is_fn(node, operator.getitem)


def strip_casts(node: Any) -> tuple[Any, list[Node]]:
    """Follow ``.to(dtype)``, ``.type_as``, ``.float()`` style casts down to their input."""
    casts = []
    while isinstance(node, Node) and (
        is_method(node, "to", "float", "half", "bfloat16", "double", "type_as", "contiguous")
        and _cast_only(node)
    ):
        casts.append(node)
        node = node.args[0]
    return node, casts


def _cast_only(node: Node) -> bool:
    """A ``.to`` that only changes dtype (not device, not copy semantics that matter)."""
    if node.target != "to":
        return True
    rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dtype", "device")]
    return all(isinstance(a, torch.dtype) for a in rest)


def follow_first_args(node: Any, found, limit: int = 10) -> Node | None:
    """Walk ``args[0]`` from ``node`` until ``found(n)`` holds; that node, or None within ``limit`` steps.

    Expert MLPs and their wrappers chain their data through the first argument, so this finds
    an expert's input (a split chunk, a dispatch einsum) from its output.
    """
    for _ in range(limit):
        if not isinstance(node, Node) or not node.args:
            return None
        if found(node):
            return node
        node = node.args[0]
    return None


def where_loc(node: Node) -> str:
    """A short ``file:line`` for a node, from the stack trace Dynamo recorded."""
    st = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in st.strip().splitlines() if l.strip().startswith("File ")]
    if not lines:
        return node.name
    last = lines[-1]  # File "/path/x.py", line 52, in forward
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path.rsplit('/', 1)[-1]}:{line}"
    except IndexError:
        return node.name


def module_path(node: Node) -> str:
    """The qualified name of the innermost nn.Module whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path, _cls = list(stack.values())[-1]
    return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    # Dynamo names look like "L['self'].experts" or "L['self']._modules['experts']".
    p = path.replace("L['self']", "").replace("._modules['", ".").replace("']", "")
    p = p.replace("['", ".")
    return p.lstrip(".") or "<root>"
