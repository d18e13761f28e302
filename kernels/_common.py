"""Shared pieces of the blaze Triton kernels: interpreter switches, allocation, weight operands,
the ragged tile schedule, the activation math and the launch/autotune helper.

Why each piece is here:

- ``INTERPRET``: ``@triton.jit`` decides at definition time whether a kernel runs compiled or
  under the numpy interpreter (``TRITON_INTERPRET=1``). Every kernel module imports this file,
  so the flag they see is the flag the kernels were built with. Under the interpreter:
  * ``tl.dot`` on bf16 multiplies the raw uint16 bit patterns (triton 3.9), so ``mma`` upcasts
    bf16/fp16 operands to fp32 first; element-wise math is always done in fp32 anyway;
  * autotuning cannot time anything, so launches use one small fixed config.
- ``empty``: every output and scratch buffer comes from here. Tests switch on poisoning
  (NaN for floats, a sentinel for integers), so an element a kernel forgot to write shows up.
- ``WeightOperand``: expert weights arrive either as one 3-D stacked tensor ``[E, out, in]``
  (any strides: transposed or sliced views are read in place) or as a list of E per-expert
  ``[out, in]`` tensors. A list is passed as an int64 *pointer table* of their data_ptrs (built
  once per distinct set of addresses and cached), which a kernel turns into a typed pointer
  with ``tl.load(tab + e).to(tl.pointer_type(...))``. Per-expert tensors of a list must share
  their strides (true of any ModuleList of Linear); otherwise the launcher falls back.
- ``tile_of``: the schedule of M tiles over ragged expert groups, computed inside each program
  from ``expert_offsets`` (no host sync, no extra launch, static grid).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from blazec.ops.reference import is_stacked, stacked_grad_shape

log = logging.getLogger("blazec")

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# A global constexpr, readable inside @triton.jit functions.
_INTERP = tl.constexpr(INTERPRET)

# ----------------------------------------------------------------------------------------------
# Allocation (with optional poisoning for tests)
# ----------------------------------------------------------------------------------------------

_POISON = False
INT_POISON = -(2**31) + 12345  # fits int32 and int64; an index no kernel would write


def set_poison(on: bool) -> bool:
    """Fill every buffer the launchers allocate with NaN / INT_POISON; returns the old value."""
    global _POISON
    old, _POISON = _POISON, bool(on)
    return old


def empty(shape, dtype: torch.dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and t.numel():
        t.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return t


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------

TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}
KERNEL_DTYPES = tuple(TORCH_TO_TL)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use tf32 only when torch allows it for CUDA matmuls; 16-bit inputs ignore
    this. ``torch.backends.cuda.matmul.fp32_precision`` reflects both the legacy settings
    (``set_float32_matmul_precision``, ``allow_tf32``) and the per-backend ones
    (``torch.backends.fp32_precision``, which it inherits when "none"), where
    ``get_float32_matmul_precision()`` raises once a per-backend one is set."""
    if dtype != torch.float32:
        return "ieee"
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    allowed = setting == "tf32" if setting is not None else torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


# ----------------------------------------------------------------------------------------------
# Expert weight operands: stacked tensor or pointer table
# ----------------------------------------------------------------------------------------------

