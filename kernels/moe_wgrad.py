r"""Grouped weight gradients: dW_e = L_e^T R_e over each expert's sorted pairs (ragged K).

One kernel serves the three expert weight gradients of the backward (notation of
``blazec.ops.reference.moe_experts_bwd``; rows s of expert e are its sorted pairs, t(s) the
token of pair s, w(s) its routing weight):

    dWg_e[i, c] = sum_s dg[s, i] * x[t(s), c]        L = dg (sorted rows),  R = x (gathered)
    dWu_e[i, c] = sum_s du[s, i] * x[t(s), c]        L = du (sorted rows),  R = x (gathered)
    dWd_e[c, i] = sum_s gy[t(s), c] * (w h)[s, i]    L = gy (gathered),     R = w h (sorted)
                = sum_s (w gy)[s, c] * h[s, i]       "output" mode with a down bias: L = w gy
                                                     (gy rows scaled in the K loop), R = h

and the bias gradients are the row sums of L over the same pairs (db_e = sum_s L[s, :]), taken
by the programs of the first N tile: "output" mode's dbd = sum_s w(s) gy[t(s)] needs the scaled
L, "hidden" mode's dbd = sum_s gy[t(s)] the plain one. The grid is (out tiles x in tiles, E): program (tile, e)
loops over expert e's pairs in BLOCK_K chunks, so an empty expert writes zeros and every
output element is written once (deterministic, no atomics, no split-K reduction).

DUAL computes dWg and dWu in one program from one gathered x tile per K step: two L tiles (dg
and du), one R tile, two accumulators, as GEMM 1's forward does with Wg and Wu. That reads the
gathered x rows, the operand the k-fold reuse makes expensive, half as often; per K step a
128x128 tile does 4*128*128*BK FLOPs on (2*128 + 128)*BK loaded elements instead of 2*128*128*BK
on 2*128*BK. The launcher picks DUAL or two single launches by timing both once per shape
class (``moe_experts._dw_gate_up`` with ``_common.pick_fastest``).

Floor per call, over all experts (S pairs, M x N the weight shape, b bytes/element):
FLOPs 2*S*M*N. Bytes: S*M*b (L) + S*N*b (R, gathered rows of x or gy hit L2 k times) +
E*M*N*b (dW) [+ E*M*b (db)]. Summed over the three weights: 2*S*d*n_in + 2*S*I*d FLOPs.

Load balance: a program's work is its expert's pair count, so a skewed routing (all tokens
on one expert) leaves the other experts' programs idle. Split-K over pairs with a fixed-order
reduction would fix that; it is not done yet (see docs/KERNELS.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from blazec.kernels._common import (
    INTERPRET, cast, cdiv, gemm_config, mma, rsum, smem_pruner, swizzle, variant_key,
)

# Five stages: the K loop gathers its rows through indices it loads itself, and Triton's
# pipeliner keeps num_stages - 2 tile buffers for such a loop. With 3 or 4 stages every
# iteration waited for all its copies (``ttg.async_wait {num = 0}`` in the loop: nothing
# prefetched ahead); with 5 it keeps 3 buffers and waits for the oldest only (TTGIR for sm_90,
# triton 3.9.0, 2026-11-26; tests/kernels/aot_compile.py fails a GEMM loop that drains).
WGRAD_CONFIGS = [
    gemm_config(128, 128, 64, 8, 5),
    gemm_config(128, 256, 64, 8, 5),
    gemm_config(256, 128, 64, 8, 5),
    gemm_config(128, 64, 64, 4, 5),
    gemm_config(64, 128, 64, 4, 5),
    gemm_config(128, 128, 32, 8, 5),
    gemm_config(64, 64, 32, 4, 5),
]


@triton.jit
def _wgrad_kernel(
    l_ptr,  # L rows: [P, M] sorted-order buffer, or [T, M] token rows when L_GATHER
    r_ptr,  # R rows: [P, N] sorted-order buffer, or [T, N] token rows when R_GATHER
    ws_ptr,  # [P] fp32 routing weights in sorted order (L_SCALE only; written by _dh_kernel)
    pairs_ptr,  # [P] int64 sorted_pairs
    offs_ptr,  # [E+1] int64 expert_offsets
    dw_ptr,  # out: stacked [E, M, N] gradient (the op returns every gradient stacked)
    db_ptr,  # out: stacked [E, M] bias gradient (HAS_DB only)
    l2_ptr,  # DUAL: a second L, same shape and strides as L, sorted order
    dw2_ptr, db2_ptr,  # DUAL: its gradient and bias gradient (HAS_DB2), with dw's / db's strides
    M, N, K, ROWS_CLASS,
    s_lr, s_lc, s_rr, s_rc,  # row / column strides of L and R
    s_dwe, s_dwm, s_dwn, s_dbe, s_dbm,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, L_SCALE: tl.constexpr, HAS_DB: tl.constexpr,
    DUAL: tl.constexpr, HAS_DB2: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rdt = r_ptr.dtype.element_ty  # the GEMM input dtype (x's dtype)
    pid = tl.program_id(0)
    e = tl.program_id(1)
    # Grouped tile order: the programs resident at once share GROUP_M row blocks of L and a
    # few column blocks of R, so the gathered R rows are re-read from DRAM fewer times.
    pid_m, pid_n = swizzle(pid, cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), GROUP_M)
    s0 = tl.load(offs_ptr + e)
    s1 = tl.load(offs_ptr + e + 1)
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = mm < M
    nmask = nn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
    if HAS_DB:
        dbacc = tl.full([BLOCK_M], 0, dtype=tl.float32)
    if DUAL:
        acc2 = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
        if HAS_DB2:
            dbacc2 = tl.full([BLOCK_M], 0, dtype=tl.float32)
    for k0 in range(s0, s1, BLOCK_K):
        rows = k0 + rk
        kmask = rows < s1
        if L_GATHER or R_GATHER:
            pair = tl.load(pairs_ptr + rows, mask=kmask, other=0)
        if L_GATHER:
            lrow = pair // K
        else:
            lrow = rows.to(tl.int64)
        if R_GATHER:
            rrow = pair // K
        else:
            rrow = rows.to(tl.int64)
        lt = tl.load(l_ptr + lrow[None, :] * s_lr + mm[:, None] * s_lc,
                     mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K] = L^T
        if L_SCALE:
            # In sorted order, not gathered through pair: a contiguous fp32 load that Triton
            # pipelines with the tiles. tw[pair] (2-byte gathered elements) was too narrow to
            # pipeline: a synchronous load, its latency exposed every iteration.
            w = tl.load(ws_ptr + rows, mask=kmask, other=0.0)
            lt = lt.to(tl.float32) * w[None, :]
        lt = cast(lt, rdt)
        rt = tl.load(r_ptr + rrow[:, None] * s_rr + nn[None, :] * s_rc,
                     mask=kmask[:, None] & nmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = mma(lt, rt, acc, PREC)
        if HAS_DB:
            dbacc += rsum(lt.to(tl.float32), 1)
        if DUAL:  # the same R tile, a second L (its row indices are L's: sorted order)
            lt2 = tl.load(l2_ptr + lrow[None, :] * s_lr + mm[:, None] * s_lc,
                          mask=mmask[:, None] & kmask[None, :], other=0.0)
            acc2 = mma(cast(lt2, rdt), rt, acc2, PREC)
            if HAS_DB2:
                dbacc2 += rsum(lt2.to(tl.float32), 1)
    e64 = e.to(tl.int64)
    dw_off = e64 * s_dwe + mm[:, None] * s_dwm + nn[None, :] * s_dwn
    wmask = mmask[:, None] & nmask[None, :]
    tl.store(dw_ptr + dw_off, cast(acc, dw_ptr.dtype.element_ty), mask=wmask)
    if DUAL:
        tl.store(dw2_ptr + dw_off, cast(acc2, dw2_ptr.dtype.element_ty), mask=wmask)
    if pid_n == 0:
        db_off = e64 * s_dbe + mm * s_dbm
        if HAS_DB:
            tl.store(db_ptr + db_off, cast(dbacc, db_ptr.dtype.element_ty), mask=mmask)
        if HAS_DB2:
            tl.store(db2_ptr + db_off, cast(dbacc2, db2_ptr.dtype.element_ty), mask=mmask)


FMA_STAGES = 3
_fit_smem = smem_pruner("r_ptr", lambda a: (2 if a["DUAL"] else 1, 1), indirect=True)


def _prune(configs, named_args, **kwargs):
    """Shared-memory pruning, after capping DUAL (two accumulators) at 128x128 tiles, and fp32
    without tf32 at ``FMA_STAGES`` and at 128x128 tiles: its dot runs on the FMA units from
    registers, and with 5 stages the pipelined operands spill (7.7 KB of stack per thread at
    128x128x32, sm_90, triton 3.9.0; none at 3 stages)."""
    args = {**named_args, **kwargs}
    if args["DUAL"]:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    if args["PREC"] == "ieee" and args["r_ptr"].element_size() == 4:
        configs = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=min(c.num_stages, FMA_STAGES))
                   for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    return _fit_smem(configs, named_args, **kwargs)


wgrad_tuned = None if INTERPRET else triton.autotune(
    WGRAD_CONFIGS, key=["M", "N", "ROWS_CLASS", *variant_key(_wgrad_kernel)],
    prune_configs_by={"early_config_prune": _prune},
)(_wgrad_kernel)
