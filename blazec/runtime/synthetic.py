"""Synthetic multi-task data with controllable task correlation, and a shared-bottom model.

The generator is the one of the MMoE paper (Ma et al., KDD 2018, section 3.2), used to study
how task relatedness affects multi-task learning. Two regression tasks share the input
``x ~ N(0, I_d)``; their label weights have cosine similarity exactly ``p``:

    u_1, u_2 orthonormal,   w_1 = c u_1,   w_2 = c (p u_1 + sqrt(1 - p^2) u_2),
    y_t = w_t^T x + sum_{i=1..m} sin(alpha_i w_t^T x + beta_i) + eps_t,   eps_t ~ N(0, 0.01).

The sine terms make the tasks non-linear, so the Pearson correlation of the labels is only
close to ``p``; ``p`` itself controls how much the tasks conflict. ``scales`` multiplies each
task's labels, which makes the tasks' gradient magnitudes unequal, the case gradient
balancing is for. ``train_multitask`` trains a ``SharedBottom`` model with a ``GradBalancer``;
the example and the benchmark use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from blazec.runtime.grad_balance import GradBalancer


@dataclass
class MultiTaskData:
    """Inputs ``x`` (n, d) and labels ``ys`` (one (n, 1) tensor per task)."""

    x: torch.Tensor
    ys: list[torch.Tensor]


def mmoe_synthetic(
    n: int,
    correlation: float,
    *,
    dim: int = 100,
    c: float = 1.0,
    m: int = 10,
    scales: Sequence[float] = (1.0, 1.0),
    noise_std: float = 0.1,
    seed: int = 0,
    task_seed: int | None = None,
) -> MultiTaskData:
    """Draw ``n`` samples of the two-task MMoE generator with task correlation ``p``.

    ``task_seed`` fixes the task (u, alpha, beta) separately from the samples, so train and
    test sets of the same task are drawn with the same ``task_seed`` and different ``seed``.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if n < 1 or dim < 2:
        raise ValueError(f"need n >= 1 and dim >= 2, got n={n}, dim={dim}")
    if len(scales) != 2:
        raise ValueError(f"scales must have one entry per task (2), got {len(scales)}")
    gt = torch.Generator().manual_seed(seed if task_seed is None else task_seed)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gt, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    w = [c * u1, c * (correlation * u1 + math.sqrt(1.0 - correlation**2) * u2)]
    alpha = torch.randn(m, generator=gt, dtype=torch.float64)
    beta = torch.randn(m, generator=gt, dtype=torch.float64)
    gs = torch.Generator().manual_seed(seed + 1_000_003)
    x = torch.randn(n, dim, generator=gs, dtype=torch.float64)
    ys = []
    for wt, s in zip(w, scales):
        z = x @ wt
        y = z + torch.sin(alpha * z[:, None] + beta).sum(1) + noise_std * torch.randn(n, generator=gs, dtype=torch.float64)
        ys.append((s * y).float().unsqueeze(1))
    return MultiTaskData(x.float(), ys)


class SharedBottom(nn.Module):
    """``rep = bottom(x)`` (an MLP), then one small MLP head per task."""

    def __init__(self, in_dim: int, hidden: Sequence[int], rep_dim: int, num_tasks: int, head_hidden: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in [*hidden, rep_dim]:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(rep_dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1)) for _ in range(num_tasks)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rep = self.shared(x)
        return rep, [h(rep) for h in self.heads]


def train_multitask(
    train: MultiTaskData,
    test: MultiTaskData,
    balancer: GradBalancer,
    *,
    hidden: Sequence[int] = (64,),
    rep_dim: int = 16,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 100,
    on_eval: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Train a ``SharedBottom`` with Adam and MSE losses; return the test losses per task,
    each normalised by its label variance (1 - R^2), so tasks on different scales compare."""
    torch.manual_seed(seed)
    model = SharedBottom(train.x.shape[1], hidden, rep_dim, len(train.ys))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    var = [y.var().item() for y in test.ys]

    def evaluate() -> list[float]:
        with torch.no_grad():
            _, preds = model(test.x)
            return [nn.functional.mse_loss(p, y).item() / v for p, y, v in zip(preds, test.ys, var)]

    for step in range(1, steps + 1):
        idx = torch.randint(train.x.shape[0], (batch_size,), generator=g)
        rep, preds = model(train.x[idx])
        losses = [nn.functional.mse_loss(p, y[idx]) for p, y in zip(preds, train.ys)]
        opt.zero_grad(set_to_none=True)
        balancer.backward(losses, rep)
        opt.step()
        if on_eval is not None and (step % eval_every == 0 or step == steps):
            on_eval(step, evaluate())
    return evaluate()
