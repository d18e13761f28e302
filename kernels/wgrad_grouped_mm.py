r"""The expert weight gradients through torch's grouped GEMM on sorted row copies.

Where it applies (below), the Triton backward computes dWg, dWu and dWd with
``torch._grouped_mm`` (CUTLASS on Hopper) instead of ``_wgrad_kernel``::

    dWg = grouped_mm(dg^T, xs),  dWu = grouped_mm(du^T, xs),  dWd = grouped_mm(gys^T, w h)

with ``xs = x[t(s)]`` and ``gys = grad_y[t(s)]`` sorted copies of the gathered rows (``[S, d]``
each, alive only around their products) and the K dimension ragged by ``expert_offsets``.

Why: ``_wgrad_kernel`` reads its gathered operand through per-row indices and reached 330-385
TFLOP/s on these products on an H100, where CUTLASS runs them at 640-750 on sorted rows. The
copies cost 2·S·d·b bytes of traffic each and S·d·b bytes of memory while alive. Measured on
the H100 (docs/BENCHMARKS.md, 2026-11-27, one process, same weights): blazec on the loop model
went from 41.82 to 35.15 ms per step at mixtral-like and from 14.51 to 14.16 ms at olmoe-like;
its peak rose from 3.251 to 3.376 GiB and from 1.444 to 1.944 GiB (the xs copy).

``BLAZEC_WGRAD``: ``auto`` (default: grouped_mm where it applies, else the Triton kernel),
``grouped_mm`` (the same, with a warning naming the reason where it cannot), or ``triton``
(always the Triton kernel: no row copies, the lower peak). grouped_mm applies with:
- a CUDA device of compute capability 9.0 (Hopper). On Blackwell, torch's grouped GEMM has
  returned nonzero weight gradients for empty groups (pytorch/pytorch#172439, open);
- bf16 (the dtype torch's grouped GEMM supports);
- d and I multiples of 8, so every operand's strides are 16-byte multiples;
- no bias on that weight (the Triton kernel fuses the bias gradient's row sums), and for dWd
  no "output"-mode down bias (there dWd needs the w-scaled grad_y rows).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from blazec.kernels._common import env_choice

MODES = ("auto", "triton", "grouped_mm")
_WARNED: set[str] = set()
# Which weight-gradient paths backward calls took ("grouped_mm", "triton"), for blazec bench's
# notes; the bench clears it before each row.
TAKEN: set[str] = set()


def mode() -> str:
    """``BLAZEC_WGRAD``: ``auto`` (default), ``triton`` or ``grouped_mm``; anything else is an
    error."""
    return env_choice("BLAZEC_WGRAD", MODES, "auto")


def unsupported(x: Tensor, d: int, I: int) -> Optional[str]:
    """Why grouped_mm cannot compute this call's weight gradients, or None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.device.type != "cuda":
        return f"x is on {x.device.type}, not CUDA"
    cc = _capability(x.device)
    if cc != (9, 0):
        return f"compute capability {cc[0]}.{cc[1]} is not 9.0 (Hopper)"
    if x.dtype != torch.bfloat16:
        return f"dtype {x.dtype} is not bfloat16"
    if d % 8 or I % 8:
        return f"d={d} and I={I} must be multiples of 8 (16-byte strides)"
    return None


def _capability(device: torch.device) -> tuple[int, int]:
    # asked on every backward: cached per device (the query is not free on the host path)
    key = str(device)
    cc = _CAPABILITY.get(key)
    if cc is None:
        cc = _CAPABILITY[key] = tuple(torch.cuda.get_device_capability(device))
    return cc


_CAPABILITY: dict[str, tuple[int, int]] = {}


def use(x: Tensor, d: int, I: int) -> bool:
    """Whether this backward computes its (bias-free) weight gradients with grouped_mm; warns
    once per reason when ``BLAZEC_WGRAD=grouped_mm`` asked for it and it cannot."""
    m = mode()
    why = "BLAZEC_WGRAD=triton" if m == "triton" else unsupported(x, d, I)
    if why is not None and m == "grouped_mm" and why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"BLAZEC_WGRAD=grouped_mm: using the Triton weight-gradient kernel: {why}",
                      stacklevel=2)
    return why is None


def sorted_rows(src: Tensor, sorted_pairs: Tensor, k: int) -> Tensor:
    """``src[t(s)]`` for every sorted pair s: the rows of its token, in sorted order. Dropped
    pairs (-1, after every kept one) read row 0; grouped_mm ignores rows past the last offset."""
    return src.index_select(0, torch.div(sorted_pairs.clamp_min(0), k, rounding_mode="floor"))


def weight_grad(lhs_rows: Tensor, rhs_rows: Tensor, expert_offsets: Tensor) -> Tensor:
    """``[E, M, N]``: dW_e = lhs_e^T rhs_e over each expert's rows (``lhs_rows`` [S, M],
    ``rhs_rows`` [S, N], both in sorted order; column slices of wider buffers are fine)."""
    offs = expert_offsets[1:].to(torch.int32)
    TAKEN.add("grouped_mm")
    return grouped_mm(lhs_rows.t(), rhs_rows, offs)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    # Module-level so that benchmarks/peak_memory.py can stub it like the Triton launches.
    return torch._grouped_mm(a, b, offs=offs)
