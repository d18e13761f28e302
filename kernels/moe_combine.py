r"""Deterministic per-token combines: y[t] = sum_j buf[pair_pos[t*k + j]] and d(routing weight).

``_combine_kernel``: each program owns a [BLOCK_T, BLOCK_D] tile of the output and adds the
token's k rows of the sorted-order buffer one slot at a time, in slot order, in fp32, exactly
as ``reference._slot_sum`` does; a dropped pair (pair_pos = -1) adds nothing. Each output
element is written once by one program: deterministic without atomics, and bitwise equal to
the reference given the same buffer. Used for y (forward) and dx (backward) when k > 1.
    FLOPs S*d adds. Bytes: S*d*b_buf (gathered rows) + T*k*8 (pair_pos) + T*d*b_out.

``_dtw_kernel``: d_topk_weights[p] = sum_n part[pair_pos[p], n] over the NT per-N-tile
partials that the backward GEMM wrote, in tile order (deterministic); 0 for dropped pairs.
    Bytes: S*NT*4 + S*8 + S*b_w.
"""

from __future__ import annotations

import triton
import triton.language as tl

from blazec.kernels._common import INTERPRET, cast, host_cdiv, next_pow2, rsum


@triton.jit
def _combine_kernel(
    buf_ptr,  # [P, D] per-pair rows in sorted order (read through pair_pos)
    pos_ptr,  # [T*K] int64 pair_pos: row of pair t*K + j in buf, or -1 if dropped
    out_ptr,  # [T, D] out: the slot-ordered fp32 sum, cast to out's dtype
    T, D, K,
    stride_buf, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = t < T
    cmask = c < D
    acc = tl.full([BLOCK_T, BLOCK_D], 0, dtype=tl.float32)
    t64 = t.to(tl.int64)
    for j in range(0, K):
        pos = tl.load(pos_ptr + t64 * K + j, mask=tmask, other=-1)
        m = (pos >= 0)[:, None] & cmask[None, :]
        v = tl.load(buf_ptr + pos[:, None] * stride_buf + c[None, :], mask=m, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t64[:, None] * stride_out + c[None, :], cast(acc, out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _dtw_kernel(
    part_ptr,  # [P, NT] fp32 partial d(routing weight) per sorted row and N tile
    pos_ptr,  # [P] int64 pair_pos
    out_ptr,  # [P] out: d_topk_weights flattened (T*K), routing-weight dtype
    P, NT,
    BLOCK_P: tl.constexpr, NT_PAD: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    pos = tl.load(pos_ptr + p, mask=pmask, other=-1)
    n = tl.arange(0, NT_PAD)
    m = (pos >= 0)[:, None] & (n < NT)[None, :]
    v = tl.load(part_ptr + pos[:, None] * NT + n[None, :], mask=m, other=0.0)
    tl.store(out_ptr + p, cast(rsum(v, 1), out_ptr.dtype.element_ty), mask=pmask)


def combine_blocks(D: int) -> tuple[int, int]:
    if INTERPRET:
        return 8, 16
    return 16, min(256, next_pow2(D))


def combine(buf, pair_pos, out, T: int, D: int, K: int) -> None:
    BT, BD = combine_blocks(D)
    grid = (host_cdiv(T, BT), host_cdiv(D, BD))
    _combine_kernel[grid](buf, pair_pos, out, T, D, K, buf.stride(0), out.stride(0),
                          BLOCK_T=BT, BLOCK_D=BD, **({} if INTERPRET else {"num_warps": 4}))


def dtw(part, pair_pos, out, P: int, NT: int) -> None:
    NT_PAD = next_pow2(NT)
    BP = 16 if INTERPRET else max(16, min(1024, 8192 // NT_PAD))
    _dtw_kernel[(host_cdiv(P, BP),)](part, pair_pos, out, P, NT, BLOCK_P=BP, NT_PAD=NT_PAD)
