"""Compile every blaze kernel variant for an NVIDIA target without a GPU (ahead of time).

The interpreter runs the kernels' Python, not Triton's compiler, so it cannot catch what only
the compiler rejects (control flow with early returns, dtype mismatches between branches,
constexpr misuse, too much shared memory). This script drives the real launchers on CPU
tensors with every launch intercepted, then compiles each intercepted kernel, with the
arguments it would have received, through TTIR -> TTGIR -> LLVM -> PTX -> cubin for
``cuda:90`` (Hopper) with Triton's bundled ptxas. It must run *without* TRITON_INTERPRET.

    python -m tests.kernels.aot_compile            # first autotune config of each kernel
    python -m tests.kernels.aot_compile --cover    # fewest of those that cover each flag (CI)
    python -m tests.kernels.aot_compile --all      # every autotune config
    python -m tests.kernels.aot_compile --arch 80  # another target
    python -m tests.kernels.aot_compile --regs     # also each variant's registers and spills
    python -m tests.kernels.aot_compile --kernel _dh_kernel   # only that kernel's variants
    python -m tests.kernels.aot_compile --jobs 1   # in one process (default: one per CPU, forked)

It compiles with the locally installed Triton; the GPU image's Triton may differ. ``--regs``
reads each cubin's resource usage with Triton's bundled ``cuobjdump``: registers per thread, and
stack / local bytes per thread (nonzero means ptxas spilled registers), next to the dynamic
shared memory Triton allocates.

It also checks which matrix instructions each GEMM kernel compiled to: with 16-bit operands on
sm_90 every ``tl.dot`` must become Hopper's asynchronous ``wgmma`` (``mma.sync`` on sm_80/89).
A GEMM that silently falls back to ``mma.sync`` on Hopper (operand layouts Triton cannot feed
to wgmma) runs at a fraction of the card's tensor throughput, and nothing else would show it
before a GPU timing. fp32 operands use tensor cores only as tf32, so they are checked only
in the case run with torch's matmul precision at "high". And in every GEMM variant whose
weight tables claim 16-byte alignment, no 2-D tile may be loaded synchronously inside a loop
(sm_80+): Triton's pipeliner turns each operand load of a K loop into an asynchronous copy to
shared memory, and a plain ``tt.load`` left in the loop is one it could not pipeline. That is
how the per-expert-list kernels once compiled (their weight loads, through table pointers of
unknown alignment; see docs/KERNELS.md, "Weights"), with the gathered x rows still pipelined
beside them. Nor may a tensor-core loop wait, each iteration, for every outstanding copy or
every issued wgmma (``loop_drains``): the wgrad and dX GEMM loops once did.

Finally, two launches of one kernel that differ in a variant flag must not share an autotune
key (``variant_key``), or the autotuner would reuse one variant's pick for the other.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 100: 232448}
_SIG = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8", torch.bool: "i1",
}


class _Recorder:
    """Stands in for a JITFunction (``k[grid](...)``) or for ``launch``; records every call."""

    def __init__(self, log: list, fn=None):
        self.log, self.fn = log, fn

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            names = self.fn.arg_names
            kw = dict(zip(names, args))
            kw.update(kwargs)
            opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
            self.log.append((self.fn, kw, [opts]))

        return call


def _record_launch(log: list, all_configs: bool, shared_keys: list | None = None):
    """A stand-in for ``_common.launch`` that records each launch's variants (first or every
    autotune config), and in ``shared_keys`` any two launches of a kernel that differ in a
    constexpr argument yet get the same autotune key (the autotuner would reuse one's pick)."""
    from blazec.kernels._common import pruned_configs, variant_key

    seen: dict = {}

    def launch(kernel, tuned, grid, args, fixed):
        if tuned is not None and shared_keys is not None:
            key = (kernel.__name__, *(args[k] for k in tuned.keys if k in args),
                   *(str(v.dtype) for v in args.values() if hasattr(v, "dtype")))
            variant = tuple((n, str(args.get(n))) for n in variant_key(kernel))
            if seen.setdefault(key, variant) != variant:
                shared_keys.append(f"{kernel.__name__}: variants {dict(seen[key])} and {dict(variant)} "
                                   f"share the autotune key {key[1:]}")
        if tuned is None:
            meta = dict(fixed)
            opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
            log.append((kernel, {**args, **meta}, [opts]))
        else:
            configs = pruned_configs(tuned, args)
            for cfg in configs if all_configs else configs[:1]:
                log.append((kernel, {**args, **cfg.kwargs}, [{"num_warps": cfg.num_warps,
                                                               "num_stages": cfg.num_stages}]))

    return launch


def _signature(fn, kw: dict[str, Any]) -> tuple[dict, dict]:
    sig, consts = {}, {}
    for p in fn.params:
        v = kw[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _SIG[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the runtime specializes ints equal to 1
                sig[p.name] = "constexpr"
                consts[p.name] = 1
            else:
                sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        else:
            raise TypeError(f"{fn.__name__}.{p.name}: unexpected argument {v!r}")
    return sig, consts


def _specialized_source(fn, kw: dict[str, Any], opts: dict, target) -> tuple[ASTSource, dict]:
    """The ASTSource and options the JIT itself would build for this call on ``target``.

    Goes through the JIT's own binder, so pointers aligned to 16 bytes and integers divisible
    by 16 get the same ``tt.divisibility`` attributes as at run time. Without them Triton
    cannot vectorize the loads, and its pipeliner leaves every K loop unpipelined, so the
    compiled code (and its register use) would not be what a GPU runs.
    """
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kw, **opts)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(opts), bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def _brief(sig: dict, consts: dict) -> str:
    first = next(v for v in sig.values() if v.startswith("*"))
    blocks = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
    flags = ",".join(k for k, v in consts.items() if v is True and k.isupper() and not k.endswith("_TAB"))
    return f"{first} {blocks} {flags}".rstrip()


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one kernel in ``cubin``, from ``cuobjdump -res-usage``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


GEMM_KERNELS = ("_gemm1_kernel", "_rows_gemm_kernel", "_dh_kernel", "_wgrad_kernel")


def mma_kind(ptx: str) -> str:
    """The tensor-core instruction families a kernel's PTX uses: "wgmma", "mma.sync", both
    ("wgmma+mma.sync": some dot fell back) or "none"."""
    kinds = [k for k, pat in (("wgmma", r"\bwgmma\.mma_async\."), ("mma.sync", r"\bmma\.sync\."))
             if re.search(pat, ptx)]
    return "+".join(kinds) or "none"


def expected_mma(name: str, sig: dict, arch: int, consts: dict | None = None):
    """What a GEMM variant must compile to on ``arch``, or None where nothing is required:
    16-bit inputs, or fp32 with tf32 allowed (``PREC`` "tf32"), must use tensor cores."""
    tf32 = (consts or {}).get("PREC") == "tf32"
    if name not in GEMM_KERNELS or not (tf32 or any(t in ("*bf16", "*fp16") for t in sig.values())):
        return None
    return "wgmma" if arch >= 90 else "mma.sync" if arch >= 80 else None


def _in_loops(ttgir: str, pattern: str, in_ifs: Optional[bool] = None) -> int:
    """How many lines of a kernel's TTGIR inside ``scf.for`` bodies match ``pattern`` (blocks
    found by indentation, as the IR is printed). ``in_ifs``: True counts only those inside an
    ``scf.if`` (or its else) within the innermost loop, False only those outside one."""
    n, blocks = 0, []  # (indent, "for" | "if") of the open blocks
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while blocks and line.strip() and indent <= blocks[-1][0]:
            blocks.pop()
        kinds = [k for _, k in blocks]
        if "for" in kinds and re.search(pattern, line):
            conditional = "if" in kinds[len(kinds) - 1 - kinds[::-1].index("for"):]
            n += in_ifs is None or in_ifs == conditional
        if line.rstrip().endswith("{") and ("scf.for" in line or "scf.if" in line or line.strip() == "} else {"):
            blocks.append((indent, "for" if "scf.for" in line else "if"))
    return n


def loop_tile_loads(ttgir: str) -> int:
    """Synchronous loads of a 2-D tile (``tt.load`` of ``tensor<AxBx!tt.ptr...>``, or a
    tensor descriptor's ``tt.descriptor_load``, which the pipeliner turns into TMA copies) in
    loops."""
    return _in_loops(ttgir, r"= tt\.load [^\n]*: tensor<\d+x\d+x!tt\.ptr|= tt\.descriptor_load ")


_COPY_DRAIN = r"ttg\.async_wait [^\n]*\{num = 0 : i32\}"
_MMA_DRAIN = r"warp_group_dot_wait [^\n]*\{pendings = 0 : i32[,}]"  # triton 3.9 adds attributes


def loop_drains(ttgir: str, persistent: bool = False) -> int:
    """Waits in loops for every outstanding copy (``ttg.async_wait {num = 0}``) or for every
    issued Hopper MMA (``warp_group_dot_wait {pendings = 0}``). A loop that drains its copies
    prefetches nothing ahead of the tile it is about to use, so the load latency is exposed
    each iteration; one that drains its MMAs has no tensor-core work in flight while it issues
    the next step. ``persistent``: a flattened tile loop, whose epilogue, conditional on the
    last K step of a tile, must wait for that tile's MMAs: one conditional MMA drain is allowed
    there; a copy drain, which would wait out the next tile's prefetched copies, is not."""
    if not persistent:
        return _in_loops(ttgir, f"{_COPY_DRAIN}|{_MMA_DRAIN}")
    return (_in_loops(ttgir, f"{_COPY_DRAIN}|{_MMA_DRAIN}", in_ifs=False) + _in_loops(ttgir, _COPY_DRAIN, in_ifs=True)
            + max(0, _in_loops(ttgir, _MMA_DRAIN, in_ifs=True) - 1))


def expects_pipelining(name: str, consts: dict, arch: int) -> bool:
    """A GEMM variant on sm_80+ whose pointer tables (if any) are 16-byte aligned."""
    return name in GEMM_KERNELS and arch >= 80 and all(
        v in (0, 16) for k, v in consts.items() if k.endswith("_TAB"))


def cases():
    """Representative launcher calls: every kernel, both weight forms, all flags."""
    from blazec.ops import reference as ref

    def make(T, d, I, E, k, act, dtype, layout, bias, tw_dtype=None):
        gated = act in ("swiglu", "geglu", "geglu_tanh")
        x = torch.randn(T, d, dtype=dtype)
        tw = torch.rand(T, k, dtype=tw_dtype or dtype)
        ids = torch.randint(0, E, (T, k))
        route = ref.moe_route(ids, E, -1, "token")
        if layout == "stacked":
            wg, wd = [torch.randn(E, I, d, dtype=dtype)], [torch.randn(E, I, d, dtype=dtype).transpose(1, 2)]
            wu = [torch.randn(E, I, d, dtype=dtype)] if gated else []
        else:
            wg, wd = [torch.randn(I, d, dtype=dtype) for _ in range(E)], [torch.randn(d, I, dtype=dtype) for _ in range(E)]
            wu = [torch.randn(I, d, dtype=dtype) for _ in range(E)] if gated else []
        if bias == "stacked":
            b = ([torch.randn(E, I, dtype=dtype)], [torch.randn(E, I, dtype=dtype)] if gated else [],
                 [torch.randn(E, d, dtype=dtype)])
        elif bias == "list":
            b = ([torch.randn(I, dtype=dtype) for _ in range(E)],
                 [torch.randn(I, dtype=dtype) for _ in range(E)] if gated else [],
                 [torch.randn(d, dtype=dtype) for _ in range(E)])
        else:
            b = ([], [], [])
        return x, tw, ids, route, (wg, wu, wd, *b)

    yield "route-token", ("route", torch.randint(0, 64, (512, 8)), 64, -1, "token")
    yield "route-slot-cap", ("route", torch.randint(0, 8, (300, 2)).int(), 8, 40, "slot")
    specs = [
        # name, T, d, I, E, k, act, dtype, layout, bias, weight_pos, recompute, tw_dtype
        ("bf16-swiglu-stacked", 64, 256, 128, 8, 8, "swiglu", torch.bfloat16, "stacked", "none", "output", False, None),
        ("bf16-swiglu-table-recompute-bias-hidden", 64, 256, 128, 8, 2, "swiglu", torch.bfloat16, "list", "list",
         "hidden", True, None),
        ("fp16-gelu-k1-bias", 64, 128, 96, 4, 1, "gelu", torch.float16, "stacked", "stacked", "output", True, None),
        ("fp32-geglu_tanh", 32, 64, 64, 4, 2, "geglu_tanh", torch.float32, "stacked", "stacked", "output", False, None),
        ("fp16-geglu-table", 32, 64, 64, 4, 2, "geglu", torch.float16, "list", "none", "output", False, None),
        ("bf16-relu-fp32router", 32, 64, 64, 4, 2, "relu", torch.bfloat16, "list", "none", "output", False,
         torch.float32),
        # fp32 with torch's matmul precision at "high": the dots use tf32 tensor cores
        ("fp32-tf32-swiglu", 32, 64, 64, 4, 2, "swiglu", torch.float32, "stacked", "none", "output", True, None),
    ]
    for name, T, d, I, E, k, act, dt, layout, bias, wp, rec, twd in specs:
        x, tw, ids, route, ws = make(T, d, I, E, k, act, dt, layout, bias, twd)
        yield name, ("experts", x, tw, route, ws, act, wp, rec)


_VARIANTS: list = []
_ARGS = None
_TARGET = None


def _check_variant(i: int) -> tuple[bool, list[str], Optional[tuple]]:
    """Compile variant ``i`` of ``_VARIANTS`` and check it: (compiled, failures, resource
    usage or None). Runs in the main process or in a forked worker; any error is a failure of
    this variant."""
    fn, kw, opts, sig, consts = _VARIANTS[i]
    try:
        return _check(i, fn, kw, opts, sig, consts, _ARGS, _TARGET)
    except Exception as e:  # noqa: BLE001 - report every failing variant
        msg = str(e).strip().splitlines()
        return False, [f"{fn.__name__} {opts} {_brief(sig, consts)}: {type(e).__name__}: "
                       f"{msg[-1] if msg else ''}"], None


def _check(i, fn, kw, opts, sig, consts, args, target) -> tuple[bool, list[str], Optional[tuple]]:
    failures: list[str] = []
    src, options = _specialized_source(fn, kw, opts, target)
    c = triton.compile(src, target=target, options=options)
    smem = c.metadata.shared
    if smem > SMEM_LIMIT.get(args.arch, 232448):
        failures.append(f"{fn.__name__} {opts} {_brief(sig, consts)}: needs {smem} B shared memory")
    mma, want = mma_kind(c.asm["ptx"]), expected_mma(fn.__name__, sig, args.arch, consts)
    if want is not None and mma != want:
        failures.append(f"{fn.__name__} {opts} {_brief(sig, consts)}: compiled to {mma}, "
                        f"expected {want} on sm_{args.arch}")
    sync = loop_tile_loads(c.asm["ttgir"])
    # A drain is allowed in an FMA loop (fp32 without tf32): moe_wgrad caps its stages
    # there, since pipelining deeper spills the register operands.
    drains = loop_drains(c.asm["ttgir"], bool(consts.get("PERSISTENT"))) if mma != "none" else 0
    if expects_pipelining(fn.__name__, consts, args.arch) and (sync or drains):
        failures.append(f"{fn.__name__} {opts} {_brief(sig, consts)}: "
                        + (f"{sync} tile load(s) in a loop not pipelined" if sync else
                           f"its loop waits for every copy or MMA each iteration ({drains}x)"))
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        stem = os.path.join(args.dump, f"{i + 1:03d}-{fn.__name__}")
        for ext in ("ttgir", "ptx"):
            with open(f"{stem}.{ext}", "w") as fh:
                fh.write(f"// {opts} {_brief(sig, consts)}\n{c.asm[ext]}")
        with open(f"{stem}.cubin", "wb") as fh:  # for nvdisasm / cuobjdump -sass
            fh.write(c.asm["cubin"])
    usage = None
    if args.regs:
        usage = (fn.__name__, opts, _brief(sig, consts),
                 {**resource_usage(c.asm["cubin"]), "SHARED": smem, "MMA": mma})
    return True, failures, usage


def features(fn, sig: dict, consts: dict, opts: dict) -> set:
    """What one variant exercises: its kernel, each argument's type, each constexpr's value,
    and its launch options (warps, stages)."""
    name = fn.__name__
    return ({(name,)} | {(name, "arg", k, v) for k, v in sig.items() if v != "constexpr"}
            | {(name, "const", k, str(v)) for k, v in consts.items()} | {(name, "opt", k, v) for k, v in opts.items()})


def cover(variants: list) -> list:
    """The variants a greedy set cover keeps: fewest (near enough) that together still compile
    every kernel with each argument type, constexpr value and launch option any variant has.

    Each variant's combination is not kept; ``--all`` or the default (every first config) compile
    those, as does a GPU run of the kernel tests."""
    feats = [features(fn, sig, consts, opts) for fn, _, opts, sig, consts in variants]
    left, keep = set().union(*feats), []
    while left:
        best = max(range(len(variants)), key=lambda i: (len(feats[i] & left), -i))
        keep.append(best)
        left -= feats[best]
    return [variants[i] for i in sorted(keep)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="compile every autotune config (slow)")
    ap.add_argument("--cover", action="store_true",
                    help="compile only a set cover of the first configs: every kernel, argument type, "
                         "constexpr value and launch option at least once")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--regs", action="store_true", help="print registers and spills of every variant")
    ap.add_argument("--dump", metavar="DIR", help="write each variant's TTGIR, PTX and cubin to DIR")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile in this many forked processes (default: one per CPU)")
    ap.add_argument("--kernel", metavar="NAME", action="append",
                    help="compile only this kernel's variants (e.g. _dh_kernel; may repeat)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("aot_compile: unset TRITON_INTERPRET (the compiler, not the interpreter, is checked)")

    import blazec.kernels._common as common
    from blazec.kernels import moe_combine, moe_experts, moe_route

    assert not common.INTERPRET
    # The pruner sizes configs for the GPU it runs on; here, for the target architecture.
    common.SMEM_BUDGET = common.smem_budget_for(SMEM_LIMIT.get(args.arch, 232448))
    log: list = []
    shared_keys: list[str] = []
    # The real autotuners restore what a timed run may change (tests/kernels/test_moe_experts.py
    # emulates the reruns under the interpreter with the same lists).
    from blazec.kernels import moe_grouped_gemm

    if list(moe_grouped_gemm.dh_tuned.restore_value) != list(moe_grouped_gemm.DH_RESTORE):
        shared_keys.append(f"_dh_kernel's autotuner restores {moe_grouped_gemm.dh_tuned.restore_value}, "
                           f"not DH_RESTORE {moe_grouped_gemm.DH_RESTORE}")
    moe_experts.launch = _record_launch(log, args.all, shared_keys)
    for mod, name in ((moe_route, "_route_count_kernel"), (moe_route, "_route_scan_kernel"),
                      (moe_route, "_route_scatter_kernel"), (moe_combine, "_combine_kernel"),
                      (moe_combine, "_dtw_kernel")):
        setattr(mod, name, _Recorder(log, getattr(mod, name)))

    for name, spec in cases():
        if spec[0] == "route":
            # the launches are recorded, not run: the id range flag the assert reads is unset
            assert_async, torch._assert_async = torch._assert_async, lambda *a: None
            try:
                moe_route.moe_route(*spec[1:])
            finally:
                torch._assert_async = assert_async
            continue
        _, x, tw, route, ws, act, wp, rec = spec
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if "tf32" in name else "highest")
        try:
            y, preact = moe_experts.moe_experts_fwd(x, tw, *route, *ws, act, wp, rec, None)
            # Both ways of computing dWg and dWu, except dual on the FMA path, which never runs it
            for impl in ("single",) if name.startswith("fp32") and "tf32" not in name else ("single", "dual"):
                moe_experts.GATE_UP_FORCE = impl
                moe_experts.moe_experts_bwd(torch.randn_like(y), x, tw, *route, *ws, preact, act, wp, rec)
            # the fused dh kernel (BLAZEC_DH=fused; split, the default, ran above)
            os.environ["BLAZEC_DH"] = "fused"
            moe_experts.moe_experts_bwd(torch.randn_like(y), x, tw, *route, *ws, preact, act, wp, rec)
            if tw.dtype != x.dtype:  # a grad_y in the routing weights' wider dtype: its rows scaled (GY_SCALE)
                moe_experts.moe_experts_bwd(torch.randn_like(y, dtype=tw.dtype), x, tw, *route, *ws, preact, act, wp,
                                            rec)
            # and, with the fused dh kept, the opt-in paths, each a forward and a backward: the
            # split GEMM 1 (the gathered row GEMMs and _act_kernel), GEMM 1's interleaved
            # gate|up tile (GU_WIDE), and the persistent row GEMMs (with the split GEMM 1, so
            # that each single-product row GEMM runs persistent), with the gated dX's one K
            # loop (CAT) as tiles and persistent, and GEMM 1's weights through tensor
            # descriptors (B_DESC)
            for env in ({"BLAZEC_GEMM1": "split"}, {"BLAZEC_GEMM1": "wide", "BLAZEC_DX": "cat"}, {"BLAZEC_GEMM1": "tma"},
                        {"BLAZEC_GEMM1": "split", "BLAZEC_ROWS": "persistent", "BLAZEC_DX": "cat"}):
                os.environ.update(env)
                y, preact = moe_experts.moe_experts_fwd(x, tw, *route, *ws, act, wp, rec, None)
                moe_experts.moe_experts_bwd(torch.randn_like(y), x, tw, *route, *ws, preact, act, wp, rec)
        finally:
            torch.set_float32_matmul_precision(precision)
            moe_experts.GATE_UP_FORCE = None
            os.environ.pop("BLAZEC_DH", None)
            os.environ.pop("BLAZEC_GEMM1", None)
            os.environ.pop("BLAZEC_ROWS", None)
            os.environ.pop("BLAZEC_DX", None)

    target = GPUTarget("cuda", args.arch, 32)
    seen, variants = set(), []
    for fn, kw, opts_list in log:
        if args.kernel and fn.__name__ not in args.kernel:
            continue
        sig, consts = _signature(fn, kw)
        for opts in opts_list:
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
                   tuple(sorted(opts.items())))
            if key not in seen:
                seen.add(key)
                variants.append((fn, kw, opts, sig, consts))
    if args.cover:
        n_all = len(variants)
        variants = cover(variants)
        print(f"aot_compile: --cover keeps {len(variants)} of {n_all} variants")
    t0 = time.time()
    global _VARIANTS, _ARGS, _TARGET
    _VARIANTS, _ARGS, _TARGET = variants, args, target
    jobs = max(1, min(args.jobs, len(variants)))
    if jobs > 1:  # forked workers inherit the variants; each returns plain strings and numbers
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_check_variant, range(len(variants)), chunksize=1)
    else:
        results = [_check_variant(i) for i in range(len(variants))]
    n_ok = sum(r[0] for r in results)
    failures = list(shared_keys) + [f for r in results for f in r[1]]
    usage = [r[2] for r in results if r[2] is not None]
    print(f"aot_compile: {n_ok} kernel variants compiled for cuda:{args.arch} with triton {triton.__version__} "
          f"in {time.time() - t0:.0f} s; {len(failures)} failure(s)")
    for f in failures:
        print("  FAIL", f)
    if usage:
        def spills(ru: dict) -> bool:
            return bool(ru.get("LOCAL", 0) or ru.get("STACK", 0))

        print(f"resource usage ({sum(spills(u[3]) for u in usage)} of {len(usage)} variants use local memory):")
        for name, opts, brief, ru in usage:
            flag = "  SPILL" if spills(ru) else ""
            print(f"  {name:22s} w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)} {brief}: "
                  f"REG {ru.get('REG')} LOCAL {ru.get('LOCAL')} STACK {ru.get('STACK')} "
                  f"SHARED {ru.get('SHARED')} MMA {ru['MMA']}{flag}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
