"""The one place where device kernels plug into the blaze ops.

Each op's registered implementation validates its arguments (in ``route.py`` / ``experts.py``)
and then calls ``get_impl(op, device_type)``. Without a registration that is the CPU reference
in ``reference.py``, which runs on any device. A Triton implementation for CUDA plugs in with

    from blazec.ops import register_impl
    register_impl("moe_experts", "cuda", triton_moe_experts_fwd)

from ``blazec.kernels`` (or anywhere), with exactly the signature of the reference function it
replaces (``reference.moe_route``, ``reference.moe_experts_fwd``, ``reference.moe_experts_bwd``)
and the same output shapes, dtypes and (contiguous) strides. Because validation stays in the op,
a kernel may assume validated inputs. The ops are opaque to torch.compile, so a registration
takes effect at the next call without recompiling.

We use this table rather than ``torch.library.register_kernel(op, "cuda")`` so that validation
and the fake/autograd registrations stay shared and a kernel is a plain function that tests can
call side by side with the reference.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

from blazec.ops import reference

OPS: dict[str, Callable] = {
    "moe_route": reference.moe_route,
    "moe_experts": reference.moe_experts_fwd,
    "moe_experts_backward": reference.moe_experts_bwd,
}

_IMPLS: dict[tuple[str, str], Callable] = {}


def register_impl(op: str, device_type: str, fn: Callable | None) -> None:
    """Use ``fn`` for ``op`` on ``device_type`` ("cuda", "cpu", ...); ``None`` unregisters."""
    if op not in OPS:
        raise ValueError(f"unknown blaze op {op!r}; expected one of {sorted(OPS)}")
    if fn is None:
        _IMPLS.pop((op, device_type), None)
    else:
        _IMPLS[(op, device_type)] = fn


# Device types whose kernels have been looked for (each is tried once per process).
_LAZY_TRIED: set[str] = set()


def _load_lazy_kernels(device_type: str) -> None:
    """On the first call for CUDA, register the Triton kernels of ``blazec.kernels``.

    Lazy so that CPU use never imports Triton, and so that ``TRITON_INTERPRET`` (read when the
    kernels are defined) is whatever it is at first use. A registration made before the first
    call wins over the kernels.

    Opt-in for now: ``BLAZEC_KERNELS=1`` turns them on. They are checked against the reference
    only under the Triton interpreter so far; until a GPU run has validated them, CUDA keeps
    the reference by default, because a kernel bug would silently change a model's numbers.
    ``blazec bench`` turns them on for its own rows.
    """
    _LAZY_TRIED.add(device_type)
    if device_type != "cuda" or os.environ.get("BLAZEC_KERNELS", "0") != "1":
        return
    try:
        from blazec.kernels.moe_experts import cuda_impls

        impls = cuda_impls()
    except Exception as e:  # noqa: BLE001 - no Triton, or a broken install: stay correct
        warnings.warn(f"blazec: Triton kernels unavailable ({type(e).__name__}: {e}); "
                      f"using the reference implementation on CUDA", stacklevel=3)
        return
    for op, fn in impls.items():
        _IMPLS.setdefault((op, device_type), fn)


def get_impl(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` on ``device_type``: a registered kernel or the reference."""
    if device_type not in _LAZY_TRIED:
        _load_lazy_kernels(device_type)
    return _IMPLS.get((op, device_type), OPS[op])
