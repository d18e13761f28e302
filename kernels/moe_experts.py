r"""Launchers of the blaze MoE expert op on Triton: forward, backward, and registration.

``moe_experts_fwd`` and ``moe_experts_bwd`` have exactly the signatures, output shapes, dtypes
and (contiguous) strides of ``blazec.ops.reference.moe_experts_fwd`` / ``moe_experts_bwd``, so
``register()`` can plug them (and ``moe_route.moe_route``) into ``blazec.ops`` for CUDA. The
ops keep validating their arguments; these functions assume validated inputs.

Forward (S = T*k pairs; buffers in brackets are freed when the call returns):
    1. _gemm1_kernel:      h [S, I], preact [S, n_in] (unless recompute)   gather+GEMM+act
       (gate and up as two dots, their weights by pointers or by tensor descriptors, B_DESC, or
       as one interleaved wide dot, GU_WIDE; or, where preact is
       stored, _rows_gemm_kernel x 2 with A_GATHER into preact's halves, then _act_kernel for
       h: BLAZEC_GEMM1, by default the fastest by timing, ``gemm1_mode``)
    2. _rows_gemm_kernel:  [c: S x d]  (k == 1: y directly)                 GEMM+bias+*w
       (a program per tile or persistent: BLAZEC_ROWS, by default timed, ``rows_mode``)
    3. _combine_kernel:    y [T, d], slot-ordered fp32 sum                  (k > 1)
Backward:
    0. _gemm1_kernel:      (recompute only) preact into the dg|du buffer (split: the two row GEMMs)
    1. _rows_gemm_kernel:  (A_GATHER) q = gy[t(s)] Wd into [hs: S x I]      (BLAZEC_DH=split)
       _dh_epilogue_kernel: [dg|du: S x n_in] (over preact), w*h into hs (h, and w into
                           [ws: S], in fp16 "output" mode), [part: S x NT]
       or _dh_kernel:      both in one kernel (BLAZEC_DH=fused; "output" mode with a down bias;
                           a grad_y whose dtype is not x's)
    2. _rows_gemm_kernel:  [dx rows: S x d]  (k == 1: dx directly)          dg Wg + du Wu
       (a K loop per product, or one over both: BLAZEC_DX, by default timed, ``dx_mode``)
    3. _combine_kernel:    dx [T, d];  _dtw_kernel: d_topk_weights [T, k]
    4. dWg, dWu, dWd:      torch._grouped_mm on sorted row copies of x and gy (Hopper, bf16, no
                           bias; wgrad_grouped_mm), else _wgrad_kernel x 3 (+ the bias
                           gradients), per expert, empty experts -> 0, dWg and dWu in one DUAL
                           launch when timing says it is faster

Cases the kernels do not cover fall back to the reference (still correct, on any device):
fp64 inputs or routing weights, no pairs, a zero-sized dim, per-expert weight lists whose
tensors do not share strides, and 2**20 experts or more.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import triton
from torch import Tensor

from blazec.kernels import moe_combine, moe_grouped_gemm as gg, moe_wgrad, wgrad_grouped_mm
from blazec.kernels._common import (
    BASE_CODE,
    INTERPRET,
    IMPL_CHOICES,
    IMPL_DISAGREED,
    INTERPRET_CONFIG,
    KERNEL_DTYPES,
    MAX_BLOCK,
    TORCH_TO_TL,
    WeightOperand,
    dot_precision,
    dummy_operand,
    empty,
    env_choice,
    grad_buffer,
    host_cdiv,
    launch,
    next_pow2,
    pick_fastest,
    rows_class,
    weight_operand,
)
from blazec.kernels.moe_route import moe_route
from blazec.ops import reference
from blazec.ops.activations import GATED_ACTIVATIONS, is_gated

# ----------------------------------------------------------------------------------------------
# Operand preparation
# ----------------------------------------------------------------------------------------------


class _Fallback(Exception):
    pass


_WARNED: set[str] = set()


INT32_SPAN = 2**31


def expert_span(ws: Sequence[Tensor], nd: int) -> int:
    """The largest element offset within one expert's weight (its last ``nd`` dims)."""
    return max(sum((n - 1) * abs(st) for n, st in zip(w.shape[-nd:], w.stride()[-nd:]) if n > 0) for w in ws)


def _fallback(reason: str) -> None:
    if reason not in _WARNED and not INTERPRET:
        _WARNED.add(reason)
        warnings.warn(f"blazec kernels: {reason}; using the reference implementation", stacklevel=3)
    raise _Fallback(reason)