_TABLE_CACHE: "collections.OrderedDict[tuple, tuple[Tensor, int]]" = collections.OrderedDict()
_TABLE_CACHE_SIZE = 4096  # tables of E int64 each: 8 MiB of device memory at E=256
# Tables a CUDA graph was captured with: the graph replays their device address (and, for one
# built during the capture, the copy from its pinned host buffer, kept here), so they are never
# evicted: a freed table's memory would be reused while a graph still reads it.
_CAPTURED: dict[tuple, Tensor | None] = {}


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pointer_table(ts: Sequence[Tensor]) -> tuple[Tensor, int]:
    """An int64 tensor of the tensors' data_ptrs, on their device, and its alignment.

    The alignment is 16 when every address is a multiple of 16 bytes, else 1. A pointer loaded
    from a table carries no alignment the compiler can see, and without one Triton neither
    vectorizes the loads through it nor pipelines them into shared memory (cp.async); the
    kernels' ``*_TAB`` constexpr passes it (the JIT specializes a stacked tensor's base pointer
    the same way).

    The table holds addresses only, so a cached table is correct for any tensors at the same
    addresses: parameters, which never move, hit the cache on every step (no H2D copy, and the
    addresses are walked once, for the key). Gradients need no table: the backward returns
    each list's gradient stacked.
    """
    dev = ts[0].device
    ptrs = tuple(map(Tensor.data_ptr, ts))  # one C-level pass: this runs every call
    key = (dev, ptrs)
    capturing = _capturing(dev)
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        if capturing:
            _CAPTURED.setdefault(key, None)
        return hit
    tab = host = torch.tensor(ptrs, dtype=torch.int64)
    if dev.type == "cuda":
        # From pinned memory and non-blocking: a pageable copy would make the host wait for
        # the stream (once per new set of addresses). The caching host allocator keeps the
        # pinned buffer until the copy has run (and _CAPTURED keeps it for a graph's replays).
        host = tab.pin_memory()
        tab = host.to(dev, non_blocking=True)
    elif dev.type != "cpu":
        tab = tab.to(dev)
    out = (tab, 16 if all(p % 16 == 0 for p in ptrs) else 1)
    _TABLE_CACHE[key] = out
    if capturing:
        _CAPTURED[key] = host
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        old = next((k for k in _TABLE_CACHE if k not in _CAPTURED), None)  # least recently used
        if old is not None:
            del _TABLE_CACHE[old]
    return out


@dataclass
class WeightOperand:
    """One expert weight (or bias) list as kernel arguments.

    ``ptr`` is the stacked tensor, or the first expert's tensor in table mode (only its dtype is
    used); ``tab`` is the pointer table in table mode, else the stacked tensor again (unused).
    ``strides`` are (stride_e, stride_out[, stride_in]); stride_e is 0 in table mode.
    ``table`` is the kernels' ``*_TAB`` constexpr: 0 for a stacked tensor; in table mode the
    alignment in bytes that every address in the table has (16, or 1 when one does not).
    """

    ptr: Tensor
    tab: Tensor
    strides: tuple[int, ...]
    table: int


def weight_operand(ws: Sequence[Tensor], ndim_expert: int) -> Optional[WeightOperand]:
    """``ws`` is a validated list: one stacked tensor of dim ndim_expert+1, or E tensors.

    Returns None when a per-expert list has mixed strides (the caller then falls back).
    """
    if is_stacked(ws, ndim_expert):
        t = ws[0]
        return WeightOperand(t, t, tuple(t.stride()), 0)
    strides = set(map(Tensor.stride, ws))
    if len(strides) != 1:
        return None
    tab, align = pointer_table(ws)
    return WeightOperand(ws[0], tab, (0, *strides.pop()), align)


def grad_buffer(like: Sequence[Tensor], ndim_expert: int) -> list[Tensor]:
    """The gradient list of the weight or bias list ``like``: one contiguous stacked tensor (the
    op contract, ``reference.stacked_grad_shape``), for per-expert lists too; empty for an
    empty list."""
    if not like:
        return []
    return [empty(stacked_grad_shape(like, ndim_expert), like[0].dtype, like[0].device)]


def dummy_operand(t: Tensor, ndim_expert: int) -> WeightOperand:
    """Arguments for an absent operand (the kernel's constexpr flag keeps it unread)."""
    return WeightOperand(t, t, (0,) * (ndim_expert + 1), 0)


# ----------------------------------------------------------------------------------------------
# Launch helper: fixed config under the interpreter, autotune on GPU
# ----------------------------------------------------------------------------------------------


