r"""Grouped GEMMs over expert-sorted pairs (M = pairs): gather-GEMM-activation, down GEMM with
scaled output, and the backward GEMM through the down projection and the activation.

All three kernels tile the S = T*k sorted pairs per expert with ``tile_of`` (ragged groups,
empty experts get no tile, a static grid of cdiv(S, BLOCK_M) + E + 1 M tiles, no host sync)
and read expert weights through ``expert_ptr`` (3-D stacked with any strides, or a pointer
table). Notation: T tokens, k slots, S = T*k pairs (kept ones), d model dim, I expert dim,
n_in = 2I (gated) or I, b = bytes per element of x.

``_gemm1_kernel``: forward of the first projection, fused with the gather and the activation.
    For a tile of pairs of expert e, rows of x are loaded through ``sorted_pairs // k`` (no
    permuted copy of x), g = x Wg^T (+bg) and, gated, u = x Wu^T (+bu) accumulate in the same
    K loop, and the epilogue computes h = a(g)[*u] in registers ("hidden" mode: times the
    routing weight). It writes h (needed by the down GEMM) and, unless the op recomputes,
    preact = [g | u] for the backward; it zeroes preact's rows of dropped pairs. In recompute
    mode the backward runs it again with preact only (STORE_H off), into the dg | du buffer.
    GU_WIDE (``BLAZEC_GEMM1=wide``, or picked by timing under ``auto``): gate and up weights in
    one interleaved B tile, one dot per K step (docs/KERNELS.md, "GEMM 1 with one wide dot").
    B_DESC (``BLAZEC_GEMM1=tma``, or picked by timing): the two dots' weight tiles through
    tensor descriptors, TMA copies on Hopper (docs/KERNELS.md).
    FLOPs 2*S*d*n_in.  Bytes: S*d*b gathered x reads (L2 absorbs the k-fold reuse only
    partly; the floor is T*d*b) + E*n_in*d*b weights + S*I*b (h) [+ S*n_in*b (preact)].

``_rows_gemm_kernel``: a GEMM over rows already in sorted order, one or two (A, B) pairs.
    Forward down projection: c = (h Wd^T + bd) * w ("output") or (w h) Wd^T + bd ("hidden"),
    written to a [S, d] buffer that ``moe_combine`` reduces per token in slot order
    (deterministic, no atomics), or, when k == 1, straight into y[token] (the pair order is a
    permutation of tokens, so no buffer at all).
    FLOPs 2*S*I*d.  Bytes: S*I*b + E*d*I*b + S*d*b_c (+ the combine: S*d*b_c + T*d*b_out).
    Backward dX: dx_pair = dg Wg + du Wu, the two products accumulated in one tile, one K
    loop after the other (TWO; two dots on one accumulator in one loop serialize Hopper's
    MMAs), or one K loop over the joined [dg | du] and [Wg; Wu] (CAT, ``BLAZEC_DX=cat``, or
    picked by timing under ``auto``).
    FLOPs 2*S*n_in*d.  Bytes: S*n_in*b + E*n_in*d*b + S*d*b (buffer, k > 1) -> combine.
    PERSISTENT (``BLAZEC_ROWS=persistent``, or picked by timing under ``auto``; one K loop, so
    not TWO): a program per SM loops over the experts' tiles, its tile loop flattened with the
    K loop (docs/KERNELS.md).

``_act_kernel`` (``BLAZEC_GEMM1=split``, or picked by timing under ``auto``): GEMM 1 in three
    launches. Two ``_rows_gemm_kernel`` launches with A_GATHER write g = x[tok] Wg^T (+bg) and
    u = x Wu^T (+bu) into preact's two halves (each reads the gathered x rows again: S*d*b more traffic), then
    this elementwise pass computes h = a(g)[*u][*w] from them, the operations of GEMM 1's
    epilogue in the same order, and zeroes the dropped pairs' preact rows. The aim is the one
    the split dh path met: the GEMM tiles no longer hold the tensor cores idle through their
    epilogue. Only where preact is stored anyway (default mode's forward, recompute mode's
    backward, which needs no h); recompute mode's forward keeps ``_gemm1_kernel``. Not yet
    measured on a GPU. Bytes of the pass: S*n_in*b (preact in) + S*I*b (h out).

``_dh_epilogue_kernel`` (default, ``BLAZEC_DH=split``): the backward's dh step in two
    launches. ``_rows_gemm_kernel`` with A_GATHER computes q = gy[tok] Wd (rows of grad_y read
    through ``sorted_pairs // k``, no copy) rounded to x's dtype into hs; this elementwise pass
    then does ``_dh_kernel``'s epilogue below, the same operations in the same order, reading
    q from hs and writing w*h back into it, dg | du over preact. Its tiles' K loops no longer
    wait on the epilogue (on the H100: 2.88 + 1.16 ms where ``_dh_kernel`` took 6.06, at
    mixtral-like). Bytes of the pass: S*I*b (q in) + S*n_in*b (preact) + S*n_in*b (dg|du) +
    S*I*b (hs) + S*NT*4 (partials).

``_dh_kernel``: backward through the down GEMM and the activation, in one kernel
    (``BLAZEC_DH=fused``, and "output" mode with a down bias, whose <gy, bd> term rides in
    its K loop).
    q = gy[tok] Wd (gathered rows of grad_y), and, from preact (saved or recomputed) g, u:
        h = a(g)[*u],  dw_pair = <q, h> (+ <gy, bd> in "output" mode),  dh = w q,
        dg = dh [*u] * a'(g),  du = dh * a(g)
    (the full derivation is in blazec.ops.reference.moe_experts_bwd). d(routing weight) needs
    a reduction over all of I, so each N tile writes its partial to part[row, tile] and
    ``moe_combine`` sums the partials in a fixed order (deterministic). It also writes w*h,
    the second operand of the grouped dWd (``moe_wgrad``): dWd = gy^T (w h) in both modes, so
    dWd's K loop feeds both operands from shared memory to the tensor cores. The exception is
    "output" mode with a down bias (BD_TERM), whose dbd = sum_s w(s) gy[t(s)] needs the scaled
    rows: there it writes h and the routing weights in sorted order as fp32 (S*4 bytes), and
    dWd scales its gy rows by them. dg | du may be written over preact (see phase 2).
    Recompute mode does not fuse GEMM 1 into this kernel's K loop: three live accumulators
    held it to 64-wide tiles, and on the H100 run (docs/BENCHMARKS.md) that fused kernel took
    5.43 / 17.28 ms at olmoe- / mixtral-like, where GEMM 1 and this kernel took 2.27 + 1.84 /
    7.54 + 6.33 ms run one after the other, with the same buffers.
    FLOPs 2*S*d*I.  Bytes: S*d*b (gathered gy) + E*d*I*b + S*n_in*b (preact in) +
    S*n_in*b (dg|du out) + S*I*b (hs out).

Numerics follow the reference's dtypes: accumulation in fp32, each GEMM output rounded to x's
dtype where the reference's F.linear would round it, routing-weight products in the promoted
dtype (``C_DT``), fp32 inputs use tf32 only when torch's matmul precision allows it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from blazec.kernels._common import (
    INTERPRET, INTERPRET_CONFIG, act_bwd, act_fwd, cast, cdiv, device_fn, expert_ptr, gemm_config, mma,
    real_m_tiles, rnd, rsum, smem_pruner, swizzle, tile_of, variant_key,
)


# Small autotune sets; the key is the shape class (N, reduction dim, rows-per-expert class) and,
# implicitly, the dtypes of the tensor arguments.
GEMM1_CONFIGS = [
    gemm_config(128, 128, 64, 8, 3),
    gemm_config(128, 64, 64, 4, 4),
    gemm_config(64, 128, 64, 4, 4),
    gemm_config(128, 128, 32, 8, 4),
    gemm_config(64, 64, 64, 4, 4),
]
ROWS_CONFIGS = [
    gemm_config(128, 128, 64, 8, 3),
    gemm_config(128, 256, 64, 8, 3),
    gemm_config(128, 64, 64, 4, 4),
    gemm_config(64, 128, 64, 4, 4),
    gemm_config(64, 64, 64, 4, 4),
]
# _dh_kernel writes one d(routing weight) partial per row and N tile: the launcher sizes that
# buffer for the narrowest BLOCK_N here (DH_MIN_BLOCK_N) and zero-fills it, so the autotuner
# may pick any BLOCK_N (a wider tile leaves some partial columns at zero; DH_RESTORE puts the
# zeros back after the timed runs of other configs).
DH_CONFIGS = [
    gemm_config(128, 128, 64, 8, 3),
    gemm_config(128, 64, 64, 4, 4),
    gemm_config(64, 128, 64, 4, 4),
    gemm_config(128, 64, 64, 8, 4),
    gemm_config(64, 64, 64, 4, 4),
    gemm_config(128, 128, 32, 8, 4),
    gemm_config(64, 64, 32, 4, 4),
]
# The narrowest BLOCK_N _dh_kernel may run with here (the interpreter's fixed config, or a
# tuned one), which sizes its partial buffer.
DH_MIN_BLOCK_N = INTERPRET_CONFIG["BLOCK_N"] if INTERPRET else min(c.kwargs["BLOCK_N"] for c in DH_CONFIGS)
# What the autotuner must restore after each timed run (Triton's ``restore_value``): it runs
# every config on the launch's own arguments before the final launch. _dh_kernel may write
# dg | du over its preact input (in place: a second run would read dg | du as g | u), and a
# config with a narrower BLOCK_N leaves partials in columns a wider final config does not
# write, which the d(routing weight) sum would add. The clones exist only while a key is
# being tuned (at mixtral-like, preact's 0.875 GiB on the first backward). The other GEMM
# kernels only store their outputs, so a run repeats exactly.
DH_RESTORE = ["pre_ptr", "part_ptr"]


# ----------------------------------------------------------------------------------------------
# Forward GEMM 1: gather + gate/up + activation
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gemm1_kernel(
    x_ptr,  # [T, D] tokens; rows are gathered through the pair order, never copied
    tw_ptr,  # [T*K] routing weights, contiguous; read only in HIDDEN mode
    pairs_ptr,  # [P] int64 sorted_pairs (pair p = t*K + j), grouped by expert
    offs_ptr,  # [E+1] int64 expert_offsets
    wg_ptr, wg_tab,  # gate weights: stacked [E, I, D] base, or int64 table of E [I, D] pointers
    wu_ptr, wu_tab,  # up weights, same forms (GATED only)
    bg_ptr, bg_tab,  # gate bias: stacked [E, I] or table of [I] (HAS_BG only)
    bu_ptr, bu_tab,  # up bias (HAS_BU only)
    pre_ptr,  # [P, n_in] out: g | u in x dtype, sorted order (STORE_PRE); dropped rows zeroed
    h_ptr,  # [P, I] out: a(g)[*u][*w] in x dtype, sorted order (STORE_H)
    D, I, K, P, E, ROWS_CLASS,  # ROWS_CLASS only keys the autotuner
    stride_xt, stride_xd,
    s_wge, s_wgo, s_wgi, s_wue, s_wuo, s_wui,
    s_bge, s_bgo, s_bue, s_buo,
    stride_pre, stride_h,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
    HIDDEN: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr,
    WG_TAB: tl.constexpr, WU_TAB: tl.constexpr, BG_TAB: tl.constexpr, BU_TAB: tl.constexpr,
    GU_WIDE: tl.constexpr,  # GATED: one [BLOCK_K, 2*BLOCK_N] B tile, gate and up interleaved
    B_DESC: tl.constexpr,  # not GU_WIDE: weight tiles through tensor descriptors (TMA on Hopper)
    PREC: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    xdt = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = cdiv(P, BLOCK_M) + E + 1
    num_n = cdiv(I, BLOCK_N)
    pid_m, pid_n = swizzle(pid, num_m, num_n, GROUP_M)
    grp, row0, row_end = tile_of(offs_ptr, E, P, pid_m, BLOCK_M, G_PAD)
    if grp > E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    omask = rmask[:, None] & cmask[None, :]
    if grp == E:
        # Dropped pairs: their preact rows are defined as zero.
        if STORE_PRE:
            pre_ptrs = pre_ptr + rows[:, None].to(tl.int64) * stride_pre + cols[None, :]
            zero = tl.full([BLOCK_M, BLOCK_N], 0, dtype=xdt)
            tl.store(pre_ptrs, zero, mask=omask)
            if GATED:
                tl.store(pre_ptrs + I, zero, mask=omask)
        return

    pair = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    tok = pair // K
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + rk[None, :] * stride_xd
    wg_base = expert_ptr(wg_ptr, wg_tab, grp, s_wge, WG_TAB)
    if GATED:
        wu_base = expert_ptr(wu_ptr, wu_tab, grp, s_wue, WU_TAB)
    if GATED and GU_WIDE:
        # One dot per K step over B = [Wg^T | Wu^T] with the two interleaved by column (2j: gate
        # row j, 2j+1: up row j): an m64n256 wgmma where two dots issue two m64n128 ones that
        # each read the A tile from shared memory again (the launcher sets GU_WIDE only where Wg
        # and Wu have the same strides). Interleaved, g and u of one output column are adjacent
        # accumulator columns, so the reshape and split below pair them without moving data.
        cc = tl.arange(0, 2 * BLOCK_N)
        wcol = pid_n * BLOCK_N + cc // 2
        # Up's rows as offsets from gate's base, not a select between two pointers: through a
        # select Triton 3.9 loses the rows' alignment and no longer pipelines the load. The
        # launcher sets GU_WIDE only where every expert's Wg and Wu start 16-byte aligned, so
        # their distance is a multiple of 16 bytes.
        EL: tl.constexpr = wg_ptr.dtype.element_ty.primitive_bitwidth // 8
        up_off = tl.multiple_of((wu_base.to(tl.int64) - wg_base.to(tl.int64)) // EL, 16 // EL)
        w_row = wg_base + wcol * s_wgo + (cc % 2).to(tl.int64) * up_off
        b_ptrs = w_row[None, :] + rk[:, None] * s_wgi
        wmask = wcol < I
        acc = tl.full([BLOCK_M, 2 * BLOCK_N], 0, dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kmask = (k0 + rk) < D
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & wmask[None, :], other=0.0)
            acc = mma(a, b, acc, PREC)
            b_ptrs += BLOCK_K * s_wgi
            a_ptrs += BLOCK_K * stride_xd
        acc_g, acc_u = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    elif B_DESC:
        # Each expert's [I, D] weight as a tensor descriptor made in the program (its base is
        # this expert's): on Hopper the tiles arrive by TMA, one bulk copy per tile instead of
        # a 16-byte copy per thread and row, with no per-thread pointers. Tiles past I or D
        # read as zeros, as the masked loads' `other`. The launcher sets B_DESC only where
        # both weights are contiguous along D, their rows at least D apart with strides that
        # are multiples of 16 bytes, and every expert's base 16-byte aligned (what a
        # descriptor needs).
        n0 = pid_n * BLOCK_N
        dg = tl.make_tensor_descriptor(wg_base, shape=[I, D], strides=[s_wgo, 1], block_shape=[BLOCK_N, BLOCK_K])
        acc_g = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
        if GATED:
            du = tl.make_tensor_descriptor(wu_base, shape=[I, D], strides=[s_wuo, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
            acc_u = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kmask = (k0 + rk) < D
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc_g = mma(a, dg.load([n0, k0]).T, acc_g, PREC)
            if GATED:
                acc_u = mma(a, du.load([n0, k0]).T, acc_u, PREC)
            a_ptrs += BLOCK_K * stride_xd
    else:
        bg_ptrs = wg_base + cols[None, :] * s_wgo + rk[:, None] * s_wgi  # B[kk, n] = Wg[n, kk]
        acc_g = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
        if GATED:
            bu_ptrs = wu_base + cols[None, :] * s_wuo + rk[:, None] * s_wui
            acc_u = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kmask = (k0 + rk) < D
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(bg_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc_g = mma(a, b, acc_g, PREC)
            bg_ptrs += BLOCK_K * s_wgi
            if GATED:
                b2 = tl.load(bu_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc_u = mma(a, b2, acc_u, PREC)
                bu_ptrs += BLOCK_K * s_wui
            a_ptrs += BLOCK_K * stride_xd

    # Epilogue: bias, round to x's dtype (as F.linear's output), activation in fp32. Each
    # pre-activation is stored as soon as it exists, which shortens g's live range: the gated
    # bf16 128x128x32 variant stopped spilling (aot_compile --regs, sm_90, triton 3.9.0).
    if HAS_BG:
        bgb = expert_ptr(bg_ptr, bg_tab, grp, s_bge, BG_TAB)
        acc_g += tl.load(bgb + cols * s_bgo, mask=cmask, other=0.0).to(tl.float32)[None, :]
    g = rnd(acc_g, xdt)
    if STORE_PRE:
        pre_ptrs = pre_ptr + rows[:, None].to(tl.int64) * stride_pre + cols[None, :]
        tl.store(pre_ptrs, cast(g, xdt), mask=omask)
    if STORE_H:
        h = act_fwd(g, ACT)
    if GATED:
        if HAS_BU:
            bub = expert_ptr(bu_ptr, bu_tab, grp, s_bue, BU_TAB)
            acc_u += tl.load(bub + cols * s_buo, mask=cmask, other=0.0).to(tl.float32)[None, :]
        u = rnd(acc_u, xdt)
        if STORE_PRE:
            tl.store(pre_ptrs + I, cast(u, xdt), mask=omask)
        if STORE_H:
            h = rnd(h, xdt) * u
    if STORE_H:
        if HIDDEN:
            w = tl.load(tw_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
            h = rnd(h, xdt) * w[:, None]
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :]
        tl.store(h_ptrs, cast(h, h_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------
# Row GEMM: forward down projection (+bias, *w) and backward dX (dg Wg + du Wu)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_gemm_kernel(
    a1_ptr,  # [P, KD] A rows in sorted order (h forward; dg backward), unit column stride;
    #          A_GATHER: [T, KD], row t(s) = sorted_pairs[s] // K for sorted row s (grad_y)
    a2_ptr,  # [P, KD] second A (du backward), TWO only
    b1_ptr, b1_tab,  # expert matrix, stacked base or pointer table; B[kk, n] at kk*s_b1k + n*s_b1n
    b2_ptr, b2_tab,  # second expert matrix (TWO and CAT; s_b2e too, CAT reads its base only)
    bias_ptr, bias_tab,  # [E, N] stacked / table of [N] (HAS_BIAS only)
    tw_ptr,  # [T*K] routing weights, contiguous (SCALE only)
    pairs_ptr,  # [P] int64 sorted_pairs
    offs_ptr,  # [E+1] int64 expert_offsets
    out_ptr,  # out: [P, N] sorted-order buffer, or [T, N] indexed by token when DIRECT (K == 1)
    N, KD, K, P, E, ROWS_CLASS,
    s_a1, s_a2,
    s_b1e, s_b1k, s_b1n, s_b2e, s_b2k, s_b2n,
    s_biase, s_biasn,
    stride_out,
    TWO: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, DIRECT: tl.constexpr,
    A_GATHER: tl.constexpr,
    B1_TAB: tl.constexpr, B2_TAB: tl.constexpr, BIAS_TAB: tl.constexpr,
    C_DT: tl.constexpr,  # dtype the reference holds the row result in (rounding point)
    CAT: tl.constexpr,  # not TWO: the two products as one K loop over 2*KD (see _rows_tile)
    PERSISTENT: tl.constexpr,  # not TWO: NUM_PROGS programs loop over the tiles (see below)
    PREC: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGS,  # PERSISTENT: the grid's size (else unused)
):
    pid = tl.program_id(0)
    num_n = cdiv(N, BLOCK_N)
    if PERSISTENT:
        # One program per SM, each looping over the experts' tiles (never the dropped tail's,
        # nor the grid's padding), flattened with its K loop: the compiler pipelines the next
        # tile's first loads under this tile's epilogue, which a program per tile leaves
        # exposed (a short K loop, 16 steps at olmoe-like's down GEMM, makes that epilogue and
        # the pipeline's fill a large share of each tile).
        num_m = real_m_tiles(offs_ptr, E, P, BLOCK_M, G_PAD)
        for t in tl.range(pid, num_m * num_n, NUM_PROGS, flatten=True):
            pid_m, pid_n = swizzle(t, num_m, num_n, GROUP_M)
            grp, row0, row_end = tile_of(offs_ptr, E, P, pid_m, BLOCK_M, G_PAD)
            _rows_tile(a1_ptr, a2_ptr, b1_ptr, b1_tab, b2_ptr, b2_tab, bias_ptr, bias_tab, tw_ptr, pairs_ptr,
                       out_ptr, N, KD, K, s_a1, s_a2, s_b1e, s_b1k, s_b1n, s_b2e, s_b2k, s_b2n,
                       s_biase, s_biasn, stride_out, grp, row0, row_end, pid_n,
                       TWO, HAS_BIAS, SCALE, DIRECT, A_GATHER, B1_TAB, B2_TAB, BIAS_TAB, C_DT, CAT, PREC,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        num_m = cdiv(P, BLOCK_M) + E + 1
        pid_m, pid_n = swizzle(pid, num_m, num_n, GROUP_M)
        grp, row0, row_end = tile_of(offs_ptr, E, P, pid_m, BLOCK_M, G_PAD)
        if grp >= E:
            return  # no tile, or the dropped tail (never read by the combine)
        _rows_tile(a1_ptr, a2_ptr, b1_ptr, b1_tab, b2_ptr, b2_tab, bias_ptr, bias_tab, tw_ptr, pairs_ptr,
                   out_ptr, N, KD, K, s_a1, s_a2, s_b1e, s_b1k, s_b1n, s_b2e, s_b2k, s_b2n,
                   s_biase, s_biasn, stride_out, grp, row0, row_end, pid_n,
                   TWO, HAS_BIAS, SCALE, DIRECT, A_GATHER, B1_TAB, B2_TAB, BIAS_TAB, C_DT, CAT, PREC,
                   BLOCK_M, BLOCK_N, BLOCK_K)


@device_fn
def _rows_tile(a1_ptr, a2_ptr, b1_ptr, b1_tab, b2_ptr, b2_tab, bias_ptr, bias_tab, tw_ptr, pairs_ptr,
               out_ptr, N, KD, K, s_a1, s_a2, s_b1e, s_b1k, s_b1n, s_b2e, s_b2k, s_b2n,
               s_biase, s_biasn, stride_out, grp, row0, row_end, pid_n,
               TWO: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, DIRECT: tl.constexpr,
               A_GATHER: tl.constexpr, B1_TAB: tl.constexpr, B2_TAB: tl.constexpr, BIAS_TAB: tl.constexpr,
               C_DT: tl.constexpr, CAT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of ``_rows_gemm_kernel``: rows [row0, row_end) of expert
    ``grp`` (< E), columns of tile ``pid_n``.

    CAT (a gated dX, ``BLAZEC_DX=cat``): a1 B1 + a2 B2 as one product over K = 2*KD, where a2's
    columns follow a1's in the same rows (dg | du of one buffer) and B2 has B1's strides: the
    launcher checks both (``_cat_ok``). Row kk of the joined B is B1's row kk below KD and B2's
    row kk - KD above it, addressed from B1's base, so a K step may straddle the two. Where KD
    is a multiple of BLOCK_K the loop adds the same K steps, in the same order, as TWO's two
    loops (the same bits); it has one pipeline instead of two, and it can run PERSISTENT."""
    adt = a1_ptr.dtype.element_ty
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    rk = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)

    if A_GATHER:  # rows of a1 by token (dh = gy[t(s)] Wd); dropped pairs are past row_end
        a_rows = tl.load(pairs_ptr + rows, mask=rmask, other=0) // K
    else:
        a_rows = rows64
    a1_ptrs = a1_ptr + a_rows[:, None] * s_a1 + rk[None, :]
    b1_base = expert_ptr(b1_ptr, b1_tab, grp, s_b1e, B1_TAB)
    b1_ptrs = b1_base + rk[:, None] * s_b1k + cols[None, :] * s_b1n
    if TWO:
        a2_ptrs = a2_ptr + rows64[:, None] * s_a2 + rk[None, :]
        b2_base = expert_ptr(b2_ptr, b2_tab, grp, s_b2e, B2_TAB)
        b2_ptrs = b2_base + rk[:, None] * s_b2k + cols[None, :] * s_b2n
    acc = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
    if CAT:
        # B2's row r lies `jump` elements past B1's row KD + r. The launcher checks that both
        # bases are 16-byte aligned (as GU_WIDE's), so their distance keeps the loads' alignment.
        EL: tl.constexpr = b1_ptr.dtype.element_ty.primitive_bitwidth // 8
        b2_base = expert_ptr(b2_ptr, b2_tab, grp, s_b2e, B2_TAB)
        jump = (tl.multiple_of((b2_base.to(tl.int64) - b1_base.to(tl.int64)) // EL, 16 // EL)
                - tl.cast(KD, tl.int64) * s_b1k)  # int64: I times a row stride may pass 2^31
        b_cols = b1_base + cols[None, :] * s_b1n
        for k0 in range(0, 2 * KD, BLOCK_K):
            kk = k0 + rk
            kmask = kk < 2 * KD
            a = tl.load(a1_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b_rows = kk.to(tl.int64) * s_b1k + (kk >= KD).to(tl.int64) * jump
            b = tl.load(b_cols + b_rows[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = mma(a, b, acc, PREC)
            a1_ptrs += BLOCK_K
    else:
        for k0 in range(0, KD, BLOCK_K):
            kmask = (k0 + rk) < KD
            a = tl.load(a1_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b1_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = mma(a, b, acc, PREC)
            a1_ptrs += BLOCK_K
            b1_ptrs += BLOCK_K * s_b1k
    if TWO:
        # A second loop, not a second dot in the first: two chained wgmmas on one accumulator
        # in one loop made every iteration wait for both to finish (warp_group_dot_wait
        # pendings = 0: no MMA in flight across iterations; TTGIR, sm_90, triton 3.9.0).
        for k0 in range(0, KD, BLOCK_K):
            kmask = (k0 + rk) < KD
            a = tl.load(a2_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b2_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = mma(a, b, acc, PREC)
            a2_ptrs += BLOCK_K
            b2_ptrs += BLOCK_K * s_b2k

    if HAS_BIAS:
        bb = expert_ptr(bias_ptr, bias_tab, grp, s_biase, BIAS_TAB)
        acc += tl.load(bb + cols * s_biasn, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = rnd(acc, adt)  # the GEMM's output dtype, as F.linear
    if SCALE:
        pair = tl.load(pairs_ptr + rows, mask=rmask, other=0)
        w = tl.load(tw_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    val = cast(acc, C_DT)
    if DIRECT:
        dst = tl.load(pairs_ptr + rows, mask=rmask, other=0)  # K == 1: pair id == token id
    else:
        dst = rows64
    out_ptrs = out_ptr + dst[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, cast(val, out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Backward through the down GEMM and the activation (optional recompute of GEMM 1)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dh_kernel(
    gy_ptr,  # [T, D] grad of y; rows gathered by token
    tw_ptr,  # [T*K] routing weights, contiguous
    pairs_ptr,  # [P] int64 sorted_pairs
    offs_ptr,  # [E+1] int64 expert_offsets
    wd_ptr, wd_tab,  # down weights: stacked [E, D, I] / table of [D, I]; B[kk, n] = Wd[kk, n]
    bd_ptr, bd_tab,  # down bias [E, D] / table (BD_TERM: the <gy, bd> part of d(weight))
    pre_ptr,  # [P, n_in] g | u: saved by the forward, or recomputed by _gemm1_kernel
    dgu_ptr,  # [P, n_in] out: dg | du in x dtype (may be pre_ptr itself, see phase 2)
    hs_ptr,  # [P, I] out: w*h in x dtype, the R operand of dWd (h when SCALE_ROWS)
    part_ptr,  # [P, NT] fp32 out: partial d(routing weight) of each sorted row per N tile
    ws_ptr,  # [P] fp32 out (SCALE_ROWS only): routing weight of each sorted row, for dWd's scaling
    gys_ptr,  # [T] fp32 (GY_SCALE only): the power of two that brings row t of gy into x's range
    D, I, K, P, E, NT, ROWS_CLASS,
    stride_gyt, stride_gyd,
    s_wde, s_wdo, s_wdi, s_bde, s_bdo,
    stride_pre, stride_dgu, stride_hs,
    ACT: tl.constexpr, GATED: tl.constexpr, BD_TERM: tl.constexpr,
    SCALE_ROWS: tl.constexpr,  # hs gets h, and dWd scales gy's rows by ws (BD_TERM implies it)
    WD_TAB: tl.constexpr, BD_TAB: tl.constexpr,
    PREC: tl.constexpr, G_PAD: tl.constexpr,
    GY_SCALE: tl.constexpr,  # gy wider than x: rows scaled into x's range, q kept in fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    xdt = wd_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_m = cdiv(P, BLOCK_M) + E + 1
    num_n = cdiv(I, BLOCK_N)
    pid_m, pid_n = swizzle(pid, num_m, num_n, GROUP_M)
    grp, row0, row_end = tile_of(offs_ptr, E, P, pid_m, BLOCK_M, G_PAD)
    if grp >= E:
        return  # dropped pairs get no gradient; their rows are never read
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    omask = rmask[:, None] & cmask[None, :]
    rk = tl.arange(0, BLOCK_K)
    pair = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    tok = pair // K

    if SCALE_ROWS:
        if pid_n == 0:  # the routing weights in sorted order, for dWd's scaled rows and dbd
            # (before the K loop: no register is held through it, and the epilogue has none)
            tl.store(ws_ptr + rows64, tl.load(tw_ptr + pair, mask=rmask, other=0.0).to(tl.float32), mask=rmask)

    gy_ptrs = gy_ptr + tok[:, None] * stride_gyt + rk[None, :] * stride_gyd
    wd_base = expert_ptr(wd_ptr, wd_tab, grp, s_wde, WD_TAB)
    wd_ptrs = wd_base + rk[:, None] * s_wdo + cols[None, :] * s_wdi
    acc_q = tl.full([BLOCK_M, BLOCK_N], 0, dtype=tl.float32)
    if BD_TERM:
        bd_base = expert_ptr(bd_ptr, bd_tab, grp, s_bde, BD_TAB)
        gb = tl.full([BLOCK_M], 0, dtype=tl.float32)
    if GY_SCALE:
        gys = tl.load(gys_ptr + tok, mask=rmask, other=1.0)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        kmask = kk < D
        gyt = tl.load(gy_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wdt = tl.load(wd_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if GY_SCALE:
            acc_q = mma(cast(gyt.to(tl.float32) * gys[:, None], xdt), wdt, acc_q, PREC)
        else:
            acc_q = mma(cast(gyt, xdt), wdt, acc_q, PREC)
        if BD_TERM:
            bdv = tl.load(bd_base + kk * s_bdo, mask=kmask, other=0.0).to(tl.float32)
            gb += rsum(gyt.to(tl.float32) * bdv[None, :], 1)
        gy_ptrs += BLOCK_K * stride_gyd
        wd_ptrs += BLOCK_K * s_wdo

    pre_ptrs = pre_ptr + rows64[:, None] * stride_pre + cols[None, :]
    w = tl.load(tw_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
    if GY_SCALE:
        q = acc_q / gys[:, None]
    else:
        q = rnd(acc_q, xdt)

    # Phase 1: h, this tile's share of d(routing weight) = <q, h> (+ <gy, bd> once, from the
    # first N tile), and the dWd operand w*h (h when SCALE_ROWS).
    g = tl.load(pre_ptrs, mask=omask, other=0.0).to(tl.float32)
    h = rnd(act_fwd(g, ACT), xdt)
    if GATED:
        u = tl.load(pre_ptrs + I, mask=omask, other=0.0).to(tl.float32)
        h = rnd(h * u, xdt)
    dwp = rsum(tl.where(omask, q * h, 0.0), 1)
    if BD_TERM:
        dwp += tl.where(pid_n == 0, gb, 0.0)
    tl.store(part_ptr + rows64 * NT + pid_n, dwp, mask=rmask)
    if not SCALE_ROWS:
        h = h * w[:, None]
    tl.store(hs_ptr + rows64[:, None] * stride_hs + cols[None, :], cast(h, xdt), mask=omask)

    # Phase 2: dh = w q, du = dh a(g), dg = dh [u] a'(g). g and u are read again (L2 hits)
    # instead of being kept live through phase 1: q, g, u, a(g) and h at once spill registers
    # at 128-wide tiles (measured with tests/kernels/aot_compile.py --regs).
    # This tile reads every element of pre it uses before it stores dg | du over the same
    # (row, column) positions, and no other tile reads them, so dgu_ptr may be pre_ptr: the
    # backward writes dg | du over the saved preact when the autograd graph is not kept, and
    # over the recomputed one always.
    dh = rnd(q * w[:, None], xdt)
    dgu_ptrs = dgu_ptr + rows64[:, None] * stride_dgu + cols[None, :]
    if GATED:
        u = tl.load(pre_ptrs + I, mask=omask, other=0.0).to(tl.float32)
        dhu = rnd(dh * u, xdt)
        g = tl.load(pre_ptrs, mask=omask, other=0.0).to(tl.float32)
        tl.store(dgu_ptrs + I, cast(dh * rnd(act_fwd(g, ACT), xdt), xdt), mask=omask)
        dg = act_bwd(dhu, g, ACT)
    else:
        g = tl.load(pre_ptrs, mask=omask, other=0.0).to(tl.float32)
        dg = act_bwd(dh, g, ACT)
    tl.store(dgu_ptrs, cast(dg, xdt), mask=omask)


@triton.jit
def _dh_epilogue_kernel(
    hs_ptr,  # [P, I] in: q = gy[tok] Wd in x dtype (the split dh GEMM's output); out: w*h
    #          (h when SCALE_ROWS)
    tw_ptr,  # [T*K] routing weights, contiguous
    pairs_ptr,  # [P] int64 sorted_pairs
    offs_ptr,  # [E+1] int64 expert_offsets (offs[E]: the kept pairs)
    pre_ptr,  # [P, n_in] g | u
    dgu_ptr,  # [P, n_in] out: dg | du (may be pre_ptr itself)
    part_ptr,  # [P, NT] fp32 out: partial d(routing weight) of each sorted row per column block
    ws_ptr,  # [P] fp32 out (SCALE_ROWS only): routing weight of each sorted row, for dWd's scaling
    I, E, NT,
    stride_pre, stride_dgu, stride_hs,
    ACT: tl.constexpr, GATED: tl.constexpr, SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """_dh_kernel's epilogue as an elementwise pass over the split path's q (see the module
    docstring): the same operations in the same order, on the same rounded q. Each element of
    q, g and u is read before this program stores hs, dg and du at the same position, and no
    other program touches it, so hs_ptr holds q in and w*h (or h) out, and dgu_ptr may be pre_ptr."""
    xdt = hs_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(offs_ptr + E)  # dropped pairs get no gradient
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = rmask[:, None] & (cols < I)[None, :]
    pair = tl.load(pairs_ptr + rows, mask=rmask, other=0)
    w = tl.load(tw_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
    hs_ptrs = hs_ptr + rows64[:, None] * stride_hs + cols[None, :]
    pre_ptrs = pre_ptr + rows64[:, None] * stride_pre + cols[None, :]
    q = tl.load(hs_ptrs, mask=omask, other=0.0).to(tl.float32)
    g = tl.load(pre_ptrs, mask=omask, other=0.0).to(tl.float32)
    ag = rnd(act_fwd(g, ACT), xdt)
    h = ag
    if GATED:
        u = tl.load(pre_ptrs + I, mask=omask, other=0.0).to(tl.float32)
        h = rnd(h * u, xdt)
    tl.store(part_ptr + rows64 * NT + pid_n, rsum(tl.where(omask, q * h, 0.0), 1), mask=rmask)
    if SCALE_ROWS:
        if pid_n == 0:
            tl.store(ws_ptr + rows64, w, mask=rmask)
        tl.store(hs_ptrs, cast(h, xdt), mask=omask)
    else:
        tl.store(hs_ptrs, cast(h * w[:, None], xdt), mask=omask)
    dh = rnd(q * w[:, None], xdt)
    dgu_ptrs = dgu_ptr + rows64[:, None] * stride_dgu + cols[None, :]
    if GATED:
        tl.store(dgu_ptrs + I, cast(dh * ag, xdt), mask=omask)
        dg = act_bwd(rnd(dh * u, xdt), g, ACT)
    else:
        dg = act_bwd(dh, g, ACT)
    tl.store(dgu_ptrs, cast(dg, xdt), mask=omask)


@triton.jit
def _act_kernel(
    pre_ptr,  # [P, n_in] g | u in x dtype (the split GEMM 1's two products); dropped rows out: 0
    h_ptr,  # [P, I] out: h = a(g) [* u] [* w]
    tw_ptr,  # [T*K] routing weights, contiguous (HIDDEN only)
    pairs_ptr,  # [P] int64 sorted_pairs
    offs_ptr,  # [E+1] int64 expert_offsets (offs[E]: the kept pairs)
    I, E, P,
    stride_pre, stride_h,
    ACT: tl.constexpr, GATED: tl.constexpr, HIDDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """_gemm1_kernel's epilogue as an elementwise pass over the split GEMM 1's g | u (already
    biased and rounded to x's dtype by the row GEMM): the same operations in the same order.
    It also zeroes the preact rows of dropped pairs, as _gemm1_kernel does."""
    xdt = pre_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kept = tl.load(offs_ptr + E)
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = (cols < I)[None, :]
    pre_ptrs = pre_ptr + rows64[:, None] * stride_pre + cols[None, :]
    if pid_m * BLOCK_M + BLOCK_M > kept:  # a tile reaching the dropped tail
        dropped = ((rows >= kept) & (rows < P))[:, None] & cmask
        zero = tl.full([BLOCK_M, BLOCK_N], 0, dtype=xdt)
        tl.store(pre_ptrs, zero, mask=dropped)
        if GATED:
            tl.store(pre_ptrs + I, zero, mask=dropped)
    rmask = rows < kept
    omask = rmask[:, None] & cmask
    g = tl.load(pre_ptrs, mask=omask, other=0.0).to(tl.float32)
    h = act_fwd(g, ACT)
    if GATED:
        u = tl.load(pre_ptrs + I, mask=omask, other=0.0).to(tl.float32)
        h = rnd(h, xdt) * u
    if HIDDEN:
        pair = tl.load(pairs_ptr + rows, mask=rmask, other=0)
        w = tl.load(tw_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
        h = rnd(h, xdt) * w[:, None]
    tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], cast(h, h_ptr.dtype.element_ty), mask=omask)


# The split paths' elementwise tiles (no autotuning, which would rerun them in place).
ELEMENTWISE_CONFIG = ({"BLOCK_M": 16, "BLOCK_N": 16} if INTERPRET else
                      {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4})

if INTERPRET:
    gemm1_tuned = rows_gemm_tuned = dh_tuned = None
else:
    gemm1_tuned = triton.autotune(
        GEMM1_CONFIGS, key=["D", "I", "ROWS_CLASS", *variant_key(_gemm1_kernel)],
        prune_configs_by={"early_config_prune": smem_pruner("x_ptr", lambda a: (1, 2 if a["GATED"] else 1))},
    )(_gemm1_kernel)
    rows_gemm_tuned = triton.autotune(
        # B's strides are in the key: the split GEMM 1 (Wg, Wu read transposed) and the split
        # dh GEMM (Wd) can share N, KD, every constexpr and every dtype, and need not share a pick
        ROWS_CONFIGS, key=["N", "KD", "ROWS_CLASS", "s_b1k", "s_b1n", *variant_key(_rows_gemm_kernel)],
        # TWO runs its GEMMs one loop after the other, and the second reuses the first's buffers
        # PERSISTENT also keeps the output tile's layout-conversion buffer (compiled for sm_90:
        # 131072 B at bf16 128x128x64, 3 stages, against 98304 B per tile launch)
        prune_configs_by={"early_config_prune": smem_pruner(
            "a1_ptr", lambda a: (1, 1),
            epilogue=lambda a: a["out_ptr"].element_size() if a["PERSISTENT"] else 0)},
    )(_rows_gemm_kernel)
    dh_tuned = triton.autotune(
        DH_CONFIGS, key=["D", "I", "ROWS_CLASS", *variant_key(_dh_kernel)],
        prune_configs_by={"early_config_prune": smem_pruner("wd_ptr", lambda a: (1, 1))},
        restore_value=DH_RESTORE,
    )(_dh_kernel)
