"""Host time of the blaze MoE ops' Python and autograd path, with the Triton launches stubbed.

On a GPU the step's time less its kernels' time is time the GPU waited for the host; this
measures the host's share of it without a GPU: ``moe_route`` and ``moe_experts`` run forward and
backward through torch.library and autograd on CPU tensors, with the CUDA implementations
(``blazec.kernels.moe_experts.cuda_impls``) registered for the CPU and every kernel launch
replaced by a no-op. Triton's own launch cost is not included.

    python benchmarks/host_overhead.py [--tokens 256] [--experts 64] [--form list|stacked]

Needs triton installed (the kernels module is imported; nothing is compiled or launched).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def stub_launches() -> list:
    """Register the kernel implementations for the CPU with every launch a no-op."""
    from blazec.kernels import moe_combine, moe_experts as kx, moe_route as kr, wgrad_grouped_mm
    from blazec.ops import _registry

    launches: list = []

    def stub(*args, **kwargs):
        launches.append(1)

    class Kernel:  # kernel[grid](...) runs ``fn``
        def __init__(self, fn=stub):
            self.fn = fn

        def __getitem__(self, grid):
            return self.fn

    kx.launch = stub

    def grouped_mm(a, b, offs):  # BLAZEC_WGRAD=grouped_mm's GEMM: its output, uncomputed
        launches.append(1)
        return torch.empty((offs.numel(), a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)

    wgrad_grouped_mm.grouped_mm = grouped_mm
    # its row gather too: the stubbed route kernels leave sorted_pairs unwritten
    wgrad_grouped_mm.sorted_rows = lambda src, sorted_pairs, k: src.new_empty((sorted_pairs.shape[0], src.shape[1]))
    for mod, names in ((moe_combine, ("_combine_kernel", "_dtw_kernel")),
                       (kr, ("_route_count_kernel", "_route_scatter_kernel"))):
        for name in names:
            setattr(mod, name, Kernel())

    def scan(counts, base, offsets, ok, *args, **kwargs):  # its id-range flag, for the assert after it
        launches.append(1)
        ok.fill_(True)

    kr._route_scan_kernel = Kernel(scan)
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
    args = ap.parse_args(argv)
    if min(args.tokens, args.experts, args.dim, args.hidden, args.topk, args.steps) < 1:
        ap.error("every size and --steps must be at least 1")
    if args.topk > args.experts:
        ap.error(f"--topk {args.topk} exceeds --experts {args.experts}")

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


if __name__ == "__main__":
    raise SystemExit(main())