MAX_BLOCK = 2**20  # Triton's largest tensor (block) in elements: tl.arange(0, n) takes n <= this


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def host_cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host integers (the kernels' own is ``cdiv``). Triton 3.9's is a
    ``constexpr_function``, whose host call unwraps its arguments first: 1.85 us a call against
    0.02, about 20 calls per step, most in the grid callables Triton calls at every launch."""
    return (a + b - 1) // b


def rows_class(P: int, E: int) -> int:
    """Shape class of the ragged M dimension for autotune keys: log2 of rows per expert."""
    return int(math.log2(max(1, P // max(E, 1))))


SMEM_BUDGET = 200 * 1024  # of H100/H200's 227 KiB per block, with room for the epilogue
_SMEM_HEADROOM = 27 * 1024


def smem_budget_for(optin: int) -> int:
    """The budget on a card with ``optin`` bytes of opt-in shared memory per block (0: unknown)."""
    return min(SMEM_BUDGET, optin - _SMEM_HEADROOM) if optin else SMEM_BUDGET


@functools.lru_cache(maxsize=None)
def _device_smem_budget(index: int) -> int:
    return smem_budget_for(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0))


def smem_budget(t: Tensor) -> int:
    """Pipelined-tile bytes a config may use on ``t``'s device: SMEM_BUDGET on H100/H200, less on
    cards with less shared memory per block (A100: 163 KiB, so ~136 KiB), so that the first
    config that fits (``BLAZEC_AUTOTUNE=0``) can launch there. CPU tensors (interpreter, AOT
    compile for sm_90) get SMEM_BUDGET."""
    return _device_smem_budget(t.device.index or 0) if t.is_cuda else SMEM_BUDGET


def smem_pruner(tensor_arg: str, operands, indirect: bool = False, epilogue=None):
    """An autotune ``early_config_prune`` that drops configs whose pipelined tiles would not fit
    in shared memory (fp32 inputs need half the tile of bf16). ``operands(args)`` returns how
    many [BLOCK_M, BLOCK_K] and [BLOCK_K, BLOCK_N] tiles one K step loads.

    ``indirect``: the K loop loads the row indices its tiles are gathered through. Triton's
    pipeliner then spends two of the ``num_stages`` on the index load and keeps
    ``num_stages - 2`` tile buffers (``tests/kernels/aot_compile.py --dump``: 3 at 5 stages).
    ``epilogue(args)``: bytes per output element of an epilogue buffer that is live with the
    tile buffers (a persistent kernel's, whose next tile's copies are in flight while it
    stores), or 0."""

    def est(cfg, args, el):
        n_a, n_b = operands(args)
        m, k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
        n = cfg.kwargs.get("BLOCK_N", args.get("BLOCK_N", 128))
        buffers = max(2, cfg.num_stages - 2) if indirect else cfg.num_stages
        return buffers * (m * k * n_a + k * n * n_b) * el + (m * n * epilogue(args) if epilogue else 0)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        el = args[tensor_arg].element_size()
        budget = smem_budget(args[tensor_arg])
        if epilogue is not None and epilogue(args):
            # the headroom was for that buffer, counted here; 4 KB of it stays a margin below
            # the card's limit (the tightest persistent config compiled to 3 KB under it)
            budget += _SMEM_HEADROOM - 4096
        ok = [c for c in configs if est(c, args, el) <= budget]
        if ok:
            return ok
        # Nothing fits (fp32 on a card with less shared memory than an H100): shrink the
        # smallest config: fewer stages down to 3, then a shorter K step, then 2 stages. Three
        # stages keep a copy in flight while a tile is used; with two, the loop waits for
        # every copy each iteration (aot_compile --arch 80 showed it for tf32 GEMM 1).
        cfg = min(configs, key=lambda c: est(c, args, el))
        while est(cfg, args, el) > budget and (cfg.num_stages > 2 or cfg.kwargs["BLOCK_K"] > 16):
            kw, stages = dict(cfg.kwargs), cfg.num_stages
            if stages > 3 or (stages == 3 and kw["BLOCK_K"] <= 16):
                stages -= 1
            else:
                kw["BLOCK_K"] //= 2
            cfg = triton.Config(kw, num_warps=cfg.num_warps, num_stages=stages)
        return [cfg]

    return prune


_TUNED_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    """One autotune config of the grouped GEMM kernels (tile BLOCK_M x BLOCK_N x BLOCK_K, grouped
    tile order over GROUP_M = 8 row blocks)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# The fixed meta-parameters of every GEMM kernel under the interpreter: 16-wide tiles, so the
# tests' small shapes still cut into several tiles in each dimension.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


def variant_key(kernel) -> list[str]:
    """The names of a kernel's constexpr arguments that select its variant (gated or not,
    recompute, pointer tables, precision, ...), for its autotune key: without them, variants
    with the same shapes and dtypes shared one pick, so the backward dX GEMM reused the config
    timed for the forward down GEMM (same N and K). The tuned meta-parameters are left out,
    and so is G_PAD (a function of E)."""
    return [p.name for p in kernel.params if p.is_constexpr and p.name not in (*_TUNED_META, "G_PAD")]


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """The value of environment variable ``name``, one of ``choices`` (``default`` when unset);
    anything else is an error that names the variable."""
    value = os.environ.get(name, default).strip()
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)} (default {default}), got {value!r}")
    return value


