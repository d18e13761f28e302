"""Multi-task gradient balancing on the shared representation (MultiBalance).

A shared-bottom multi-task model computes ``rep = shared(x)`` and one loss per task head.
Balancing methods re-weight the tasks' gradients before they reach the shared bottom. Done on
the shared *parameters* (the classic way) it needs one full backward per task, T times the
cost of the bottom. MultiBalance does it on the shared *representation* instead:

1. for each task, a backward of ``L_t`` through head t only, stopping at ``rep``: it gives
   ``g_t = dL_t / d rep`` and the gradients of head t's parameters;
2. combine ``g = sum_t w_t g_t`` with a balancing rule;
3. one backward through the shared bottom, seeded with ``g``, which gives it ``J^T g``
   (``J = d rep / d theta_shared``); the same call accumulates the heads' gradients.

Every node of the graph is traversed once, as in ``sum(losses).backward()``: the extra cost
is the balancing arithmetic on ``rep``-sized tensors and T small backward calls instead of
one, so throughput stays close to plain summed-loss training. Usage::

    balancer = GradBalancer(num_tasks=2, method="magnitude")
    rep = model.shared(x)
    losses = [loss_fn(head(rep), y) for head, y in zip(model.heads, ys)]
    balancer.backward(losses, rep)
    optimizer.step()

Under DDP the per-task statistics (norms, Gram matrix) are all-reduced, so every rank uses the
same weights and the result equals single-process training on the global batch (with losses
that are means over the local batch, as DDP expects).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

from blazec.runtime._mgda import min_norm_weights

METHODS = ("equal", "magnitude", "mgda")
MODES = ("rep", "param")
TARGETS = ("mean", "max", "min")

TensorOrSeq = torch.Tensor | Sequence[torch.Tensor]


class GradBalancer:
    """Combine per-task gradients w.r.t. a shared representation, then backprop once.

    Methods (``w`` are the weights of the per-task gradients ``g_t``):

    * ``"equal"``: ``w_t = 1``, the plain sum of the losses (the baseline).
    * ``"magnitude"``: scale each task's gradient towards a common magnitude. With ``n_t`` the
      bias-corrected EMA of ``||g_t||`` (``m_t <- beta m_t + (1-beta) ||g_t||``,
      ``n_t = m_t / (1 - beta^k)`` after k updates), the target ``tau`` (the mean, max or min of
      the ``n_t``, or ``n_a`` of an anchor task index ``a``) and the relax factor ``r`` in [0, 1]:
      ``w_t = (1 - r) + r * tau / n_t``. ``r = 1`` gives every task the target magnitude,
      ``r = 0`` is ``equal``. The EMA smooths the noise of per-batch norms.
    * ``"mgda"``: ``w = T * alpha`` with ``alpha`` the min-norm convex combination of the ``g_t``
      (MGDA-UB on the representation; see ``blazec.runtime._mgda``). The factor T makes equal
      alphas match ``equal``. With ``mgda_normalize="l2"`` (default) the min-norm problem is
      solved on unit gradients ``g_t / ||g_t||`` (Gram ``G_ij / (n_i n_j)``), as Sener &
      Koltun do, and ``w_t = T alpha_t nbar / n_t`` with ``nbar`` the mean norm, so the
      combination keeps the overall gradient scale. Unnormalised MGDA (``"none"``) puts almost
      all the weight on the task with the smallest gradient when the tasks' scales differ.

    Modes:

    * ``"rep"`` (default): gradients w.r.t. ``rep``, as described in the module docstring.
    * ``"param"``: gradients w.r.t. the shared parameters, one full backward per task. It
      exists to measure what parameter-space balancing costs; it is single-process only, and
      since it backpropagates T times through one graph (``retain_graph=True``) it needs
      ``torch._functorch.config.donated_buffer = False`` with Inductor-compiled modules.

    Args:
        num_tasks: number of losses passed to ``backward``.
        method: one of ``METHODS``.
        mode: one of ``MODES``.
        beta: EMA decay of the gradient norms (``magnitude``), in [0, 1).
        relax: relax factor r (``magnitude``), in [0, 1].
        target: ``"mean"``, ``"max"``, ``"min"`` or the index of an anchor task (``magnitude``).
        mgda_normalize: ``"l2"`` or ``"none"`` (``mgda``).
        distributed: all-reduce the statistics across ranks; ``None`` means "when
            torch.distributed is initialised with more than one rank".
        group: process group for that all-reduce.
    """

    def __init__(
        self,
        num_tasks: int,
        method: str = "magnitude",
        *,
        mode: str = "rep",
        beta: float = 0.9,
        relax: float = 1.0,
        target: str | int = "mean",
        mgda_normalize: str = "l2",
        distributed: bool | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (isinstance(relax, (int, float)) and 0.0 <= relax <= 1.0):
            raise ValueError(f"relax must be in [0, 1], got {relax!r}")
        if isinstance(target, bool) or not (target in TARGETS or (isinstance(target, int) and 0 <= target < num_tasks)):
            raise ValueError(f"target must be one of {', '.join(TARGETS)} or a task index in [0, {num_tasks}), got {target!r}")
        if mgda_normalize not in ("l2", "none"):
            raise ValueError(f"mgda_normalize must be 'l2' or 'none', got {mgda_normalize!r}")
        self.num_tasks, self.method, self.mode = num_tasks, method, mode
        self.mgda_normalize = mgda_normalize
        self.beta, self.relax, self.target = float(beta), float(relax), target
        self.distributed, self.group = distributed, group
        self._ema: torch.Tensor | None = None  # EMA of per-task gradient norms
        self._count: torch.Tensor | None = None  # EMA updates per task (for bias correction)
        #: weights applied to the per-task gradients at the last step (detached)
        self.last_weights: torch.Tensor | None = None

    # Public --------------------------------------------------------------------------------

    def backward(
        self,
        losses: Sequence[torch.Tensor],
        rep: TensorOrSeq,
        *,
        scaler: Any | None = None,
        shared_params: Sequence[torch.Tensor] | None = None,
        retain_graph: bool = False,
    ) -> torch.Tensor:
        """Backward of the balanced objective; accumulates into ``.grad`` like ``loss.backward()``.

        Args:
            losses: one scalar loss per task.
            rep: the shared representation (a tensor or a sequence of tensors) that the heads
                consume; its gradient is what gets balanced in ``"rep"`` mode.
            scaler: a ``torch.amp.GradScaler``: the losses are scaled with it and the
                statistics are taken on unscaled gradients, so a changing scale does not
                disturb the EMA. Steps with inf/NaN gradients leave the EMA unchanged (the
                scaler skips them anyway).
            shared_params: ``"param"`` mode only: the parameters to balance. Default: every
                leaf that ``rep`` depends on.
            retain_graph: keep the graph after the final backward.

        Returns:
            The per-task weights used (also in ``last_weights``).
        """
        losses = list(losses)
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
        for t, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"losses[{t}] must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
            if not loss.requires_grad:
                raise ValueError(f"losses[{t}] does not require grad (computed under no_grad or detached?)")
        reps = [rep] if isinstance(rep, torch.Tensor) else list(rep)
        for i, r in enumerate(reps):
            if not isinstance(r, torch.Tensor) or not r.requires_grad:
                raise ValueError(f"rep[{i}] must be a tensor that requires grad (the shared bottom's output)")
        if scaler is not None:
            losses = [scaler.scale(loss) for loss in losses]
            inv_scale = 1.0 / scaler.get_scale()
        else:
            inv_scale = 1.0
        if self.method == "equal":
            # The baseline is exactly the summed loss: no per-task pass at all.
            total = losses[0].reshape(())
            for loss in losses[1:]:
                total = total + loss.reshape(())  # "+" promotes mixed AMP dtypes; stack would not
            torch.autograd.backward(total, retain_graph=retain_graph)
            w = torch.ones(self.num_tasks)
            self.last_weights = w
            return w
        if self._use_dist() and self.mode == "param":
            raise ValueError("mode='param' is a single-process cost baseline; use mode='rep' under torch.distributed")
        if self.mode == "rep":
            return self._backward_rep(losses, reps, inv_scale, retain_graph)
        return self._backward_param(losses, reps, shared_params, inv_scale, retain_graph)

    def state_dict(self) -> dict[str, Any]:
        """EMA state for checkpointing."""
        return {"ema": self._ema, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema, self._count = state["ema"], state["count"]

    # Modes ---------------------------------------------------------------------------------

    def _backward_rep(self, losses: list[torch.Tensor], reps: list[torch.Tensor], inv_scale: float, retain_graph: bool) -> torch.Tensor:
        head_leaves, retain = _head_graphs(losses, reps)
        heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (param, summed grad)
        grads = []
        for t, loss in enumerate(losses):
            # autograd.grad w.r.t. rep runs only the nodes between loss_t and rep (head t) and
            # does not execute rep's own grad_fn, so the shared bottom is untouched. The head's
            # graph is freed unless a later task still needs one of its nodes: Inductor's
            # compiled backwards donate their buffers and refuse retain_graph=True.
            leaves = head_leaves[t]
            g = torch.autograd.grad(
                loss, [*reps, *leaves], retain_graph=retain[t] or retain_graph, allow_unused=True, materialize_grads=True
            )
            grads.append(list(g[: len(reps)]))
            for p, gp in zip(leaves, g[len(reps) :]):
                prev = heads.get(id(p))
                heads[id(p)] = (p, gp if prev is None else prev[1] + gp)
        w = self._weights(grads, inv_scale)
        combined = [_combine(w, [g[i] for g in grads]) for i in range(len(reps))]
        # One engine call: rep seeded with the balanced combination runs the shared bottom
        # once, and the head parameters (leaves) get their summed task gradients through their
        # AccumulateGrad nodes, so .grad accumulates and DDP's gradient hooks fire as in an
        # ordinary backward.
        params = [p for p, _ in heads.values()]
        torch.autograd.backward(
            [*reps, *params], grad_tensors=[*combined, *(g for _, g in heads.values())], retain_graph=retain_graph
        )
        return w

    def _backward_param(
        self,
        losses: list[torch.Tensor],
        reps: list[torch.Tensor],
        shared_params: Sequence[torch.Tensor] | None,
        inv_scale: float,
        retain_graph: bool,
    ) -> torch.Tensor:
        shared = list(shared_params) if shared_params is not None else _leaves_behind(reps)
        if not shared:
            raise ValueError("found no shared parameters behind rep; pass shared_params=")
        shared_ids = {id(p) for p in shared}
        heads = [p for p in _leaves_before(losses, reps) if id(p) not in shared_ids]
        # One full backward per task: this T-fold cost of the shared bottom is what "param"
        # mode is here to show.
        grads = []
        head_grads = [torch.zeros_like(p) for p in heads]
        for t, loss in enumerate(losses):
            last = t == len(losses) - 1
            g = torch.autograd.grad(
                loss, shared + heads, retain_graph=retain_graph or not last, allow_unused=True, materialize_grads=True
            )
            grads.append(list(g[: len(shared)]))
            for hg, gi in zip(head_grads, g[len(shared) :]):
                hg.add_(gi)
        w = self._weights(grads, inv_scale)
        for i, p in enumerate(shared):
            g = _combine(w, [gs[i] for gs in grads])
            p.grad = g if p.grad is None else p.grad + g
        for p, g in zip(heads, head_grads):
            p.grad = g if p.grad is None else p.grad + g
        return w

    # Weights -------------------------------------------------------------------------------

    def _use_dist(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def _reduce(self, stat: torch.Tensor) -> torch.Tensor:
        """Sum of squared-norm statistics over ranks, for the global-batch gradient.

        Under DDP each rank's loss is a mean over its local batch, so the global-batch
        gradient at a sample's representation is the local one divided by the world size W;
        squared norms and Gram entries of the global gradient are the sum over ranks / W^2.
        """
        if not self._use_dist():
            return stat
        world = dist.get_world_size(self.group)
        stat = stat.clone()
        dist.all_reduce(stat, group=self.group)
        return stat / (world * world)

    def _weights(self, grads: list[list[torch.Tensor]], inv_scale: float) -> torch.Tensor:
        dev = grads[0][0].device
        dtype = torch.float64 if any(g.dtype == torch.float64 for gs in grads for g in gs) else torch.float32
        if self.method == "magnitude":
            sq = torch.stack([sum(torch.linalg.vector_norm(g, dtype=dtype) ** 2 for g in gs) for gs in grads])
            norms = self._reduce(sq).sqrt() * inv_scale
            w = self._magnitude_weights(norms)
        else:
            flat = torch.stack([torch.cat([g.reshape(-1).to(dtype) for g in gs]) for gs in grads])
            gram = self._reduce(flat @ flat.T) * (inv_scale * inv_scale)
            gram_list = gram.double().cpu().tolist()  # the one host sync of the method
            w = torch.tensor(self._mgda_weights(gram_list), dtype=dtype, device=dev)
        self.last_weights = w.detach()
        return self.last_weights

    def _mgda_weights(self, gram: list[list[float]]) -> list[float]:
        T = self.num_tasks
        if not all(math.isfinite(x) for row in gram for x in row):
            return [1.0] * T  # overflowed step (AMP): the scaler will skip it
        if self.mgda_normalize == "none":
            return [T * a for a in min_norm_weights(gram)]
        n = [math.sqrt(max(gram[i][i], 0.0)) for i in range(T)]
        live = [i for i in range(T) if n[i] > 0.0]
        if not live:
            return [1.0] * T
        # Tasks with a zero gradient contribute nothing whatever their weight; solve on the rest.
        unit = [[gram[i][j] / (n[i] * n[j]) for j in live] for i in live]
        alpha = min_norm_weights(unit)
        nbar = sum(n[i] for i in live) / len(live)
        w = [1.0] * T
        for a, i in zip(alpha, live):
            w[i] = len(live) * a * nbar / n[i]
        return w

    def _magnitude_weights(self, norms: torch.Tensor) -> torch.Tensor:
        if self._ema is None or self._ema.shape != norms.shape:
            self._ema = torch.zeros_like(norms)
            self._count = torch.zeros_like(norms)
        self._ema, self._count = self._ema.to(norms), self._count.to(norms)
        finite = torch.isfinite(norms)
        # Without a GPU->host sync: tasks with a non-finite norm keep their EMA and count.
        self._ema = torch.where(finite, self.beta * self._ema + (1 - self.beta) * norms.nan_to_num(0.0, 0.0, 0.0), self._ema)
        self._count = torch.where(finite, self._count + 1, self._count)
        corr = 1.0 - torch.pow(torch.full_like(self._count, self.beta), self._count)
        n = torch.where(self._count > 0, self._ema / corr.clamp_min(1e-30), torch.zeros_like(self._ema))
        if self.target == "mean":
            tau = n.mean()
        elif self.target == "max":
            tau = n.max()
        elif self.target == "min":
            tau = n.min()
        else:
            tau = n[self.target]
        # A task with no gradient signal yet (n_t = 0) keeps weight 1: nothing to rescale.
        ratio = torch.where(n > 0, tau / n.clamp_min(1e-30), torch.ones_like(n))
        return (1.0 - self.relax) + self.relax * ratio


def _combine(w: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """``sum_t w_t g_t``, accumulated in at least float32 (bf16/fp16 gradients under AMP) and
    returned in the gradients' dtype."""
    acc = torch.promote_types(grads[0].dtype, torch.float32)
    out = sum(w[t].to(acc) * g.to(acc) for t, g in enumerate(grads))
    return out.to(grads[0].dtype)


