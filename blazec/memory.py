"""Device-independent measurement of what autograd keeps for backward.

:func:`saved_for_backward` runs a forward under ``torch.autograd.graph.saved_tensors_hooks``
and records every tensor that autograd saves, eager or compiled (a compiled graph saves its
tensors through the same ``ctx.save_for_backward``). Tensors that share a storage are
counted once, and storages that belong to the model's parameters or buffers or to the
inputs are reported apart, since they are alive anyway: what a deep model multiplies by its
layer count is the activation bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class SavedBytes:
    activation_bytes: int  # new buffers kept alive for backward
    activation_tensors: int
    input_bytes: int  # parameters, buffers and inputs that backward also reads
    largest: list[tuple[tuple[int, ...], str, int]]  # (shape, dtype, bytes) of the biggest activations


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def saved_for_backward(fn: Callable[[], Any], keep_alive: list[torch.Tensor]) -> tuple[Any, SavedBytes]:
    """Run ``fn()`` and measure what autograd saved. ``keep_alive``: params, buffers, inputs."""
    alive = {_storage_key(t) for t in keep_alive if t.numel() > 0}
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() > 0 and not t.is_meta:
            seen.setdefault(_storage_key(t), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    act = {k: t for k, t in seen.items() if k not in alive}
    largest = sorted(
        ((tuple(t.shape), str(t.dtype).replace("torch.", ""), k[1]) for k, t in act.items()),
        key=lambda r: -r[2],
    )[:5]
    return out, SavedBytes(
        activation_bytes=sum(k[1] for k in act),
        activation_tensors=len(act),
        input_bytes=sum(k[1] for k in seen if k in alive),
        largest=largest,
    )


def model_tensors(model: torch.nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """The tensors that live anyway, whose storages a saved tensor does not add: parameters,
    buffers, plain tensor attributes of the modules (``self.scale = torch.randn(...)``, kept
    alive by the module as a buffer would be), and the inputs."""
    ts = list(model.parameters()) + list(model.buffers())
    ts += [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return ts + [x for x in inputs if isinstance(x, torch.Tensor)]