def autotune_enabled() -> bool:
    """``BLAZEC_AUTOTUNE=0`` launches each kernel with its first config that fits in shared
    memory instead of timing them all: for correctness runs on a GPU (tests, gpu_check.sh),
    where autotuning every shape the tests use would cost minutes of GPU time."""
    return env_choice("BLAZEC_AUTOTUNE", ("0", "1"), "1") == "1"


def pruned_configs(tuned, args: dict) -> list:
    """The configs ``tuned`` would time for these arguments: its list after the pruner."""
    configs = tuned.configs
    prune = getattr(tuned, "early_config_prune", None)
    if prune is not None:
        configs = prune(configs, args)
    return configs


# Implementation choices timed once per key (``pick_fastest``), by name: what ``blazec bench``
# reports beside the kernels' tuned configs; and the candidates each key excluded because their
# outputs differed from the default's.
IMPL_CHOICES: dict[str, dict[tuple, str]] = {}
IMPL_DISAGREED: dict[str, dict[tuple, tuple[str, ...]]] = {}

# An integer dtype of each element size, to read a tensor's bit patterns.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_checksum(t: Tensor, chunk: int = 1 << 24) -> Tensor:
    """Two int64 sums of ``t``'s bit patterns, weighted by row and by column position (``t``
    viewed as rows of its last dimension): equal for equal tensors, and different for nearly
    any difference, a swapped pair of rows or columns included (not a proof of equality: a
    rectangle of four changes that cancel in every row and column sum would pass). Integer
    sums, so the reduction order does not matter; overflow wraps the same way for both sides.
    The bits are widened to int64 ``chunk`` elements' worth of rows at a time (a sum with
    ``dtype=int64`` converts its whole input first): at most 8 * chunk bytes (128 MiB) of
    scratch, whatever ``t``'s size."""
    b = t.view(_BITS[t.element_size()])
    b = b.reshape(1, -1) if b.dim() < 2 else b.flatten(0, -2)
    R, C = b.shape
    rows = torch.empty(R, dtype=torch.int64, device=t.device)
    cols = torch.zeros(C, dtype=torch.int64, device=t.device)
    step = max(1, chunk // max(C, 1))
    for r0 in range(0, R, step):
        blk = b[r0:r0 + step].to(torch.int64)
        rows[r0:r0 + step] = blk.sum(dim=1)
        cols += blk.sum(dim=0)
        del blk

    def weighted(v: Tensor) -> Tensor:
        return (v * torch.arange(1, v.numel() + 1, dtype=torch.int64, device=v.device)).sum()

    return torch.stack([weighted(rows), weighted(cols)])


def _agreeing(name: str, key: tuple, candidates: dict[str, Callable[[], None]], default: str,
              outputs: Sequence[tuple[Tensor, float]]) -> dict[str, Callable[[], None]]:
    """The candidates whose outputs equal the default's bit for bit on this call's inputs: each
    runs once on ``outputs`` reset to their fill value (NaN for a buffer the kernels write, 0
    for one that must stay zero where nothing is routed), so that an element one candidate
    writes and another leaves unwritten differs too. A candidate that differs, or raises (a
    variant this card or Triton cannot compile), is dropped with a warning: an implementation
    choice must not change the numbers, nor make a call fail that the default serves. Then the
    outputs are reset again, so that a dropped candidate's writes cannot outlive the check."""
    import warnings

    def run(c: str) -> list[Tensor]:
        for t, fill in outputs:
            t.fill_(fill)
        candidates[c]()
        return [bits_checksum(t) for t, _ in outputs]

    ref = run(default)
    keep, bad = {default: candidates[default]}, []
    for c, fn in candidates.items():
        if c == default:
            continue
        try:
            same = all(torch.equal(a, b) for a, b in zip(run(c), ref))
        except Exception as e:  # noqa: BLE001 - any failure of an optional path: not used
            warnings.warn(f"blazec kernels: {name} {c!r} failed for {key} ({type(e).__name__}: {e}); "
                          f"using the others", stacklevel=3)
            same = False
        if same:
            keep[c] = fn
        else:
            bad.append(c)
    if bad:
        IMPL_DISAGREED.setdefault(name, {})[key] = tuple(bad)
        warnings.warn(f"blazec kernels: {name} {', '.join(map(repr, bad))} did not compute the bits "
                      f"of {default!r} for {key}; not used there", stacklevel=3)
    for t, fill in outputs:
        t.fill_(fill)
    return keep


# The names of the launch paths the timed choices offer (``pick_fastest``'s candidates at its
# call sites in moe_experts.py), which ``BLAZEC_AUTO_EXCLUDE`` may name.
AUTO_PATHS = ("fused", "wide", "tma", "split", "tiles", "persistent", "two", "cat", "cat-persistent",
              "single", "dual")


def auto_excluded() -> frozenset:
    """``BLAZEC_AUTO_EXCLUDE``: launch paths the timed choices must not run, comma-separated
    (for instance ``tma,cat-persistent``), for a path that fails on a card where the check
    cannot catch it (a fault that ends the process); a site's default always stays. A name that
    is not a path is an error that lists them."""
    return _parse_auto_exclude(os.environ.get("BLAZEC_AUTO_EXCLUDE", ""))


@functools.lru_cache(maxsize=16)
def _parse_auto_exclude(value: str) -> frozenset:
    """``auto_excluded``'s parse, cached by the variable's value (it runs at every timed choice,
    on the host path; a bad value raises again at each call, since errors are not cached)."""
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(AUTO_PATHS))
    if unknown:
        raise ValueError(f"BLAZEC_AUTO_EXCLUDE names no launch path: {', '.join(map(repr, unknown))}; "
                         f"the paths: {', '.join(AUTO_PATHS)}")
    return names


