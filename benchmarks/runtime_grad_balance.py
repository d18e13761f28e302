"""Benchmark of blazec.runtime.grad_balance: training throughput and multi-task quality.

1. Throughput on CPU of a shared-bottom model whose shared MLP dominates the compute, for
   ``equal`` (summed loss), ``magnitude`` and ``mgda`` in representation mode (MultiBalance)
   and in parameter mode (one backward of the shared bottom per task). Methods run in
   interleaved rounds so that load from other processes hits all of them alike; the table
   shows the median steps/s over rounds and the ratio to ``equal``.
2. Quality on the MMoE synthetic generator (``blazec.runtime.synthetic``): final test loss of
   each task, normalised by its label variance, for task correlations p and two label-scale
   settings, over a fixed seed set (mean and standard deviation over seeds).

Run: ``python benchmarks/runtime_grad_balance.py`` (about 10 minutes on 2 CPU cores;
``--skip-quality`` for throughput only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._functorch.config
from torch import nn
from tqdm import tqdm

from blazec.runtime.grad_balance import GradBalancer
from blazec.runtime.synthetic import SharedBottom, mmoe_synthetic, train_multitask

CONFIGS = [
    ("equal", "rep"),
    ("magnitude", "rep"),
    ("mgda", "rep"),
    ("magnitude", "param"),
    ("mgda", "param"),
]


def throughput(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = SharedBottom(args.in_dim, [args.hidden] * args.layers, args.rep_dim, args.tasks, head_hidden=32)
    if args.compile:
        # param mode runs T backward passes over one graph (retain_graph=True), which
        # Inductor's compiled backward refuses while it donates its saved buffers.
        torch._functorch.config.donated_buffer = False
        model.shared = torch.compile(model.shared)
        model.heads = nn.ModuleList(torch.compile(h) for h in model.heads)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.in_dim)
    ys = [torch.randn(args.batch, 1) * (t + 1) for t in range(args.tasks)]
    balancers = {c: GradBalancer(args.tasks, c[0], mode=c[1]) for c in CONFIGS}

    def step(bal: GradBalancer) -> None:
        rep, preds = model(x)
        losses = [nn.functional.mse_loss(p, y) for p, y in zip(preds, ys)]
        opt.zero_grad(set_to_none=True)
        bal.backward(losses, rep)
        opt.step()

    for bal in balancers.values():  # warm-up (and compilation)
        for _ in range(3):
            step(bal)
    rates: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
    for _ in tqdm(range(args.rounds), desc="throughput rounds", file=sys.stderr):
        for c, bal in balancers.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(bal)
            rates[c].append(args.steps / (time.perf_counter() - t0))
    shared_flops = 2 * args.batch * sum(a * b for a, b in zip(
        [args.in_dim] + [args.hidden] * args.layers, [args.hidden] * args.layers + [args.rep_dim]))
    head_flops = 2 * args.batch * args.tasks * (args.rep_dim * 32 + 32)
    print(f"\n## Throughput: batch {args.batch}, shared MLP {args.in_dim}->{'->'.join([str(args.hidden)] * args.layers)}"
          f"->{args.rep_dim}, {args.tasks} heads {args.rep_dim}->32->1, forward FLOPs shared {shared_flops / 1e9:.2f} G"
          f" vs heads {head_flops / 1e6:.2f} M, {torch.get_num_threads()} thread(s)"
          + (", torch.compile" if args.compile else "") + f", median of {args.rounds} rounds x {args.steps} steps\n")
    base = statistics.median(rates[("equal", "rep")])
    print("| method | mode | steps/s | vs equal |\n|---|---|---|---|")
    for c in CONFIGS:
        r = statistics.median(rates[c])
        print(f"| {c[0]} | {'-' if c[0] == 'equal' else c[1]} | {r:.2f} | {r / base:.3f}x |")


def quality(args: argparse.Namespace) -> None:
    settings = [(p, sc) for sc in ((1.0, 1.0), (1.0, 0.1)) for p in args.correlations]
    methods = ("equal", "magnitude", "mgda")
    jobs = [(p, sc, m, seed) for p, sc in settings for m in methods for seed in range(args.seeds)]
    res: dict[tuple, list[list[float]]] = {}
    for p, sc, m, seed in tqdm(jobs, desc="quality runs", file=sys.stderr):
        train = mmoe_synthetic(args.n_train, p, seed=1000 + seed, task_seed=seed, scales=sc)
        test = mmoe_synthetic(4096, p, seed=2000 + seed, task_seed=seed, scales=sc)
        final = train_multitask(train, test, GradBalancer(2, m), steps=args.train_steps, seed=seed)
        res.setdefault((p, sc, m), []).append(final)
    print(f"\n## Quality: MMoE synthetic, 2 tasks, test MSE / label variance, {args.seeds} seeds "
          f"(0..{args.seeds - 1}), {args.train_steps} Adam steps, shared 100->64->16, heads 16->8->1\n")
    print("| label scales | p | method | task 1 | task 2 | worse task (mean ± sd) | worse vs equal | seeds better than equal |")
    print("|---|---|---|---|---|---|---|---|")
    for p, sc in settings:
        base_runs = [max(r) for r in res[(p, sc, "equal")]]
        base = statistics.mean(base_runs)
        for m in methods:
            rs = res[(p, sc, m)]
            worse = [max(r) for r in rs]
            t1 = statistics.mean(r[0] for r in rs)
            t2 = statistics.mean(r[1] for r in rs)
            mw, sd = statistics.mean(worse), statistics.stdev(worse) if len(worse) > 1 else 0.0
            rel = "-" if m == "equal" else f"{100 * (mw / base - 1):+.1f}%"
            # Paired by seed (same data, same initialisation): the seed spread is large, so
            # the count of seeds where the method beats equal says more than the means alone.
            wins = "-" if m == "equal" else f"{sum(w < b for w, b in zip(worse, base_runs))}/{len(worse)}"
            print(f"| {sc[0]:g}, {sc[1]:g} | {p:g} | {m} | {t1:.4f} | {t2:.4f} | {mw:.4f} ± {sd:.4f} | {rel} | {wins} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--in-dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rep-dim", type=int, default=256)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    ap.add_argument("--compile", action="store_true", help="torch.compile the shared bottom and heads")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--n-train", type=int, default=8192)
    ap.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_quality:
        quality(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
