"""Multi-task gradient balancing on the shared representation, end to end.

Trains a shared-bottom model on the MMoE synthetic generator (two regression tasks whose
correlation p you choose) with ``equal`` (summed losses), ``magnitude`` and ``mgda`` balancing
from ``blazec.runtime.grad_balance``, over several seeds, and prints the final test loss of
each task (MSE / label variance) with its spread. By default the second task's labels are 10x
smaller (``--scales 1 0.1``), so its gradients are too, as with tasks of different loss scales
in real recommenders: that is the imbalance these methods address, and there they cut the
worse task's loss several-fold. With equal scales (``--scales 1 1``) the synthetic tasks are
already balanced and the differences stay within the seed spread (see docs/RUNTIME.md). A PNG
of the worse task's test loss over training is written when matplotlib is installed.

With ``--movielens`` it also trains on the MovieLens-100K ratings that ship inside the recbole
wheel (``pip install --no-deps recbole``): shared user/item embeddings and MLP, tasks
"rating >= 4" and "rating == 5", reported as normalised entropy (log loss / entropy of the
base rate, lower is better).

    python examples/multitask_balance.py                       # ~2 minutes on 2 CPU cores
    python examples/multitask_balance.py --scales 1 1 --movielens
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys

import torch
from torch import nn
from tqdm import tqdm

from blazec.runtime.grad_balance import GradBalancer
from blazec.runtime.synthetic import mmoe_synthetic, train_multitask

METHODS = ("equal", "magnitude", "mgda")


def run_synthetic(args: argparse.Namespace, bar: tqdm) -> tuple[dict, dict]:
    """Final losses ``final[(p, method)] = [[task1, task2] per seed]`` and the worse-task curve
    ``curves[(p, method)] = [(step, mean over seeds)]``."""
    final: dict[tuple[float, str], list[list[float]]] = {}
    curves: dict[tuple[float, str], dict[int, list[float]]] = {}
    for p in args.correlations:
        for seed in range(args.seeds):
            train = mmoe_synthetic(8192, p, seed=1000 + seed, task_seed=seed, scales=args.scales)
            test = mmoe_synthetic(4096, p, seed=2000 + seed, task_seed=seed, scales=args.scales)
            for m in METHODS:
                curve = curves.setdefault((p, m), {})
                last = [0]

                def on_eval(step: int, losses: list[float], curve=curve, last=last) -> None:
                    curve.setdefault(step, []).append(max(losses))
                    bar.update(step - last[0])
                    last[0] = step

                out = train_multitask(train, test, GradBalancer(2, m), steps=args.steps, seed=seed, eval_every=50, on_eval=on_eval)
                final.setdefault((p, m), []).append(out)
    return final, {k: sorted((s, statistics.mean(v)) for s, v in c.items()) for k, c in curves.items()}


def print_table(title: str, final: dict, names: tuple[str, str], setting: str = "p") -> None:
    print(f"\n{title}\n")
    print(f"| {setting} | method | {names[0]} | {names[1]} | worse task (mean ± sd) | worse vs equal | seeds better |")
    print("|---|---|---|---|---|---|---|")
    for (p, m), rs in final.items():
        worse = [max(r) for r in rs]
        base_runs = [max(r) for r in final[(p, "equal")]]
        base = statistics.mean(base_runs)
        sd = statistics.stdev(worse) if len(worse) > 1 else 0.0
        rel = "-" if m == "equal" else f"{100 * (statistics.mean(worse) / base - 1):+.1f}%"
        wins = "-" if m == "equal" else f"{sum(w < b for w, b in zip(worse, base_runs))}/{len(worse)}"
        print(f"| {p} | {m} | {statistics.mean(r[0] for r in rs):.4f} | {statistics.mean(r[1] for r in rs):.4f} "
              f"| {statistics.mean(worse):.4f} ± {sd:.4f} | {rel} | {wins} |")


def plot(curves: dict, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    ps = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(1, len(ps), figsize=(4.2 * len(ps), 3.4), squeeze=False)
    for ax, p in zip(axes[0], ps):
        for m in METHODS:
            steps, vals = zip(*curves[(p, m)])
            ax.plot(steps, vals, label=m)
        ax.set_title(f"task correlation p = {p}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("worse task: test MSE / var(y)")
    axes[0][-1].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot saved to {path}")


# --- MovieLens-100K ------------------------------------------------------------------------


def load_movielens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user, item, rating) from recbole's bundled ml-100k.inter, without importing recbole
    (its runtime dependencies are not needed just to read the file)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--movielens needs the recbole wheel: pip install --no-deps recbole")
    path = os.path.join(list(spec.submodule_search_locations)[0], "dataset_example", "ml-100k", "ml-100k.inter")
    users, items, ratings = [], [], []
    with open(path) as f:
        next(f)  # header: user_id:token item_id:token rating:float timestamp:float
        for line in f:
            u, i, r, _ = line.split("\t")
            users.append(int(u))
            items.append(int(i))
            ratings.append(float(r))
    return torch.tensor(users), torch.tensor(items), torch.tensor(ratings)


class RatingModel(nn.Module):
    """Shared bottom: user and item embeddings, then an MLP; one logit head per task."""

    def __init__(self, n_users: int, n_items: int, dim: int = 32) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(2))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rep = self.mlp(torch.cat([self.user(u), self.item(i)], 1))
        return rep, [h(rep).squeeze(1) for h in self.heads]


def run_movielens(args: argparse.Namespace, bar: tqdm) -> dict:
    u, i, r = load_movielens()
    labels = torch.stack([(r >= 4).float(), (r == 5).float()], 1)
    final: dict[tuple[str, str], list[list[float]]] = {}
    bce = nn.functional.binary_cross_entropy_with_logits
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(r), generator=g)
        tr, te = perm[: int(0.8 * len(r))], perm[int(0.8 * len(r)) :]
        base = labels[tr].mean(0)
        entropy = [-(b * math.log(b) + (1 - b) * math.log(1 - b)) for b in base.tolist()]
        for m in METHODS:
            torch.manual_seed(seed)
            model = RatingModel(int(u.max()) + 1, int(i.max()) + 1)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            bal = GradBalancer(2, m)
            for _ in range(args.ml_epochs):
                for b in torch.randperm(len(tr), generator=g).split(1024):
                    idx = tr[b]
                    rep, logits = model(u[idx], i[idx])
                    opt.zero_grad(set_to_none=True)
                    bal.backward([bce(lg, labels[idx, t]) for t, lg in enumerate(logits)], rep)
                    opt.step()
                    bar.update(1)
            with torch.no_grad():
                _, logits = model(u[te], i[te])
                ne = [bce(lg, labels[te, t]).item() / entropy[t] for t, lg in enumerate(logits)]
            final.setdefault(("ml-100k", m), []).append(ne)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.9])
    ap.add_argument("--scales", type=float, nargs=2, default=[1.0, 0.1], help="label scale of each task (default 1 0.1)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="multitask_balance.png", help="PNG path for the plot")
    ap.add_argument("--movielens", action="store_true", help="also run on MovieLens-100K (needs recbole)")
    ap.add_argument("--ml-epochs", type=int, default=4)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 50:
        ap.error("need --seeds >= 1 and --steps >= 50")
    if any(not -1.0 <= p <= 1.0 for p in args.correlations):
        ap.error("--correlations must lie in [-1, 1]")
    if any(not (s > 0 and math.isfinite(s)) for s in args.scales):
        ap.error(f"--scales must be positive and finite, got {args.scales[0]:g} {args.scales[1]:g}")
    if args.ml_epochs < 1:
        ap.error(f"--ml-epochs must be >= 1, got {args.ml_epochs}")
    torch.set_num_threads(1)  # tiny model: extra threads only add synchronisation

    total = len(args.correlations) * args.seeds * len(METHODS) * args.steps
    with tqdm(total=total, desc="synthetic", unit="step", file=sys.stderr) as bar:
        final, curves = run_synthetic(args, bar)
    scales = f"label scales {args.scales[0]:g}, {args.scales[1]:g}"
    print_table(f"MMoE synthetic, {scales}, {args.seeds} seeds, {args.steps} steps: test MSE / var(y)", final, ("task 1", "task 2"))
    plot(curves, args.out, f"shared-bottom, {scales}, mean of {args.seeds} seeds")
    if args.movielens:
        steps = args.seeds * len(METHODS) * args.ml_epochs * math.ceil(80000 / 1024)
        with tqdm(total=steps, desc="movielens", unit="step", file=sys.stderr) as bar:
            ml = run_movielens(args, bar)
        print_table(f"MovieLens-100K, {args.seeds} seeds, {args.ml_epochs} epochs: normalised entropy", ml,
                    ("rating >= 4", "rating == 5"), setting="data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
