"""``torch.vmap`` rules for the blaze ops: one call of the op per batch element, stacked.

Batched calls reach the ops through ``torch.func.vmap`` over code that calls them, and through
``torch.func.vmap`` over ``torch.autograd.grad``, which runs the backward op with a batched
``grad_y``. Without a rule torch raised "Batching rule not implemented for
blazec::moe_experts_backward". The kernels have no batch dimension, so the rule loops: B calls,
correct, and B times the cost of one.

``torch.autograd.grad(..., is_grads_batched=True)`` batches with torch's older vmap instead
(the "Batched" dispatch key), which cannot run an op that returns lists: the ops refuse it
there with an error that says what works instead. (Through a compiled model torch itself runs
no batched backward: ``torch.func.vmap`` over a compiled backward is refused by torch.)

The backward op runs with ``overwrite_preact=False`` in the loop: every element's call reads the
same saved ``preact``, which an overwrite by the first would clobber for the rest.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_OVERWRITE_PREACT = 16  # moe_experts_backward's argument index of overwrite_preact


def _element(arg: Any, dim: Any, b: int) -> Any:
    """Batch element ``b`` of one argument (``dim``: its batch dim, a list of them for a
    ``Tensor[]``, or None when it is not batched)."""
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [a if d is None else a.select(d, b) for a, d in zip(arg, dim)]
    return arg.select(dim, b)


def _stack(outs: list) -> tuple[Any, Any]:
    """The per-element outputs stacked along dim 0, and their ``out_dims``."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outs), 0
    parts = [_stack([o[i] for o in outs]) for i in range(len(first))]
    kind = list if isinstance(first, list) else tuple
    return kind(p[0] for p in parts), kind(p[1] for p in parts)


def _loop_rule(op: Callable, name: str, backward: bool = False) -> Callable:
    def rule(info, in_dims, *args, **kwargs):
        if info.batch_size == 0:
            raise ValueError(f"blazec::{name} under vmap: the batch is empty; the op has no batched kernel "
                             "and runs once per batch element")
        args = list(args)
        if backward:
            if len(args) > _OVERWRITE_PREACT:
                args[_OVERWRITE_PREACT] = False
            kwargs.pop("overwrite_preact", None)
        outs = [op(*(_element(a, d, b) for a, d in zip(args, in_dims)), **kwargs) for b in range(info.batch_size)]
        return _stack(outs)

    return rule


_LEGACY = ("blazec::{name}: torch.autograd.grad(..., is_grads_batched=True) is not supported through the blaze "
           "MoE ops (it batches with torch's legacy vmap, which cannot run an op that returns lists). Take one "
           "grad_outputs at a time (with retain_graph=True), or, where the ops are called without torch.compile, "
           "batch with torch.func.vmap(lambda g: torch.autograd.grad(out, inputs, g, retain_graph=True))(grads)")
_LIB = None


def _legacy_kernel(name: str) -> Callable:
    def refuse(*args, **kwargs):
        raise NotImplementedError(_LEGACY.format(name=name))

    return refuse


def register() -> None:
    global _LIB
    # torch's legacy batching ("Batched" dispatch key): is_grads_batched=True. Without a
    # kernel there, torch raised "Batching rule not implemented ... could not generate a
    # fallback", naming neither the cause nor a way out.
    _LIB = torch.library.Library("blazec", "IMPL")
    for name in ("moe_route", "moe_route_sink", "moe_experts", "moe_experts_backward"):
        _LIB.impl(name, _legacy_kernel(name), "Batched")
    ops = torch.ops.blazec
    torch.library.register_vmap("blazec::moe_route", _loop_rule(ops.moe_route.default, "moe_route"))
    torch.library.register_vmap("blazec::moe_route_sink", _loop_rule(ops.moe_route_sink.default, "moe_route_sink"))
    torch.library.register_vmap("blazec::moe_experts", _loop_rule(ops.moe_experts.default, "moe_experts"))
    torch.library.register_vmap("blazec::moe_experts_backward",
                                _loop_rule(ops.moe_experts_backward.default, "moe_experts_backward", backward=True))