class _Operands:
    """Everything both directions need, derived once per call."""

    def __init__(self, x, tw, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
                 b_gate, b_up, b_down, activation):
        if x.dtype not in KERNEL_DTYPES or tw.dtype not in KERNEL_DTYPES:
            _fallback(f"dtype {x.dtype}/{tw.dtype} is not bf16, fp16 or fp32")
        self.T, self.d = x.shape
        self.k = tw.shape[1]
        self.P = self.T * self.k
        self.E = expert_offsets.shape[0] - 1
        self.gated = is_gated(activation)
        self.I = reference.expert_weight(w_gate, 0).shape[0]
        if self.P == 0 or self.d == 0 or self.I == 0:
            _fallback("empty problem")
        if self.P * max(self.d, 2 * self.I) >= 2**62 or self.P >= 2**31 - 1:
            _fallback("problem too large for int32 pair indices")
        self.act = BASE_CODE[GATED_ACTIVATIONS.get(activation, activation)]
        self.x = x
        self.tw = tw.contiguous()
        self.sp = sorted_pairs.contiguous()
        self.eo = expert_offsets.contiguous()
        self.pp = pair_pos.contiguous()
        self.n_in = 2 * self.I if self.gated else self.I
        self.xdt = x.dtype
        self.p_dt = torch.promote_types(x.dtype, tw.dtype)
        self.prec = dot_precision(x.dtype)
        self.G_PAD = max(16, next_pow2(self.E + 1))
        if self.G_PAD > MAX_BLOCK:  # the tile schedule holds every expert's offset in one block
            _fallback(f"{self.E} experts: more than 2**20 - 1, past Triton's largest block")
        self.rows_class = rows_class(self.P, self.E)

        def op(ws: Sequence[Tensor], nd: int, needed: bool) -> WeightOperand:
            if not needed or len(ws) == 0:
                return dummy_operand(x, nd)
            o = weight_operand(ws, nd)
            if o is None:
                _fallback("a per-expert weight list has tensors with different strides")
            # ws[:1]: a list's tensors share their shape (checked by the op) and strides (by
            # weight_operand); over 192 tensors the walk cost 0.1-0.2 ms of host time per call
            if expert_span(ws[:1], nd) >= INT32_SPAN:
                _fallback("an expert's weight spans 2**31 elements or more within its strides (a view of a buffer "
                          "whose expert dim is not the outermost); the kernels offset within an expert in int32")
            return o

        self.wg = op(w_gate, 2, True)
        self.wu = op(w_up, 2, self.gated)
        self.wd = op(w_down, 2, True)
        self.bg = op(b_gate, 1, True)
        self.bu = op(b_up, 1, self.gated)
        self.bd = op(b_down, 1, True)
        self.has_bg, self.has_bu, self.has_bd = bool(b_gate), bool(b_up) and self.gated, bool(b_down)

    def m_grid(self, n: int) -> Callable:
        P, E = self.P, self.E
        return lambda META: ((host_cdiv(P, META["BLOCK_M"]) + E + 1) * host_cdiv(n, META["BLOCK_N"]),)

    def elementwise_grid(self, META) -> tuple[int, int]:
        """The elementwise passes' grid: [S, I] in BLOCK_M x BLOCK_N tiles."""
        return host_cdiv(self.P, META["BLOCK_M"]), host_cdiv(self.I, META["BLOCK_N"])


def _tl(dt: torch.dtype):
    return TORCH_TO_TL[dt]


def _rows_gemm(o: "_Operands", a1: Tensor, s_a: int, w: WeightOperand, wt: bool, out: Tensor, N: int, KD: int,
               c_dt: torch.dtype, *, two: Optional[tuple[Tensor, WeightOperand]] = None,
               bias: Optional[WeightOperand] = None, scale: bool = False, direct: bool = False,
               gather: bool = False) -> None:
    """One ``_rows_gemm_kernel`` launch: out = a1 B (+ a2 B2, ``two``) (+ bias) (* w) over each
    expert's sorted rows. B = W^T with ``wt`` (W_e [N, KD] = [out, in], as F.linear holds it:
    forward GEMMs), else W (W_e [KD, N]: backward GEMMs through a weight). ``s_a``: the row
    stride of a1 (and a2); ``gather``: a1's rows by token (A_GATHER); ``direct``: k == 1, rows
    straight to their token; ``c_dt``: the dtype the row result is held in."""
    k_dim, n_dim = (2, 1) if wt else (1, 2)
    a2, w2 = two if two is not None else (a1, w)
    b = bias if bias is not None else o.bd  # a placeholder the kernel leaves unread
    args = dict(
        a1_ptr=a1, a2_ptr=a2, b1_ptr=w.ptr, b1_tab=w.tab, b2_ptr=w2.ptr, b2_tab=w2.tab,
        bias_ptr=b.ptr, bias_tab=b.tab, tw_ptr=o.tw, pairs_ptr=o.sp, offs_ptr=o.eo, out_ptr=out,
        N=N, KD=KD, K=o.k, P=o.P, E=o.E, ROWS_CLASS=o.rows_class,
        s_a1=s_a, s_a2=s_a,
        s_b1e=w.strides[0], s_b1k=w.strides[k_dim], s_b1n=w.strides[n_dim],
        s_b2e=w2.strides[0] if two else 0, s_b2k=w2.strides[k_dim] if two else 0,
        s_b2n=w2.strides[n_dim] if two else 0,
        s_biase=b.strides[0] if bias else 0, s_biasn=b.strides[1] if bias else 0,
        stride_out=out.stride(0),
        TWO=two is not None, HAS_BIAS=bias is not None, SCALE=scale, DIRECT=direct, A_GATHER=gather,
        B1_TAB=w.table, B2_TAB=w2.table if two else 0, BIAS_TAB=b.table if bias else 0, C_DT=_tl(c_dt),
        CAT=False, PERSISTENT=False, PREC=o.prec, G_PAD=o.G_PAD, NUM_PROGS=1,
    )

    def run(persistent: bool, cat: bool = False) -> None:
        a = {**args, "TWO": False, "CAT": True} if cat else args
        if not persistent:
            launch(gg._rows_gemm_kernel, gg.rows_gemm_tuned, o.m_grid(N), a, INTERPRET_CONFIG)
            return
        progs = _num_programs(out.device)
        launch(gg._rows_gemm_kernel, gg.rows_gemm_tuned, lambda META: (progs,),
               {**a, "PERSISTENT": True, "NUM_PROGS": progs}, INTERPRET_CONFIG)

    rows = rows_mode()
    if two is None:
        site = "row GEMM path"
        paths = {p: (lambda p=p: run(p == "persistent")) for p in ("tiles", "persistent") if rows in ("auto", p)}
    else:
        site = "dX path"
        paths = _two_paths(o, KD, rows, run)
    choice = next(iter(paths))  # the default: the first path offered
    if len(paths) > 1:
        key = (N, KD, o.rows_class, o.E, wt, gather, scale, direct, bias is not None, w.table, b.table if bias else 0,
               w.strides[1:], s_a, out.stride(), str(a1.dtype), str(c_dt), str(out.dtype), o.prec, tuple(paths),
               str(out.device))
        # k == 1 writes kept tokens' rows into a zeroed y; other launches write every row they define
        choice = pick_fastest(site, key, paths, choice, [(out, 0.0 if direct else float("nan"))])
    paths[choice]()