def timeable(t: Tensor) -> bool:
    """Whether launches writing ``t`` can be timed: a CUDA tensor (CPU tensors reach the
    launchers only in the host benchmarks, whose launches are stubbed)."""
    return t.is_cuda


def pick_fastest(name: str, key: tuple, candidates: dict[str, Callable[[], None]], default: str,
                 outputs: Optional[Sequence[tuple[Tensor, float]]] = None) -> str:
    """Which of ``candidates`` (names -> launch functions that compute the same outputs into
    the same buffers) to run for ``key``: on a GPU with autotuning on, the fastest by
    ``triton.testing.do_bench`` the first time ``key`` is seen (each candidate's own kernels
    autotune inside its first run), then that one from the cache; ``default`` under the
    interpreter, with ``BLAZEC_AUTOTUNE=0``, for CPU ``outputs``, and for an uncached key during
    a CUDA graph capture. With ``outputs`` ((buffer, fill value) pairs: what the candidates
    write), only candidates that compute the default's bits take part (``_agreeing``); those
    that ``BLAZEC_AUTO_EXCLUDE`` names never do (``auto_excluded``). The caller runs the returned
    candidate itself."""
    excluded = auto_excluded() & set(candidates) - {default}  # (read first: a bad value errs anywhere)
    if INTERPRET or not autotune_enabled():
        return default
    if excluded:
        candidates = {c: fn for c, fn in candidates.items() if c not in excluded}
        key = (*key, "excluded", *sorted(excluded))
    if len(candidates) == 1:
        return next(iter(candidates))
    cache = IMPL_CHOICES.setdefault(name, {})
    hit = cache.get(key)
    if hit is not None:
        return hit
    if outputs and not timeable(outputs[0][0]):
        return default
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default  # timing synchronizes, which a CUDA graph capture cannot; not cached
    from triton.testing import do_bench

    if outputs:
        candidates = _agreeing(name, key, candidates, default, outputs)
    if len(candidates) == 1:  # the others computed other bits
        hit = cache[key] = default
    else:
        times = {c: do_bench(fn, warmup=5, rep=20) for c, fn in candidates.items()}
        hit = cache[key] = min(times, key=times.get)
        # one line per launch site and shape class, at its first call (TORCH_LOGS="blazec")
        log.info("blazec kernels: %s: %s (%s)", name, hit,
                 ", ".join(f"{c} {t:.3f} ms" for c, t in sorted(times.items(), key=lambda ct: ct[1])))
    return hit


