"""Host time of the blaze MoE ops' Python and autograd path, with the Triton launches stubbed.

On a GPU the step's time less its kernels' time is time the GPU waited for the host; this
measures the host's share of it without a GPU: ``moe_route`` and ``moe_experts`` run forward and
backward through torch.library and autograd on CPU tensors, with the CUDA implementations
(``blazec.kernels.moe_experts.cuda_impls``) registered for the CPU and every kernel launch
replaced by a no-op. Triton's own launch cost is not included.

    python benchmarks/host_overhead.py [--tokens 256] [--experts 64] [--form list|stacked]
    python benchmarks/host_overhead.py --compiled --tokens 8   # the compiled loop model's timeline

Needs triton installed (the kernels module is imported; nothing is compiled or launched).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def stub_launches() -> list:
    """Register the kernel implementations for the CPU with every launch a no-op. Returns the
    list of launches, each ``(kernel name, time.perf_counter() when the host issued it)``."""
    from blazec.kernels import moe_combine, moe_experts as kx, moe_route as kr, wgrad_grouped_mm
    from blazec.ops import _registry

    launches: list = []

    def note(name: str) -> None:
        launches.append((name, time.perf_counter()))

    class Kernel:  # kernel[grid](...) runs ``fn``
        def __init__(self, name, fn=None):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                note(self.name)
                if self.fn is not None:
                    self.fn(*args, **kwargs)
            return run

    def launch(kernel, tuned, grid, args, fixed):  # _common.launch's signature
        note(getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "kernel"))

    kx.launch = launch

    def grouped_mm(a, b, offs):  # BLAZEC_WGRAD=grouped_mm's GEMM: its output, uncomputed
        note("grouped_mm")
        return torch.empty((offs.numel(), a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)

    wgrad_grouped_mm.grouped_mm = grouped_mm
    # its row gather too: the stubbed route kernels leave sorted_pairs unwritten
    wgrad_grouped_mm.sorted_rows = lambda src, sorted_pairs, k: src.new_empty((sorted_pairs.shape[0], src.shape[1]))
    for mod, names in ((moe_combine, ("_combine_kernel", "_dtw_kernel")),
                       (kr, ("_route_count_kernel", "_route_scatter_kernel"))):
        for name in names:
            setattr(mod, name, Kernel(name))

    def scan(counts, base, offsets, ok, *args, **kwargs):  # its id-range flag, for the assert after it
        ok.fill_(True)

    kr._route_scan_kernel = Kernel("_route_scan_kernel", scan)
    for op, fn in kx.cuda_impls().items():
        _registry.register_impl(op, "cpu", fn)
    return launches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--form", choices=("list", "stacked"), default="list",
                    help="per-expert weight lists (what the loop model gives) or stacked weights")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compiled", action="store_true",
                    help="time the bench's loop model compiled with blaze instead, and print when "
                         "the host issued each launch of a step (its router runs for real on the "
                         "CPU: a small --tokens keeps that short)")
    args = ap.parse_args(argv)
    if min(args.tokens, args.experts, args.dim, args.hidden, args.topk, args.steps) < 1:
        ap.error("every size and --steps must be at least 1")
    if args.topk > args.experts:
        ap.error(f"--topk {args.topk} exceeds --experts {args.experts}")
    if args.compiled and args.form != "list":
        ap.error("--compiled times the loop model, whose expert weights are lists: leave out --form")
    if args.compiled:
        return compiled_timeline(args)

    from blazec.ops import moe_experts, moe_route

    launches = stub_launches()
    T, d, I, E, k = args.tokens, args.dim, args.hidden, args.experts, args.topk
    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(T, d, dtype=bf, requires_grad=True)
    if args.form == "list":
        wg = [torch.randn(I, d, dtype=bf, requires_grad=True) for _ in range(E)]
        wu = [torch.randn(I, d, dtype=bf, requires_grad=True) for _ in range(E)]
        wd = [torch.randn(d, I, dtype=bf, requires_grad=True) for _ in range(E)]
        params = [x, *wg, *wu, *wd]
    else:
        wg = torch.randn(E, I, d, dtype=bf, requires_grad=True)
        wu = torch.randn(E, I, d, dtype=bf, requires_grad=True)
        wd = torch.randn(E, d, I, dtype=bf, requires_grad=True)
        params = [x, wg, wu, wd]
    tw, ids = torch.topk(torch.randn(T, E).softmax(-1), k)
    tw = tw.to(bf).requires_grad_()
    params.append(tw)

    def step() -> tuple[float, float]:
        for p in params:
            p.grad = None  # as a training step after zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        sp, eo, pp = moe_route(ids, E)
        y = moe_experts(x, tw, sp, eo, pp, wg, wu, wd, None, None, None, "swiglu")
        t1 = time.perf_counter()
        y.backward(torch.ones_like(y))
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    for _ in range(3):
        step()
    n0 = len(launches)
    times = [step() for _ in range(args.steps)]
    per_step = (len(launches) - n0) // args.steps
    fwd = statistics.median(t[0] for t in times)
    bwd = statistics.median(t[1] for t in times)
    # The fastest step too: on a shared 2-core machine the medians of two runs can differ by
    # half, the fastest steps much less.
    fwd_min, bwd_min = min(t[0] for t in times), min(t[1] for t in times)
    print(f"host_overhead: T={T} d={d} I={I} E={E} k={k} bf16, {args.form} weights, torch {torch.__version__}: "
          f"forward {fwd:.3f} ms, backward {bwd:.3f} ms of host time per step (median of {args.steps}; "
          f"fastest {fwd_min:.3f} / {bwd_min:.3f} ms; {per_step} kernel launches stubbed per step)")
    return 0


def compiled_timeline(args) -> int:
    """The host's timeline of one training step of the compiled loop model: when each stubbed
    launch was issued, from the step's start. On a GPU a step that starts idle (the bench syncs
    between steps) waits for the host until the first long kernel (GEMM 1) is queued; what the
    host does before that launch is the step's exposed host time."""
    import os

    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")  # time this code, not a cached graph's
    from blazec import backend  # noqa: F401  (registers the backend)
    from blazec.bench import LoopMoE

    launches = stub_launches()
    T, d, I, E, k = args.tokens, args.dim, args.hidden, args.experts, args.topk
    torch.manual_seed(0)
    model = torch.compile(LoopMoE(d, I, E, k).to(torch.bfloat16), backend="blaze")
    x = torch.randn(T, d, dtype=torch.bfloat16, requires_grad=True)

    def step() -> list:
        model.zero_grad(set_to_none=True)
        x.grad = None
        n0 = len(launches)
        t0 = time.perf_counter()
        out = model(x)
        launches.append(("(forward returned)", time.perf_counter()))
        out.float().pow(2).mean().backward()
        launches.append(("(backward returned)", time.perf_counter()))
        return [(name, (t - t0) * 1e3) for name, t in launches[n0:]]

    for _ in range(3):
        step()
    steps = [step() for _ in range(args.steps)]
    names = [name for name, _ in steps[0]]
    if any([name for name, _ in s] != names for s in steps):
        raise SystemExit("host_overhead: the steps launched different kernels; no timeline")
    print(f"host_overhead --compiled: blaze-compiled loop model, T={T} d={d} I={I} E={E} k={k} bf16, "
          f"torch {torch.__version__}; ms from the step's start when the host issued each launch "
          f"(median of {args.steps} steps, launches stubbed):")
    prev = 0.0
    for i, name in enumerate(names):
        at = statistics.median(s[i][1] for s in steps)
        print(f"  {at:8.3f}  (+{at - prev:6.3f})  {name}")
        prev = at
    if "_gemm1_kernel" in names:
        i = names.index("_gemm1_kernel")
        print(f"host time before GEMM 1's launch: {statistics.median(s[i][1] for s in steps):.3f} ms "
              f"(fastest {min(s[i][1] for s in steps):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