def _walk(roots: list, stop: set) -> tuple[list[torch.Tensor], set]:
    """Walk the autograd graph from ``roots`` without passing through any node in ``stop``.

    Returns the leaf tensors (AccumulateGrad variables) in first-visit order, each once, and
    the set of nodes visited."""
    seen, out, stack = set(), [], [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            out.append(var)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    uniq, ids = [], set()
    for v in out:
        if id(v) not in ids:
            ids.add(id(v))
            uniq.append(v)
    return uniq, seen


def _walk_leaves(roots: list, stop: set) -> list[torch.Tensor]:
    """Leaf tensors reachable from autograd nodes ``roots`` without passing through ``stop``."""
    return _walk(roots, stop)[0]


def _leaves_behind(reps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters the shared representation depends on."""
    return _walk_leaves([r.grad_fn for r in reps], set())


def _leaves_before(losses: list[torch.Tensor], reps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters the losses depend on without going through ``rep`` (the heads')."""
    return _walk_leaves([loss.grad_fn for loss in losses], {r.grad_fn for r in reps})


def _head_graphs(losses: list[torch.Tensor], reps: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[bool]]:
    """Per task: the leaves its loss reaches without passing through ``rep``, and whether its
    backward must keep the graph because a later task's loss shares one of its nodes (e.g. a
    common tower after rep). Leaf nodes hold no saved tensors and do not count."""
    stop = {r.grad_fn for r in reps if r.grad_fn is not None}
    rep_ids = {id(r) for r in reps}
    leaves, nodes = [], []
    for loss in losses:
        found, seen = _walk([loss.grad_fn], stop)
        leaves.append([v for v in found if id(v) not in rep_ids])
        nodes.append({n for n in seen if getattr(n, "variable", None) is None})
    retain = []
    later: set = set()
    for t in range(len(losses) - 1, -1, -1):
        retain.append(bool(nodes[t] & later))
        later |= nodes[t]
    return leaves, retain[::-1]