def _two_paths(o: "_Operands", KD: int, rows: str, run: Callable) -> dict[str, Callable]:
    """The launch paths of a gated dX (``dg Wg + du Wu``), default first: ``two`` (TWO: a K loop
    per product, a program per tile), and where ``_cat_ok``, ``cat`` (CAT: one K loop over
    both) as tiles or persistent, as ``BLAZEC_DX`` and ``BLAZEC_ROWS`` allow."""
    mode = dx_mode()
    paths = {"two": lambda: run(False)} if mode in ("auto", "two") else {}
    # auto offers cat only where it can add the K steps as two does (the same bits)
    if mode in ("auto", "cat") and _cat_ok(o) and (mode == "cat" or KD % CAT_K_MULTIPLE == 0):
        if rows in ("auto", "tiles"):
            paths["cat"] = lambda: run(False, cat=True)
        if rows in ("auto", "persistent"):
            paths["cat-persistent"] = lambda: run(True, cat=True)
    return paths or {"two": lambda: run(False)}


ROWS_MODES = ("auto", "tiles", "persistent")
# Programs of a persistent launch under the interpreter: a few, so that each loops over tiles.
INTERPRET_PROGRAMS = 3


def rows_mode() -> str:
    """``BLAZEC_ROWS``: how ``_rows_gemm_kernel`` launches where it has one product (forward
    down GEMM, split dh GEMM, split GEMM 1, a plain activation's dX, and a gated dX run CAT; its
    two-loop TWO launch is always ``tiles``): ``tiles`` (a program per output tile), ``persistent`` (a program
    per SM looping over the tiles, PERSISTENT) or ``auto`` (default: the faster of the two by
    timing, once per launch site and shape class on a GPU with autotuning on, among those that
    compute the same bits as ``tiles``; ``tiles`` elsewhere); docs/KERNELS.md. Anything else is
    an error."""
    return env_choice("BLAZEC_ROWS", ROWS_MODES, "auto")


_SM_COUNT: dict[int, int] = {}


def _num_programs(device: torch.device) -> int:
    """A persistent launch's grid: the device's SM count (cached), or INTERPRET_PROGRAMS."""
    if INTERPRET or device.type != "cuda":
        return INTERPRET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(index)
    if n is None:
        n = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


DX_MODES = ("auto", "two", "cat")
# auto offers CAT where the reduction dim I is a multiple of every K step the row GEMM may run
# with, so that no K step straddles dg and du (the summation order of TWO's two loops); the
# shared-memory pruner only ever halves a config's K step, which keeps it a divisor
CAT_K_MULTIPLE = (INTERPRET_CONFIG["BLOCK_K"] if INTERPRET
                  else math.lcm(*(c.kwargs["BLOCK_K"] for c in gg.ROWS_CONFIGS)))


def dx_mode() -> str:
    """``BLAZEC_DX``: how a gated activation's dX GEMM (dx rows = dg Wg + du Wu) launches:
    ``two`` (TWO: one K loop per product, a program per tile), ``cat`` (CAT: one K loop over
    the joined [dg | du] and [Wg; Wu], a program per tile or persistent as ``BLAZEC_ROWS``
    says, where ``_cat_ok``) or ``auto`` (default: the fastest of those that apply by timing,
    once per shape class on a GPU with autotuning on, among those that compute the same bits as
    ``two``; ``two`` elsewhere). A forced ``cat`` that does not apply runs ``two``;
    docs/KERNELS.md. Anything else is an error."""
    return env_choice("BLAZEC_DX", DX_MODES, "auto")


GEMM1_MODES = ("auto", "fused", "split", "wide", "tma")


def gemm1_mode() -> str:
    """``BLAZEC_GEMM1``: ``fused`` (``_gemm1_kernel`` with a gate and an up dot per K step),
    ``split`` (two row GEMMs into preact's halves, then ``_act_kernel``, where preact is
    stored), ``wide`` (``_gemm1_kernel`` with one interleaved gate|up B tile per K step,
    GU_WIDE, where ``_wide_ok``: gated, both weights 16-byte aligned, with the same strides,
    contiguous along d), ``tma`` (``_gemm1_kernel``'s two dots with the weight tiles through
    tensor descriptors, B_DESC, where ``_desc_ok``) or ``auto`` (default: the fastest of those
    that apply, by timing once per shape class on a GPU with autotuning on, among those that
    compute the same bits as ``fused``; ``fused`` elsewhere). A forced ``split``, ``wide`` or
    ``tma`` that does not apply runs ``fused``; docs/KERNELS.md. Anything else is an error."""
    return env_choice("BLAZEC_GEMM1", GEMM1_MODES, "auto")


def _gemm1(o: "_Operands", pre: Tensor, h: Tensor, store_pre: bool, store_h: bool, hidden: bool) -> None:
    """GEMM 1 (gather, gate and up, activation): writes preact = g | u into ``pre`` when
    ``store_pre`` and the activated rows into ``h`` when ``store_h``; an output it does not
    write may be any tensor of x's dtype. ``gemm1_mode`` picks the launch."""
    mode = gemm1_mode()
    run = {"fused": lambda: _gemm1_launch(o, pre, h, store_pre, store_h, hidden, wide=False)}
    if mode in ("auto", "wide") and _wide_ok(o):
        run["wide"] = lambda: _gemm1_launch(o, pre, h, store_pre, store_h, hidden, wide=True)
    if mode in ("auto", "tma") and _desc_ok(o):
        run["tma"] = lambda: _gemm1_launch(o, pre, h, store_pre, store_h, hidden, wide=False, desc=True)
    # Timed only where it writes what _gemm1_kernel writes: in recompute mode's backward
    # (preact alone) it leaves the dropped pairs' rows unwritten, which the kernel zeroes.
    if (mode == "split" and store_pre) or (mode == "auto" and store_pre and store_h):
        run["split"] = lambda: _gemm1_split(o, pre, h, store_h, hidden)
    if mode == "auto":
        # with the paths that apply (wide's alignment is not otherwise in the key)
        key = (o.d, o.I, o.rows_class, o.E, str(o.xdt), o.prec, o.act, o.has_bg, o.has_bu, o.wg.table,
               o.wu.table, o.bg.table, o.bu.table, o.wg.strides[1:], o.wu.strides[1:], o.x.stride(),
               store_pre, store_h, hidden, tuple(run), str(o.x.device))
        outs = [(t, float("nan")) for t, stored in ((pre, store_pre), (h, store_h)) if stored]
        mode = pick_fastest("GEMM 1 path", key, run, "fused", outs)
    run[mode if mode in run else "fused"]()