def launch(kernel, tuned, grid, args: dict, fixed: dict) -> None:
    """Launch ``kernel`` with ``fixed`` meta-parameters under the interpreter, or the autotuned
    ``tuned`` wrapper on GPU (its first fitting config when autotuning is off). ``grid`` is a
    callable of the meta-parameters."""
    if INTERPRET or tuned is None:
        meta = dict(fixed)
        launch_opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        if INTERPRET:
            launch_opts = {}
        kernel[grid({**args, **meta})](**args, **meta, **launch_opts)
    elif not autotune_enabled():
        cfg = pruned_configs(tuned, args)[0]
        kernel[grid({**args, **cfg.kwargs})](**args, **cfg.kwargs, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
    else:
        tuned[grid](**args)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


def device_fn(fn):
    """``@triton.jit`` for device helpers, except under the interpreter: there every call of a
    jitted helper re-patches triton.language (~1 ms), which dominated the kernel tests. A plain
    function called from an interpreted kernel runs on the kernel's patched language, with the
    same result."""
    return fn if INTERPRET else triton.jit(fn)



# Sums and prefix sums go through tl.reduce / tl.associative_scan with the standard combine
# function rather than tl.sum / tl.cumsum: identical code when compiled, and under the
# interpreter they hit its numpy fast path without a per-call language re-patch.
@triton.jit
def _add(a, b):
    return a + b


# The standard combine function is what the interpreter recognizes; any jit adder works compiled.
_SUM = getattr(getattr(tl, "standard", None), "_sum_combine", None) or _add


@device_fn
def rsum(x, axis: tl.constexpr):
    """tl.sum(x, axis) for int32 / fp32 x."""
    return tl.reduce(x, axis, _SUM)


@device_fn
def csum(x, axis: tl.constexpr):
    """Inclusive tl.cumsum(x, axis) for int32 x."""
    return tl.associative_scan(x, axis, _SUM)


@device_fn
def cdiv(a, b):
    return (a + b - 1) // b


@device_fn
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@device_fn
def cast(x, dt: tl.constexpr):
    """x.to(dt) with round-to-nearest-even. The interpreter's fp32 -> bf16 cast truncates
    (triton 3.9), unlike the GPU, so there the rounding is done on the bits first."""
    if _INTERP:
        if dt == tl.bfloat16:
            if x.dtype == tl.float32:
                b = x.to(tl.uint32, bitcast=True)
                b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
                x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


@device_fn
def rnd(x, dt: tl.constexpr):
    """Round fp32 x to dt and back: the value a tensor of dtype dt would hold."""
    return cast(x, dt).to(tl.float32)


@device_fn
def expert_ptr(base_ptr, tab_ptr, e, stride_e, TABLE: tl.constexpr):
    """Pointer to expert ``e``'s [out, in] matrix (or [out] vector).

    base_ptr: stacked tensor base (used when TABLE == 0); tab_ptr: int64 [E] data_ptrs, whose
    addresses are all multiples of TABLE bytes (``pointer_table``'s alignment).
    """
    if TABLE:
        p = tl.load(tab_ptr + e).to(tl.pointer_type(base_ptr.dtype.element_ty))
        if TABLE >= 16:
            p = tl.multiple_of(p, 16)
    else:
        p = base_ptr + e.to(tl.int64) * stride_e
    return p


@device_fn
def mma(a, b, acc, PREC: tl.constexpr):
    """acc += a @ b in fp32. Under the interpreter 16-bit operands are upcast first (its bf16
    dot multiplies bit patterns)."""
    if _INTERP:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@device_fn
def _group_tiles(offs_ptr, E, P, BLOCK_M: tl.constexpr, G_PAD: tl.constexpr):
    """Per group g < G_PAD of ``tile_of``: its rows [lo, hi) and its number of M tiles (groups
    0..E-1 the experts, E the dropped tail [offs[E], P), past E empty)."""
    g = tl.arange(0, G_PAD)
    lo = tl.load(offs_ptr + g, mask=g <= E, other=P).to(tl.int32)
    hi = tl.load(offs_ptr + g + 1, mask=g < E, other=P).to(tl.int32)
    hi = tl.where(g <= E, hi, lo)
    return g, lo, hi, (hi - lo + BLOCK_M - 1) // BLOCK_M


@device_fn
def tile_of(offs_ptr, E, P, tile, BLOCK_M: tl.constexpr, G_PAD: tl.constexpr):
    """Map virtual M tile ``tile`` to (group, row0, row_end) over ragged groups.

    Groups 0..E-1 are the experts, [offs[e], offs[e+1]) of the sorted pairs; group E is the
    tail [offs[E], P) of dropped pairs. Each group is cut into ceil(count / BLOCK_M) tiles,
    numbered in group order. A tile past the last one gets group E+1 (nothing to do).
    The grid must have at least cdiv(P, BLOCK_M) + E + 1 M tiles.
    """
    g, lo, hi, ntile = _group_tiles(offs_ptr, E, P, BLOCK_M, G_PAD)
    cum = csum(ntile, 0)
    grp = rsum((cum <= tile).to(tl.int32), 0)
    sel = g == grp
    first_tile = rsum(tl.where(sel, cum - ntile, 0), 0)
    row0 = rsum(tl.where(sel, lo, 0), 0) + (tile - first_tile) * BLOCK_M
    row_end = rsum(tl.where(sel, hi, 0), 0)
    return grp, row0, row_end


@device_fn
def real_m_tiles(offs_ptr, E, P, BLOCK_M: tl.constexpr, G_PAD: tl.constexpr):
    """The number of M tiles of the experts (groups 0..E-1; not the dropped tail's): the first
    ``real_m_tiles`` virtual tiles of ``tile_of``."""
    g, lo, hi, ntile = _group_tiles(offs_ptr, E, P, BLOCK_M, G_PAD)
    return rsum(tl.where(g < E, ntile, 0), 0)


@device_fn
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering of a 1-D grid into (pid_m, pid_n) for L2 reuse of the A rows."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.where(num_m - first_m < GROUP_M, num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# Activation codes shared with the launchers (constexpr ACT).
ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_RELU = 0, 1, 2, 3
BASE_CODE = {"silu": ACT_SILU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}


@device_fn
def _tanh(z):
    # tanh through the sigmoid (no libdevice, so the interpreter runs it too).
    return 2.0 * sigmoid(2.0 * z) - 1.0


@device_fn
def act_fwd(g, ACT: tl.constexpr):
    """a(g) in fp32 for ACT in {silu, gelu (erf), gelu_tanh, relu}."""
    if ACT == 0:
        r = g * sigmoid(g)
    elif ACT == 1:
        r = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        r = 0.5 * g * (1.0 + _tanh(z))
    else:
        r = tl.where(g < 0, 0.0, g)  # F.relu: a NaN stays NaN
    return r


@device_fn
def act_bwd(dh, g, ACT: tl.constexpr):
    """dh * a'(g) in fp32, as eager's autograd computes it (formulas in
    blazec.ops.activations.hidden_backward). For relu that is threshold_backward, a select, not
    a product: 0 where g <= 0 even for a non-finite dh, and dh where g is NaN."""
    if ACT == 0:
        s = sigmoid(g)
        r = dh * (s * (1.0 + g * (1.0 - s)))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        r = dh * (cdf + g * pdf)
    elif ACT == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(z)
        r = dh * (0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g))
    else:
        r = tl.where(g <= 0, 0.0, dh)
    return r
