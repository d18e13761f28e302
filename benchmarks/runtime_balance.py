"""Benchmark of blazec.runtime.balance: partition time and bubble reduction.

Prints two Markdown tables:

1. Wall time of each partition method for n samples into k parts (median of repeats), with
   costs from Zipf(1.2) lengths up to 4096 under the transformer cost ``L + L^2/6144``.
2. Bubble fraction of random assignment, sorted round-robin, LPT and Karmarkar-Karp at 256
   ranks x 32 samples (FreeScale's setting), with and without equal counts, and KK balancing by
   token count alone scored under the true cost.

Run: ``python benchmarks/runtime_balance.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

from blazec.runtime.balance import CostModel, partition
from blazec.runtime.balance_sim import format_table, sample_lengths, simulate


def time_partitions(sizes: list[tuple[int, int]], methods: list[tuple[str, bool]], repeats: int) -> list[str]:
    # CPU time of this process next to wall time: on a shared machine the wall time also
    # counts time the process waited for a core.
    rows = ["| n | parts | method | equal counts | median wall ms | min wall ms | median CPU ms |", "|---|---|---|---|---|---|---|"]
    cost = CostModel.transformer()
    jobs = [(n, k, m, eq) for n, k in sizes for m, eq in methods]
    for n, k, m, eq in tqdm(jobs, desc="partition timing", file=sys.stderr):
        L = sample_lengths("zipf:1.2", n, 4096, torch.Generator().manual_seed(n + k))
        costs = cost(L).tolist()
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            partition(costs, k, m, equal_counts=eq)
            times.append(1000 * (time.perf_counter() - t0))
            cpu.append(1000 * (time.process_time() - c0))
        rows.append(f"| {n:,} | {k} | {m} | {'yes' if eq else 'no'} | {statistics.median(times):.1f} | {min(times):.1f} "
                    f"| {statistics.median(cpu):.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="simulated global batches per bubble row")
    p.add_argument("--big", action="store_true", help="also time n = 1,000,000")
    p.add_argument("--timing-only", action="store_true", help="skip the bubble tables")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    sizes = [(8192, 256), (100_000, 256), (100_000, 1024)] + ([(1_000_000, 256)] if args.big else [])
    methods = [("kk", False), ("kk", True), ("lpt", False), ("greedy", False), ("sorted_rr", False)]
    print("## Partition time (Zipf(1.2) lengths, max 4096, cost L + L^2/6144)\n")
    print("\n".join(time_partitions(sizes, methods, args.repeats)))

    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    print(f"\n(1-minute load average after the timing: {load}; other processes share the cores)")
    if args.timing_only:
        return 0
    cost = CostModel.transformer()
    for eq in (False, True):
        res = simulate(256, 32, "zipf:1.2", 4096, cost, steps=args.steps, seed=0, equal_counts=eq, progress=True)
        print(f"\n## Bubble, 256 ranks x 32 samples, zipf:1.2, max 4096, cost {cost}, {args.steps} steps"
              + (", equal counts" if eq else "") + "\n")
        print(format_table(res))
    print("\n## Bubble reduction of KK against random by scale (zipf:1.2, max 4096, 32 per rank)\n")
    print("| ranks | random | kk | reduction | kk (tokens) | reduction (tokens) |")
    print("|---|---|---|---|---|---|")
    for ranks in tqdm([8, 32, 128, 256, 1024], desc="scale", file=sys.stderr):
        r = simulate(ranks, 32, "zipf:1.2", 4096, cost, steps=args.steps, seed=1, methods=("random", "kk"))
        b = r.bubbles
        print(f"| {ranks} | {100 * b['random']:.2f}% | {100 * b['kk']:.3f}% | {100 * r.reduction('kk'):.2f}% "
              f"| {100 * b['kk (tokens)']:.2f}% | {100 * r.reduction('kk (tokens)'):.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