def _gemm1_launch(o: "_Operands", pre: Tensor, h: Tensor, store_pre: bool, store_h: bool, hidden: bool,
                  wide: bool, desc: bool = False) -> None:
    """One ``_gemm1_kernel`` launch (GU_WIDE with ``wide``, B_DESC with ``desc``)."""
    x = o.x
    if desc and x.is_cuda and not INTERPRET:
        descriptor_scratch()
    launch(gg._gemm1_kernel, gg.gemm1_tuned, o.m_grid(o.I), dict(
        x_ptr=x, tw_ptr=o.tw, pairs_ptr=o.sp, offs_ptr=o.eo,
        wg_ptr=o.wg.ptr, wg_tab=o.wg.tab, wu_ptr=o.wu.ptr, wu_tab=o.wu.tab,
        bg_ptr=o.bg.ptr, bg_tab=o.bg.tab, bu_ptr=o.bu.ptr, bu_tab=o.bu.tab,
        pre_ptr=pre if store_pre else h, h_ptr=h if store_h else pre,
        D=o.d, I=o.I, K=o.k, P=o.P, E=o.E, ROWS_CLASS=o.rows_class,
        stride_xt=x.stride(0), stride_xd=x.stride(1),
        s_wge=o.wg.strides[0], s_wgo=o.wg.strides[1], s_wgi=o.wg.strides[2],
        s_wue=o.wu.strides[0], s_wuo=o.wu.strides[1], s_wui=o.wu.strides[2],
        s_bge=o.bg.strides[0], s_bgo=o.bg.strides[1], s_bue=o.bu.strides[0], s_buo=o.bu.strides[1],
        stride_pre=o.n_in, stride_h=o.I,
        ACT=o.act, GATED=o.gated, HAS_BG=o.has_bg, HAS_BU=o.has_bu, HIDDEN=hidden and store_h,
        STORE_PRE=store_pre, STORE_H=store_h, WG_TAB=o.wg.table, WU_TAB=o.wu.table, BG_TAB=o.bg.table,
        BU_TAB=o.bu.table, GU_WIDE=wide, B_DESC=desc,
        PREC=o.prec, G_PAD=o.G_PAD,
    ), INTERPRET_CONFIG)


def _aligned16(w: WeightOperand, el: int) -> bool:
    """Every expert's matrix of ``w`` starts on a 16-byte boundary."""
    if w.table:
        return w.table == 16
    return w.ptr.data_ptr() % 16 == 0 and (w.strides[0] * el) % 16 == 0


def _wide_ok(o: "_Operands") -> bool:
    """Whether GEMM 1 can run GU_WIDE: gated, Wg and Wu with the same strides, contiguous
    along d (their rows are the tile's K runs: with the other dimension contiguous, the
    interleaved columns leave the compiler no contiguous run and it loads the tile element by
    element, unpipelined), and both 16-byte aligned per expert (the kernel tells the compiler
    that Wu's rows lie a multiple of 16 bytes from Wg's; a claim that were false would
    misalign its vector loads)."""
    el = o.x.element_size()
    return (o.gated and o.wg.strides[1:] == o.wu.strides[1:] and o.wg.strides[2] == 1
            and _aligned16(o.wg, el) and _aligned16(o.wu, el))


def _desc_ok(o: "_Operands") -> bool:
    """Whether GEMM 1 can read its weights through tensor descriptors (B_DESC): Wg (and, gated,
    Wu) contiguous along d, with row strides of at least d that are multiples of 16 bytes and every expert's
    matrix 16-byte aligned: what a descriptor of an [I, d] matrix asks of its base and strides
    (Hopper's TMA faults on anything else); and dots on the tensor cores (not fp32 without
    tf32)."""
    el = o.x.element_size()
    ws = (o.wg, o.wu) if o.gated else (o.wg,)
    if o.xdt == torch.float32 and o.prec == "ieee":
        return False  # fp32 dots on the FMA units read B from registers: it spilled 7.8 KB per thread
    # rows at least d apart (a tensor map's rows do not overlap: no expanded or as_strided rows)
    return all(w.strides[2] == 1 and w.strides[1] >= o.d and (w.strides[1] * el) % 16 == 0
               and _aligned16(w, el) for w in ws)


