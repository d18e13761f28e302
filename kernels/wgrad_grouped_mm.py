r"""Opt-in: the expert weight gradients through torch's grouped GEMM on sorted row copies.

``BLAZEC_WGRAD=grouped_mm`` makes the Triton backward compute dWg, dWu and dWd with
``torch._grouped_mm`` (CUTLASS on Hopper) instead of ``_wgrad_kernel``::

    dWg = grouped_mm(dg^T, xs),  dWu = grouped_mm(du^T, xs),  dWd = grouped_mm(gys^T, w h)

with ``xs = x[t(s)]`` and ``gys = grad_y[t(s)]`` sorted copies of the gathered rows (``[S, d]``
each, alive only around their products) and the K dimension ragged by ``expert_offsets``.

Why: on the H100 run of docs/BENCHMARKS.md, ``_wgrad_kernel`` reached 330-385 TFLOP/s on these
products, reading its gathered operand through per-row indices, while CUTLASS ran the same
products of the sort + grouped_mm baseline at 640-750 TFLOP/s at mixtral-like, on rows that
baseline had sorted first. The copies cost 2·S·d·b bytes of traffic each (about 0.1 ms at
mixtral-like, 0.35 ms at olmoe-like on an H100's bandwidth) and S·d·b bytes of memory while
alive. **Not yet measured on a GPU**: the default stays ``triton`` until a GPU run shows the
trade (``scripts/gpu_check.sh`` runs both).

Used only where it is known to be right; elsewhere the Triton kernel runs, with a warning
naming the reason when the variable asked for grouped_mm:
- a CUDA device of compute capability 9.0 (Hopper). On Blackwell, torch's grouped GEMM has
  returned nonzero weight gradients for empty groups (pytorch/pytorch#172439, open);
- bf16 (the dtype torch's grouped GEMM supports);
- d and I multiples of 8, so every operand's strides are 16-byte multiples;
- no bias on that weight (the Triton kernel fuses the bias gradient's row sums), and for dWd
  no "output"-mode down bias (there dWd needs the w-scaled grad_y rows).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

MODES = ("triton", "grouped_mm")
_WARNED: set[str] = set()


def requested() -> bool:
    """``BLAZEC_WGRAD``: ``triton`` (default) or ``grouped_mm``; anything else is an error."""
    value = os.environ.get("BLAZEC_WGRAD", "triton").strip()
    if value not in MODES:
        raise ValueError(f"BLAZEC_WGRAD must be one of {MODES} (default triton), got {value!r}")
    return value == "grouped_mm"


def unsupported(x: Tensor, d: int, I: int) -> Optional[str]:
    """Why grouped_mm cannot compute this call's weight gradients, or None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.device.type != "cuda":
        return f"x is on {x.device.type}, not CUDA"
    cc = torch.cuda.get_device_capability(x.device)
    if cc != (9, 0):
        return f"compute capability {cc[0]}.{cc[1]} is not 9.0 (Hopper)"
    if x.dtype != torch.bfloat16:
        return f"dtype {x.dtype} is not bfloat16"
    if d % 8 or I % 8:
        return f"d={d} and I={I} must be multiples of 8 (16-byte strides)"
    return None


def use(x: Tensor, d: int, I: int) -> bool:
    """Whether this backward computes its weight gradients with grouped_mm (warns once per
    reason when ``BLAZEC_WGRAD=grouped_mm`` asked for it and it cannot)."""
    if not requested():
        return False
    why = unsupported(x, d, I)
    if why is None:
        return True
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"BLAZEC_WGRAD=grouped_mm: using the Triton weight-gradient kernel: {why}",
                      stacklevel=2)
    return False


def sorted_rows(src: Tensor, sorted_pairs: Tensor, k: int) -> Tensor:
    """``src[t(s)]`` for every sorted pair s: the rows of its token, in sorted order. Dropped
    pairs (-1, after every kept one) read row 0; grouped_mm ignores rows past the last offset."""
    return src.index_select(0, torch.div(sorted_pairs.clamp_min(0), k, rounding_mode="floor"))


def weight_grad(lhs_rows: Tensor, rhs_rows: Tensor, expert_offsets: Tensor) -> Tensor:
    """``[E, M, N]``: dW_e = lhs_e^T rhs_e over each expert's rows (``lhs_rows`` [S, M],
    ``rhs_rows`` [S, N], both in sorted order; column slices of wider buffers are fine)."""
    offs = expert_offsets[1:].to(torch.int32)
    return grouped_mm(lhs_rows.t(), rhs_rows, offs)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    # Module-level so that benchmarks/peak_memory.py can stub it like the Triton launches.
    return torch._grouped_mm(a, b, offs=offs)
