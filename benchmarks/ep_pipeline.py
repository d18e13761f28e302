"""Wall time of an expert-parallel MoE step on local gloo ranks: pipelined against not.

    python benchmarks/ep_pipeline.py                    # 2 ranks, defaults below
    python benchmarks/ep_pipeline.py --ranks 2 --tokens 2048 --d 1024 --inter 512   # compute-bound
    python benchmarks/ep_pipeline.py --rows serial,2    # two of the four rows

Each rank trains the naive loop MoE block (blazec.demo_model) on its own batch with
``expert_parallel="world"`` and prints the median forward+backward time for:

- ``ep_chunks=1`` with the ``comm_overlap`` pass off (every wait right after its collective),
- ``ep_chunks=1`` with it on,
- ``ep_chunks=2`` and ``4`` with it on (dispatch of chunk i+1 and return of chunk i-1 in flight
  while chunk i's experts run).

The payload is d floats per routed row, so a large ``--d`` makes the all_to_alls slow relative
to the experts' compute. This is a printout, not a test: gloo on a CPU shares the cores with
the compute, so how much overlap shows depends on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from blazec.local_ranks import spawn_gloo

# --rows key -> (row name, blaze options)
ROWS = {
    "serial": ("chunks=1, no overlap pass", {"ep_chunks": 1, "disable_passes": ["comm_overlap"]}),
    "1": ("chunks=1", {"ep_chunks": 1}),
    "2": ("chunks=2", {"ep_chunks": 2}),
    "4": ("chunks=4", {"ep_chunks": 4}),
}


def _rank(rank: int, world: int, args) -> None:
    from blazec.demo_model import NaiveMoEBlock

    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.d, generator=torch.Generator().manual_seed(rank))
    rows = []
    for name, opts in (ROWS[key] for key in args.rows):
        torch.manual_seed(0)
        model = NaiveMoEBlock(d=args.d, inter=args.inter, num_experts=args.experts)
        torch._dynamo.reset()
        fn = torch.compile(model, backend="blaze", options={
            "expert_parallel": "world", "final_stage": args.final_stage, **opts})
        times = []
        for step in range(args.warmup + args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            fn(x).float().pow(2).mean().backward()
            dist.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        rows.append((name, statistics.median(times)))
    if rank == 0:
        base = rows[0][1]
        print(f"{world} gloo ranks, {args.tokens} tokens/rank, d={args.d}, inter={args.inter}, "
              f"E={args.experts}, top-2, {args.threads} thread(s)/rank, final_stage={args.final_stage}, "
              f"torch {torch.__version__}")
        print(f"{'variant':<28} {'median step (ms)':>17} {'vs first':>9}")
        for name, t in rows:
            print(f"{name:<28} {t * 1e3:>17.1f} {t / base:>8.2f}x")


def _rows(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in ROWS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown row(s) {bad or [text]}: choose from {', '.join(ROWS)}")
    return sorted(set(keys), key=list(ROWS).index)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--inter", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--final-stage", choices=["inductor", "eager"], default="inductor")
    p.add_argument("--rows", type=_rows, default=list(ROWS),
                   help=f"comma-separated rows to run, in the table's order (default: {','.join(ROWS)})")
    args = p.parse_args()
    spawn_gloo(_rank, args.ranks, args, threads=args.threads, timeout_s=600)


if __name__ == "__main__":
    main()