def descriptor_scratch() -> None:
    """Tensor descriptors made inside a kernel need global scratch memory on Hopper, which
    Triton asks of the allocator set with ``triton.set_allocator`` (per thread: the autograd
    engine runs the backward on its own). Where none is set, give it torch's caching allocator
    (``_scratch``), which then stays set in that thread for any Triton kernel that asks; an
    allocator the caller set is kept. Should a Triton release move the allocator, this warns
    once and sets nothing: a forced ``tma`` then fails at its launch, and ``auto`` drops it."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or not hasattr(_allocation, "NullAllocator"):
        if "allocator" not in _WARNED:
            _WARNED.add("allocator")
            warnings.warn("blazec kernels: this Triton has no triton.runtime._allocation._allocator; "
                          "GEMM 1's tensor-descriptor path (BLAZEC_GEMM1=tma) gets no scratch allocator",
                          stacklevel=3)
        return
    if isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """``size`` bytes at a multiple of ``alignment`` on the current CUDA device and stream (the
    ones Triton launches on), from torch's caching allocator, freed in stream order once the
    launch has returned."""
    buf = torch.empty(size + alignment, dtype=torch.int8, device="cuda")
    off = -buf.data_ptr() % alignment
    return buf[off:off + size]


def _cat_ok(o: "_Operands") -> bool:
    """Whether the gated dX can run CAT: what ``_wide_ok`` asks of Wg and Wu (the same strides,
    contiguous along d, both 16-byte aligned per expert: the kernel tells the compiler that Wu's
    rows lie a multiple of 16 bytes from Wg's), B being W itself there. dg and du are the two
    halves of one row-major buffer, so A's second half always follows its first."""
    return _wide_ok(o)


def _gemm1_split(o: "_Operands", pre: Tensor, h: Tensor, store_h: bool, hidden: bool) -> None:
    """BLAZEC_GEMM1=split: g and u by the row GEMM with gathered x rows, into preact's two
    halves, then (``store_h``) ``_act_kernel`` for h; the same values as ``_gemm1_kernel``."""
    x = o.x
    if x.stride(1) != 1:
        x = x.contiguous()
    halves = [(o.wg, o.bg, o.has_bg, pre[:, :o.I])]
    if o.gated:
        halves.append((o.wu, o.bu, o.has_bu, pre[:, o.I:]))
    for w, b, has_b, out in halves:
        _rows_gemm(o, x, x.stride(0), w, True, out, o.I, o.d, o.xdt, bias=b if has_b else None, gather=True)
    if not store_h:  # recompute mode's backward: preact alone, its dropped rows never read
        return
    launch(gg._act_kernel, None, o.elementwise_grid, dict(
        pre_ptr=pre, h_ptr=h, tw_ptr=o.tw, pairs_ptr=o.sp, offs_ptr=o.eo,
        I=o.I, E=o.E, P=o.P, stride_pre=o.n_in, stride_h=o.I,
        ACT=o.act, GATED=o.gated, HIDDEN=hidden,
    ), gg.ELEMENTWISE_CONFIG)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def moe_experts_fwd(
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: Sequence[Tensor],
    w_up: Sequence[Tensor],
    w_down: Sequence[Tensor],
    b_gate: Sequence[Tensor],
    b_up: Sequence[Tensor],
    b_down: Sequence[Tensor],
    activation: str,
    weight_pos: str,
    recompute: bool,
    out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor]:
    """Triton forward of ``blazec::moe_experts``; see ``reference.moe_experts_fwd``."""
    try:
        o = _Operands(x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
                      b_gate, b_up, b_down, activation)
    except _Fallback:
        return reference.moe_experts_fwd(x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate,
                                         w_up, w_down, b_gate, b_up, b_down, activation, weight_pos,
                                         recompute, out_dtype)
    dev = x.device
    out_dt = out_dtype if out_dtype is not None else o.xdt
    hidden = weight_pos == "hidden"
    c_dt = o.xdt if hidden else o.p_dt
    preact = x.new_empty(0) if recompute else empty((o.P, o.n_in), o.xdt, dev)
    h = empty((o.P, o.I), o.xdt, dev)

    _gemm1(o, preact, h, store_pre=not recompute, store_h=True, hidden=hidden)

    direct = o.k == 1
    if direct:
        y = torch.zeros((o.T, o.d), dtype=out_dt, device=dev)  # tokens whose pair was dropped
        out = y
    else:
        out = empty((o.P, o.d), c_dt, dev)
    _rows_gemm(o, h, o.I, o.wd, True, out, o.d, o.I, c_dt, bias=o.bd if o.has_bd else None, scale=not hidden,
               direct=direct)
    if not direct:
        y = empty((o.T, o.d), out_dt, dev)
        moe_combine.combine(out, o.pp, y, o.T, o.d, o.k)
    return y, preact


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


def _wgrad(o: _Operands, L: Tensor, R: Tensor, M: int, N: int, like_w: Sequence[Tensor],
           like_b: Sequence[Tensor], l_gather: bool, r_gather: bool, ws: Optional[Tensor]):
    """dW (and db) of one expert weight; ``ws``: the sorted routing weights to scale L by."""
    dws, dbs = grad_buffer(like_w, 2), grad_buffer(like_b, 1)
    _wgrad_launch(o, L, R, M, N, dws[0], dbs[0] if dbs else None, l_gather, r_gather, ws)
    return dws, dbs


def _wgrad_launch(o: _Operands, L: Tensor, R: Tensor, M: int, N: int, dw: Tensor, db: Optional[Tensor],
                  l_gather: bool, r_gather: bool, ws: Optional[Tensor],
                  L2: Optional[Tensor] = None, dw2: Optional[Tensor] = None, db2: Optional[Tensor] = None):
    """One _wgrad_kernel launch into the stacked gradients ``dw`` [E, M, N] and ``db`` [E, M]
    (None: no bias gradient). With ``L2`` (DUAL) also dW2 = L2^T R into ``dw2`` and, when
    given, its row sums into ``db2``: buffers of the same shapes and strides."""
    dual = L2 is not None
    wgrad_grouped_mm.TAKEN.add("triton")
    some_db = db if db is not None else db2
    assert not dual or (dw2.stride() == dw.stride() and (db is None or db2 is None or db2.stride() == db.stride()))
    grid = lambda META: (host_cdiv(M, META["BLOCK_M"]) * host_cdiv(N, META["BLOCK_N"]), o.E)  # noqa: E731
    launch(moe_wgrad._wgrad_kernel, moe_wgrad.wgrad_tuned, grid, dict(
        l_ptr=L, r_ptr=R, ws_ptr=L if ws is None else ws, pairs_ptr=o.sp, offs_ptr=o.eo,
        dw_ptr=dw, db_ptr=dw if db is None else db,
        l2_ptr=L2 if dual else L, dw2_ptr=dw2 if dual else dw, db2_ptr=dw if db2 is None else db2,
        M=M, N=N, K=o.k, ROWS_CLASS=o.rows_class,
        s_lr=L.stride(0), s_lc=L.stride(1), s_rr=R.stride(0), s_rc=R.stride(1),
        s_dwe=dw.stride(0), s_dwm=dw.stride(1), s_dwn=dw.stride(2),
        s_dbe=some_db.stride(0) if some_db is not None else 0,
        s_dbm=some_db.stride(1) if some_db is not None else 0,
        L_GATHER=l_gather, R_GATHER=r_gather, L_SCALE=ws is not None, HAS_DB=db is not None,
        DUAL=dual, HAS_DB2=db2 is not None, PREC=o.prec,
    ), INTERPRET_CONFIG)


def may_overwrite_preact(preact: Tensor) -> bool:
    """Whether the backward may write dg | du over ``preact``, given that its caller passed
    ``overwrite_preact=True``: preact must be contiguous (dg | du's layout), and the running
    autograd graph task must not keep the graph. With ``retain_graph`` or ``create_graph``, the
    next backward through the same graph reads the saved preact again. Outside a graph task
    (a direct call) torch reports "keep", so nothing is overwritten there either, nor on a torch
    without that query (it exists in 2.11 through 2.13; AOTAutograd uses it).

    At mixtral-like shapes this removes one ``[S, 2I]`` buffer (0.875 GiB in bf16) from the
    backward's peak, where it was live with all three weight gradients.
    """
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return preact.is_contiguous() and keep_graph is not None and not keep_graph()


def releasable(preact: Tensor) -> bool:
    """Whether the backward may free the memory of a preact it was allowed to overwrite
    (``may_overwrite_preact``) once its last reader has been launched, by resizing its storage
    to zero bytes as FSDP does with parameters. Its caller still holds the tensor until the
    backward returns, so ``del`` would free nothing; by then the backward holds every weight
    gradient, and preact's bytes on top of them were the peak. The storage must be exactly
    preact's buffer (no other tensor's bytes in it). On CUDA, not under a CUDA graph capture,
    nor where Inductor's CUDA graph trees (``mode="reduce-overhead"``) manage the device: their
    memory pool tracks the storages it hands out. A later read of the released preact reads a
    zero-byte storage (a crash, not an exception: blazec/ops/experts.py says who may hold it),
    where the overwritten one would have read dg | du."""
    st = preact.untyped_storage()
    if preact.storage_offset() != 0 or st.nbytes() != preact.numel() * preact.element_size():
        return False
    if preact.is_cuda and (torch.cuda.is_current_stream_capturing() or _graph_trees_on(preact.device)):
        return False
    return st.resizable()


def _graph_trees_on(device: torch.device) -> bool:
    """Whether Inductor's CUDA graph trees have a manager for ``device`` in this thread (not
    imported: no). Any failure to tell counts as yes."""
    import sys

    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:
        return False
    try:
        return trees.get_manager(device.index, create_if_none_exists=False) is not None
    except Exception:  # noqa: BLE001 - another torch's internals: do not release
        return True


def moe_experts_bwd(
    grad_y: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    sorted_pairs: Tensor,
    expert_offsets: Tensor,
    pair_pos: Tensor,
    w_gate: Sequence[Tensor],
    w_up: Sequence[Tensor],
    w_down: Sequence[Tensor],
    b_gate: Sequence[Tensor],
    b_up: Sequence[Tensor],
    b_down: Sequence[Tensor],
    preact: Tensor,
    activation: str,
    weight_pos: str,
    recompute: bool,
    overwrite_preact: bool = False,
):
    """Triton backward of ``blazec::moe_experts``; see ``reference.moe_experts_bwd``."""
    try:
        o = _Operands(x, topk_weights, sorted_pairs, expert_offsets, pair_pos, w_gate, w_up, w_down,
                      b_gate, b_up, b_down, activation)
        if grad_y.dtype not in KERNEL_DTYPES:
            _fallback(f"grad_y dtype {grad_y.dtype} is not bf16, fp16 or fp32")
    except _Fallback:
        return reference.moe_experts_bwd(grad_y, x, topk_weights, sorted_pairs, expert_offsets, pair_pos,
                                         w_gate, w_up, w_down, b_gate, b_up, b_down, preact, activation,
                                         weight_pos, recompute, overwrite_preact)
    dev = x.device
    hidden = weight_pos == "hidden"
    I, n_in = o.I, o.n_in
    preact_in = preact
    if not recompute and not preact.is_contiguous():  # the kernels read rows n_in apart (a direct call's view)
        preact = preact.contiguous()
    # dg | du over preact: the recomputed one always, the saved one when its caller gives it up
    # (see may_overwrite_preact). Recompute mode runs GEMM 1 again, preact only, into the
    # buffer that then takes dg | du: the same buffers as the default mode's.
    if recompute:
        dgu = empty((o.P, n_in), o.xdt, dev)
        _gemm1(o, dgu, dgu, store_pre=True, store_h=False, hidden=hidden)
        preact = dgu
    elif overwrite_preact and may_overwrite_preact(preact):
        dgu = preact
    else:
        dgu = empty((o.P, n_in), o.xdt, dev)
    hs = empty((o.P, I), o.xdt, dev)
    # dWd = gy^T (w h) with w folded into hs by the dh step, except in "output" mode with a down
    # bias, whose dbd needs the w-scaled gy rows, and in fp16 "output" mode: there hs keeps h
    # and dWd scales gy's rows by ws (fp32) in its K loop, the reference's (w gy) rounded to x's
    # dtype. Folded into fp16, w h overflowed where h was near fp16's top (w > 1: a routed
    # scaling factor) or lost digits in fp16's subnormals (small w and h), and a wider gy
    # (loss-scaled, out_dtype=float32) overflowed in its cast to fp16 unscaled. bf16 has fp32's
    # range; "hidden" mode's hs is the forward's own rounded w h.
    bd_term = o.has_bd and not hidden
    scale_rows = not hidden and (o.has_bd or o.xdt == torch.float16)
    ws = empty((o.P,), torch.float32, dev) if scale_rows else None
    split = _dh_split(o, grad_y, bd_term)
    # One d(routing weight) partial per row and column tile of the dh step, sized for its
    # narrowest tile; zeroed, since a wider tile (the autotuner's pick) leaves some columns
    # unwritten, and dropped pairs' rows are never written.
    NT = host_cdiv(I, gg.ELEMENTWISE_CONFIG["BLOCK_N"] if split else gg.DH_MIN_BLOCK_N)
    part = torch.zeros((o.P, NT), dtype=torch.float32, device=dev)
    if split:
        _dh_split_launch(o, grad_y, preact, dgu, hs, part, ws, NT)
    else:
        _dh_fused_launch(o, grad_y, preact, dgu, hs, part, ws, NT, bd_term)
    del preact

    d_tw = empty((o.T, o.k), topk_weights.dtype, dev)
    moe_combine.dtw(part, o.pp, d_tw, o.P, NT)
    del part

    # The order keeps the peak low. Every order ends holding the three weight gradients and the
    # [S, I] or [S, n_in] buffer the last of them reads. dg | du is freed as soon as dX, dWg and
    # dWu have read it (``del`` when it is this call's own buffer: recompute mode, or a kept
    # graph; ``releasable`` when it was written over the caller's saved preact), and dWd, from
    # hs, goes last: at mixtral-like 3.06 GiB + dx, where dg | du kept to the end made it
    # 3.5 GiB + dx. Should the caller's preact not be releasable, dWd goes first instead, so
    # that hs is freed before the dx rows and the other gradients are allocated.
    gm = wgrad_grouped_mm.use(x, o.d, I)  # torch's grouped GEMM on sorted row copies (Hopper, bf16)
    own = dgu is not preact_in
    if own or releasable(dgu):
        dx = _dx(o, dgu)
        dwg, dwu, dbg, dbu = _dw_gate_up(o, dgu, w_gate, w_up, b_gate, b_up, gm)
        if not own:
            dgu.untyped_storage().resize_(0)
        del dgu, preact_in
        dwd, dbd = _dw_down(o, grad_y, hs, ws, w_down, b_down, gm)
    else:
        dwd, dbd = _dw_down(o, grad_y, hs, ws, w_down, b_down, gm)
        del hs, ws
        dx = _dx(o, dgu)
        dwg, dwu, dbg, dbu = _dw_gate_up(o, dgu, w_gate, w_up, b_gate, b_up, gm)
    return dx, d_tw, dwg, dwu, dwd, dbg, dbu, dbd


DH_MODES = ("fused", "split")


def dh_mode() -> str:
    """``BLAZEC_DH``: how the backward computes dh and dg | du: ``split`` (default: the row
    GEMM with gathered grad_y rows, then ``_dh_epilogue_kernel``) or ``fused`` (``_dh_kernel``,
    the epilogue in the GEMM's tiles); docs/KERNELS.md. Anything else is an error."""
    return env_choice("BLAZEC_DH", DH_MODES, "split")


def _dh_split(o: _Operands, grad_y: Tensor, bd_term: bool) -> bool:
    """Whether this backward takes the split dh path (the default), where it applies: "output"
    mode with a down bias (its <gy, bd> term rides in the fused K loop) and a grad_y of another
    dtype than x (the fused kernel casts its rows as it loads them) stay fused."""
    return dh_mode() == "split" and not bd_term and grad_y.dtype == o.xdt


def _dh_fused_launch(o: _Operands, grad_y, preact, dgu, hs, part, ws, NT: int, bd_term: bool) -> None:
    # grad_y wider than x: its rows go through a power-of-two scale into x's range, q stays fp32
    # (reference.wide_grad, reference.row_scale)
    gy_scale = reference.wide_grad(grad_y, o.xdt)
    gys = reference.row_scale(grad_y) if gy_scale else part
    launch(gg._dh_kernel, gg.dh_tuned, o.m_grid(o.I), dict(
        gy_ptr=grad_y, tw_ptr=o.tw, pairs_ptr=o.sp, offs_ptr=o.eo,
        wd_ptr=o.wd.ptr, wd_tab=o.wd.tab, bd_ptr=o.bd.ptr, bd_tab=o.bd.tab,
        pre_ptr=preact, dgu_ptr=dgu, hs_ptr=hs, part_ptr=part, ws_ptr=part if ws is None else ws, gys_ptr=gys,
        D=o.d, I=o.I, K=o.k, P=o.P, E=o.E, NT=NT, ROWS_CLASS=o.rows_class,
        stride_gyt=grad_y.stride(0), stride_gyd=grad_y.stride(1),
        s_wde=o.wd.strides[0], s_wdo=o.wd.strides[1], s_wdi=o.wd.strides[2],
        s_bde=o.bd.strides[0], s_bdo=o.bd.strides[1],
        stride_pre=o.n_in, stride_dgu=o.n_in, stride_hs=o.I,
        ACT=o.act, GATED=o.gated, BD_TERM=bd_term, SCALE_ROWS=ws is not None,
        WD_TAB=o.wd.table, BD_TAB=o.bd.table,
        PREC=o.prec, G_PAD=o.G_PAD, GY_SCALE=gy_scale,
    ), INTERPRET_CONFIG)


def _dh_split_launch(o: _Operands, grad_y, preact, dgu, hs, part, ws, NT: int) -> None:
    """The split dh path: q = gy[t(s)] Wd by the row GEMM with gathered A rows, into hs (an
    [S, I] buffer the backward holds anyway), then ``_dh_epilogue_kernel`` over q and preact,
    which leaves w*h in hs (h, and w in ``ws`` when it is given) and dg | du in dgu. The same
    values as ``_dh_kernel``'s, without its epilogue serialized after each tile's K loop. On
    the H100 (docs/BENCHMARKS.md, 2026-11-27) the two launches took 2.88 + 1.16 ms at
    mixtral-like where ``_dh_kernel`` took 6.06, and about 0.9 + 0.71 where it took 1.85 at
    olmoe-like."""
    if grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous()
    _rows_gemm(o, grad_y, grad_y.stride(0), o.wd, False, hs, o.I, o.d, o.xdt, gather=True)
    launch(gg._dh_epilogue_kernel, None, o.elementwise_grid, dict(
        hs_ptr=hs, tw_ptr=o.tw, pairs_ptr=o.sp, offs_ptr=o.eo, pre_ptr=preact, dgu_ptr=dgu, part_ptr=part,
        ws_ptr=part if ws is None else ws,
        I=o.I, E=o.E, NT=NT, stride_pre=o.n_in, stride_dgu=o.n_in, stride_hs=o.I,
        ACT=o.act, GATED=o.gated, SCALE_ROWS=ws is not None,
    ), gg.ELEMENTWISE_CONFIG)


def _dw_down(o: _Operands, grad_y: Tensor, hs: Tensor, ws: Optional[Tensor], w_down, b_down, gm: bool):
    """dWd (+dbd) = gy^T (w h) over each expert's pairs, from the dh step's hs (and ws)."""
    # grouped_mm takes hs as w h (ws is None) and computes no bias gradient; a wider grad_y
    # (out_dtype) would mix dtypes there
    if gm and not o.has_bd and ws is None and grad_y.dtype == o.xdt:
        return [wgrad_grouped_mm.weight_grad(wgrad_grouped_mm.sorted_rows(grad_y, o.sp, o.k), hs, o.eo)], []
    return _wgrad(o, grad_y, hs, o.d, o.I, w_down, b_down, True, False, ws)


def _dx(o: _Operands, dgu: Tensor) -> Tensor:
    """dx: dg Wg + du Wu per pair, then the slot-ordered combine (k == 1: straight into dx)."""
    dev, I = o.x.device, o.I
    direct = o.k == 1
    if direct:
        dx = torch.zeros((o.T, o.d), dtype=o.xdt, device=dev)
        out = dx
    else:
        out = empty((o.P, o.d), o.xdt, dev)
    _rows_gemm(o, dgu, o.n_in, o.wg, False, out, o.d, I, o.xdt, direct=direct,
               two=(dgu[:, I:], o.wu) if o.gated else None)
    if not direct:
        dx = empty((o.T, o.d), o.xdt, dev)
        moe_combine.combine(out, o.pp, dx, o.T, o.d, o.k)
    return dx


def _dw_gate_up(o: _Operands, dgu: Tensor, w_gate, w_up, b_gate, b_up, gm: bool):
    """(dWg, dWu, dbg, dbu) = dg^T x, du^T x (and the row sums) over each expert's pairs."""
    x, I = o.x, o.I
    xs = wgrad_grouped_mm.sorted_rows(x, o.sp, o.k) if gm and not (o.has_bg or o.has_bu) else None
    if xs is not None:
        dwu = [wgrad_grouped_mm.weight_grad(dgu[:, I:], xs, o.eo)] if o.gated else []
        return [wgrad_grouped_mm.weight_grad(dgu[:, :I], xs, o.eo)], dwu, [], []
    if not o.gated:
        dwg, dbg = _wgrad(o, dgu, x, I, o.d, w_gate, b_gate, False, True, None)
        return dwg, [], dbg, []
    dg, du = dgu[:, :I], dgu[:, I:]
    dwg, dwu, dbg, dbu = grad_buffer(w_gate, 2), grad_buffer(w_up, 2), grad_buffer(b_gate, 1), grad_buffer(b_up, 1)
    bg, bu = dbg[0] if dbg else None, dbu[0] if dbu else None

    def single():
        _wgrad_launch(o, dg, x, I, o.d, dwg[0], bg, False, True, None)
        _wgrad_launch(o, du, x, I, o.d, dwu[0], bu, False, True, None)

    def dual():
        _wgrad_launch(o, dg, x, I, o.d, dwg[0], bg, False, True, None, L2=du, dw2=dwu[0], db2=bu)

    run = {"single": single, "dual": dual}
    if GATE_UP_FORCE:
        run[GATE_UP_FORCE]()
        return dwg, dwu, dbg, dbu
    # fp32 without tf32 runs its dots on the FMA units from registers, where two accumulators
    # spill heavily (12.5 KB of stack per thread at 128x128, aot_compile --regs): single only.
    fma = o.xdt == torch.float32 and o.prec == "ieee"
    candidates = {"single": single} if fma else run
    key = (I, o.d, o.rows_class, str(o.xdt), o.prec, o.has_bg, o.has_bu, str(x.device))
    outs = [(t[0], float("nan")) for t in (dwg, dwu, dbg, dbu) if t]
    run[pick_fastest("wgrad gate+up", key, candidates, "single", outs)]()
    return dwg, dwu, dbg, dbu


# Tests set this to "single" or "dual" to run that path whatever the timing would pick.
GATE_UP_FORCE: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def cuda_impls() -> dict[str, Callable]:
    """The op implementations this module provides, keyed by blaze op name."""
    return {
        "moe_route": moe_route,
        "moe_experts": moe_experts_fwd,
        "moe_experts_backward": moe_experts_bwd,
    }


def autotune_choices() -> dict[str, dict[str, str]]:
    """The config each autotuned kernel picked, per tuning key (shape class and dtypes), as
    ``{"gemm1": {"(2048, 1024, 5, ...)": "BLOCK 128x128x64, 8 warps, 3 stages"}, ...}``, and
    each implementation choice timed by ``pick_fastest`` (``{"wgrad gate+up": {key: "dual"}}``,
    with any candidate it left out for computing other bits).
    Empty under the interpreter and before the first GPU launch; ``blazec bench`` prints it."""
    tuned = {"gemm1": gg.gemm1_tuned, "rows_gemm": gg.rows_gemm_tuned, "dh": gg.dh_tuned,
             "wgrad": moe_wgrad.wgrad_tuned}
    out: dict[str, dict[str, str]] = {}
    for name, t in tuned.items():
        for key, cfg in (getattr(t, "cache", None) or {}).items():
            kw = cfg.kwargs
            block = "x".join(str(kw[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in kw)
            out.setdefault(name, {})[str(key)] = f"BLOCK {block}, {cfg.num_warps} warps, {cfg.num_stages} stages"
    for name, choices in IMPL_CHOICES.items():  # implementation choices (pick_fastest)
        for key, impl in choices.items():
            bad = IMPL_DISAGREED.get(name, {}).get(key)
            out.setdefault(name, {})[str(key)] = impl + (f" ({', '.join(bad)}: other bits, not used)" if bad else "")
    return out


def register(device_type: str = "cuda") -> None:
    """Use the Triton kernels for the blaze ops on ``device_type`` (normally done lazily by
    ``blazec.ops._registry`` on the first CUDA call)."""
    from blazec.ops import register_impl

    for op, fn in cuda_impls().items():
        register_impl(op, device_type, fn)
