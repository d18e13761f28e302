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


def kernels_requested() -> bool:
    """``BLAZEC_KERNELS``: unset or ``1`` uses the Triton kernels on CUDA, ``0`` the reference."""
    value = os.environ.get("BLAZEC_KERNELS", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"BLAZEC_KERNELS must be 0 (reference ops on CUDA) or 1 (Triton kernels, "
                         f"the default), got {value!r}")
    return value == "1"


# Device types whose kernels have been looked for (each is tried once per process).
_LAZY_TRIED: set[str] = set()


def _load_lazy_kernels(device_type: str) -> None:
    """On the first call for CUDA, register the Triton kernels of ``blazec.kernels``.

    Lazy so that CPU use never imports Triton, and so that ``TRITON_INTERPRET`` (read when the
    kernels are defined) is whatever it is at first use. A registration made before the first
    call wins over the kernels.

    On by default (``BLAZEC_KERNELS=0`` keeps the reference on CUDA): on an H100 they matched
    the loop model's numbers at both shapes of BASELINES.md and passed the kernel tests, and
    ran 3.4x faster than the reference ops at olmoe-like (6% slower at mixtral-like; the
    measurements are in docs/BENCHMARKS.md).
    """
    wanted = device_type == "cuda" and kernels_requested()  # a bad value raises, every call
    _LAZY_TRIED.add(device_type)
    if not wanted:
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
