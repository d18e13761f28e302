"""Peak and after-forward memory of blazec's kernel path, measured on CPU with the launches stubbed.

``blazec bench`` measures peak memory on a GPU with ``torch.cuda.max_memory_allocated``. Which
buffers the step allocates, and when it frees them, is decided on the host: by the ops'
launchers (``blazec.kernels``), by autograd and by the compiled graphs. This script runs that
host path at full size on CPU tensors, with the Triton kernels' implementations registered for
the CPU and every kernel launch replaced by a no-op (as ``host_overhead.py`` does), and reads the
CPU allocator's running total from the profiler's allocation events. Nothing is computed by
the stubbed kernels and their buffers are never touched, so a mixtral-like step needs little
real memory.

    python benchmarks/peak_memory.py [--shape mixtral-like] [--recompute] [--wgrad triton] [--trace MIB]

It builds the bench's loop model, compiles it with ``backend="blaze"`` and reports, for one
forward + backward of ``out.float().pow(2).mean()`` after a warm-up step, as the bench does:
- peak: the highest allocated total during the step, above weights and inputs;
- act: what the step still holds after forward, less the output.

The router, the loss and everything outside the blaze ops run for real (Inductor's CPU code),
so their buffers can differ slightly from a GPU run's; the expert buffers are the kernels'.
Needs triton installed (the kernels module is imported; nothing is compiled or launched).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

GiB = 1024**3


def _allocations(prof) -> list[tuple[int, int, int, str]]:
    """(time ns, bytes, allocated total after it, the ops it ran in, innermost first) of every
    CPU allocation and free, in order."""
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        stack.extend(n.children)
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu":
            f = n.extra_fields
            out.append((n.start_time_ns, f.alloc_size, f.total_allocated, _ops(n)))
    out.sort()
    return out


def _ops(node, depth: int = 3) -> str:
    names, p = [], node.parent
    while p is not None and len(names) < depth:
        names.append(p.name)
        p = p.parent
    return " < ".join(names)


def _trace_lines(events, base: int, min_bytes: int) -> list[str]:
    """One line per allocation or free of at least ``min_bytes``: its size, the running total
    above ``base`` after it, and the ops it ran in; the peak's line is marked."""
    peak = max(e[2] for e in events)
    lines = []
    for _, size, total, ops in events:
        if abs(size) >= min_bytes or total == peak:
            mark = "  <- peak" if total == peak else ""
            lines.append(f"{size / 2**20:+10.1f} MiB  total {(total - base) / 2**20:9.1f} MiB  {ops}{mark}")
    return lines


def measure(shape: tuple[int, int, int, int, int], recompute: bool, wgrad: str = "grouped_mm",
            trace_mib: Optional[float] = None) -> dict[str, Any]:
    """{"peak_gib", "act_gib"} of one step of the compiled loop model at ``shape`` (and with
    ``trace_mib``, "trace": the step's allocations and frees of at least that many MiB, in
    order, as ``_trace_lines`` writes them); ``wgrad``
    "grouped_mm" takes the weight-gradient path a Hopper GPU takes in bf16 by default
    (kernels/wgrad_grouped_mm.py; its GPU checks bypassed, to count its sorted row copies),
    "triton" the Triton kernel's (``BLAZEC_WGRAD=triton``, and the default elsewhere)."""
    from torch.profiler import ProfilerActivity, profile

    from blazec.bench import LoopMoE

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host_overhead import stub_launches

    stub_launches()
    from blazec.kernels import wgrad_grouped_mm

    wgrad_grouped_mm.use = lambda x, d, I: wgrad == "grouped_mm"
    T, d, I, E, k = shape
    with torch.device("meta"):
        model = LoopMoE(d, I, E, k).to(torch.bfloat16)
    model = model.to_empty(device="cpu")  # expert weights stay untouched
    with torch.no_grad():
        model.gate.weight.normal_(std=d ** -0.5)  # the router runs for real
    x = torch.randn(T, d, dtype=torch.bfloat16, requires_grad=True)
    opts = {"moe_recompute": "recompute_gemm1"} if recompute else {}
    compiled = torch.compile(model, backend="blaze", options=opts)

    def fresh():
        model.zero_grad(set_to_none=True)
        x.grad = None

    fresh()
    compiled(x).float().pow(2).mean().backward()  # compiles
    fresh()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = compiled(x)
        marker = torch.empty(_MARK, dtype=torch.uint8)  # its allocation marks the end of forward
        del marker
        out.float().pow(2).mean().backward()
    events = _allocations(prof)
    if not events:
        raise RuntimeError("the profiler recorded no CPU allocations")
    base = events[0][2] - events[0][1]
    marks = [i for i, e in enumerate(events) if e[1] == _MARK]
    if len(marks) != 1:
        raise RuntimeError(f"found {len(marks)} forward-end markers among the allocations, expected 1")
    before_mark = events[marks[0]][2] - _MARK
    act = before_mark - base - out.untyped_storage().nbytes()
    peak = max(e[2] for e in events) - base
    out = {"peak_gib": peak / GiB, "act_gib": act / GiB}
    if trace_mib is not None:
        out["trace"] = _trace_lines(events, base, int(trace_mib * 2**20))
    return out


_MARK = 1234577  # bytes: an allocation size nothing else in the step has


def main(argv=None) -> int:
    from blazec.bench import BenchError, parse_shape

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mixtral-like", help="olmoe-like, mixtral-like or T,d,I,E,k")
    ap.add_argument("--recompute", action="store_true", help='moe_recompute="recompute_gemm1"')
    ap.add_argument("--wgrad", choices=("triton", "grouped_mm"), default="grouped_mm",
                    help="weight-gradient path to measure: grouped_mm (default: a Hopper GPU's in "
                         "bf16) or triton (BLAZEC_WGRAD=triton, and other GPUs')")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--trace", type=float, metavar="MIB", default=None,
                    help="also list the step's allocations and frees of at least MIB MiB in order, "
                         "with the running total and the ops they ran in (the peak is marked)")
    args = ap.parse_args(argv)
    if args.trace is not None and not args.trace >= 0:
        ap.error(f"--trace must be a size in MiB, at least 0; got {args.trace}")
    try:
        name, shape = parse_shape(args.shape, on_cuda=True)
    except BenchError as e:
        ap.error(str(e))
    r = measure(shape, args.recompute, args.wgrad, args.trace)
    if args.json:
        print(json.dumps({"shape": list(shape), "recompute": args.recompute, "wgrad": args.wgrad, **r}))
        return 0
    mode = ("recompute GEMM 1" if args.recompute else "default") + (
        f", {args.wgrad} weight gradients")
    print(f"peak_memory: {name} {shape} bf16, blazec on the loop model ({mode}), torch "
          f"{torch.__version__}, launches stubbed on CPU: peak {r['peak_gib']:.3f} GiB "
          f"({r['peak_gib'] * 1024:.1f} MiB), act {r['act_gib']:.3f} GiB ({r['act_gib'] * 1024:.1f} MiB)")
    if args.trace is not None:
        print(f"allocations (+) and frees (-) of at least {args.trace:g} MiB, in order; total above "
              f"the step's start:")
        print("\n".join(r["trace"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
