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

The heads must reach the shared bottom only through ``rep`` (``"rep"`` mode): ``backward``
raises a ``ValueError`` when a head also reads a parameter of the bottom (tied weights), an
intermediate of the bottom (a skip connection), or an output of the op that produced ``rep``
that is not in ``rep`` (``a, b = shared(x).chunk(2)`` with only ``a`` passed), since the
gradient through that path would escape the balancing, be counted twice or be lost. It also
raises when no loss reaches ``rep`` (the heads read another call of the shared bottom), or a
loss that does not reach it reaches a parameter behind it. ``mode="param"`` handles such graphs.

Under DDP the per-task statistics (norms, Gram matrix) are all-reduced, so every rank uses the
same weights and the result equals single-process training on the global batch (with losses
that are means over the local batch, as DDP expects).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from blazec._args import as_flag, as_int
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
      ``r = 0`` is ``equal``. The EMA smooths the noise of per-batch norms. A task whose gradient
      is zero this step (no labelled sample of it in the batch, say) has nothing to rescale: its
      EMA is left as it is, it gets weight 1 and it is left out of the mean, max or min that
      gives ``tau``. An anchor task keeps its EMA as the target; while it has none yet (no
      non-zero gradient so far), every weight is 1.
    * ``"mgda"``: ``w = T * alpha`` with ``alpha`` the min-norm convex combination of the ``g_t``
      (MGDA-UB on the representation; see ``blazec.runtime._mgda``). The factor T makes equal
      alphas match ``equal``. With ``mgda_normalize="l2"`` (default) the min-norm problem is
      solved on unit gradients ``g_t / ||g_t||`` (Gram ``G_ij / (n_i n_j)``), as Sener &
      Koltun do, and ``w_t = T alpha_t nbar / n_t`` with ``nbar`` the mean norm, so the
      combination keeps the overall gradient scale. Unnormalised MGDA (``"none"``) puts almost
      all the weight on the task with the smallest gradient when the tasks' scales differ.
      Tasks with a zero gradient this step are left out of the min-norm problem (otherwise the
      hull contains 0 and the step would vanish) and get weight 1, with either normalisation.

    Modes:

    * ``"rep"`` (default): gradients w.r.t. ``rep``, as described in the module docstring. The
      heads must read the shared bottom only through the tensors passed as ``rep``, and those
      must not depend on one another; a graph that breaks this raises a ``ValueError``.
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
        distributed: all-reduce the statistics across ranks (True or False); ``None`` means
            "when torch.distributed is initialised with more than one rank".
        group: process group for that all-reduce.

    Wrong types (``num_tasks=2.0``, ``beta="0.9"``, ``distributed="yes"``) raise a
    ``TypeError``; bad values (``num_tasks=0``, ``beta=1.0``, an unknown method) a ``ValueError``,
    as does an argument the method does not read, other than its default (``relax=0.5`` with
    ``"mgda"``).
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
        num_tasks = as_int(num_tasks, "num_tasks")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        beta, relax = _real("beta", beta), _real("relax", relax)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not 0.0 <= relax <= 1.0:
            raise ValueError(f"relax must be in [0, 1], got {relax!r}")
        is_index = isinstance(target, numbers.Integral) and not isinstance(target, bool)
        if not ((isinstance(target, str) and target in TARGETS) or (is_index and 0 <= target < num_tasks)):
            raise ValueError(f"target must be one of {', '.join(TARGETS)} or a task index in [0, {num_tasks}), got {target!r}")
        target = int(target) if is_index else target
        if mgda_normalize not in ("l2", "none"):
            raise ValueError(f"mgda_normalize must be 'l2' or 'none', got {mgda_normalize!r}")
        # an argument another method reads would be ignored: a slip (the method, or the argument)
        defaults = {n: p.default for n, p in inspect.signature(GradBalancer.__init__).parameters.items()}
        unused = [f"{n}={v!r}" for n, v, used in (
            ("beta", beta, "magnitude"), ("relax", relax, "magnitude"),
            ("target", target, "magnitude"), ("mgda_normalize", mgda_normalize, "mgda"))
            if method != used and v != defaults[n]]
        if unused:
            raise ValueError(f"{', '.join(unused)} would be ignored by method {method!r}: beta, relax and target "
                             "apply to 'magnitude', mgda_normalize to 'mgda'")
        if distributed is not None:
            distributed = as_flag(distributed, "distributed")
        self.num_tasks, self.method, self.mode = num_tasks, method, mode
        self.mgda_normalize = mgda_normalize
        self.beta, self.relax, self.target = beta, relax, target
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
            rep: the shared representation (a tensor or a non-empty sequence of distinct
                tensors) that the heads consume; its gradient is what gets balanced in ``"rep"``
                mode. In that mode it must hold every tensor the heads read from the shared
                bottom, and none of them may be computed from another.
            scaler: a ``torch.amp.GradScaler`` (anything else raises a ``TypeError``): the losses
                are scaled with it and the
                statistics are taken on unscaled gradients, so a changing scale does not
                disturb the EMA. Steps with inf/NaN gradients leave the EMA unchanged (the
                scaler skips them anyway).
            shared_params: ``"param"`` mode only (a ``ValueError`` in ``"rep"`` mode, where the
                shared bottom is whatever lies behind ``rep``): the parameters to balance.
                Default: every leaf that ``rep`` depends on.
            retain_graph: keep the graph after the final backward.

        Returns:
            The per-task weights used (also in ``last_weights``).
        """
        if isinstance(losses, torch.Tensor) or not isinstance(losses, (Sequence, Iterable)):
            raise TypeError(f"losses must be a sequence of {self.num_tasks} scalar loss tensors, got {type(losses).__name__}")
        losses = list(losses)
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
        for t, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"losses[{t}] must be a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
            if not loss.requires_grad:
                raise ValueError(f"losses[{t}] does not require grad (computed under no_grad or detached?)")
        reps = _check_reps(rep)
        if scaler is not None and not (callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "get_scale", None))):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (or None), got {scaler!r} ({type(scaler).__name__})")
        if shared_params is not None and self.mode == "rep":
            raise ValueError(
                "shared_params= only applies to mode='param'; in mode='rep' the shared bottom is what lies behind rep"
            )
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
        """Restore the EMA state saved by ``state_dict``."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from GradBalancer.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("ema", "count") if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(map(repr, missing))}; expected a dict from GradBalancer.state_dict()")
        ema, count = state["ema"], state["count"]
        if ema is None and count is None:
            self._ema = self._count = None
            return
        for key, v in (("ema", ema), ("count", count)):
            if not isinstance(v, torch.Tensor) or v.shape != (self.num_tasks,):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"state[{key!r}] must be a tensor of shape ({self.num_tasks},) for {self.num_tasks} tasks, got {got}")
            if v.dtype == torch.bool or v.is_complex():
                raise TypeError(f"state[{key!r}] must hold real numbers, got dtype {v.dtype}")
            bad = ~torch.isfinite(v.double()) | (v < 0)
            if key == "count":
                bad |= v.double() != v.double().round()
            if bad.any():
                i = int(torch.nonzero(bad)[0, 0])
                what = "finite norms >= 0" if key == "ema" else "whole numbers >= 0 (EMA updates per task)"
                raise ValueError(f"state[{key!r}] must hold {what}, got state[{key!r}][{i}] = {v[i].item()}")
        self._ema, self._count = ema, count

    # Modes ---------------------------------------------------------------------------------

    def _backward_rep(self, losses: list[torch.Tensor], reps: list[torch.Tensor], inv_scale: float, retain_graph: bool) -> torch.Tensor:
        head_leaves, retain = _head_graphs(losses, reps)
        heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (param, summed grad)
        grads = []
        task = [0]  # the task whose head backward is running, for the guard's message
        guard = _guard_bottom(reps, task)
        try:
            for t, loss in enumerate(losses):
                # autograd.grad w.r.t. rep runs only the nodes between loss_t and rep (head t)
                # and does not execute rep's own grad_fn, so the shared bottom is untouched
                # (the guard fails the call otherwise). The head's graph is freed unless a later
                # task still needs one of its nodes: Inductor's compiled backwards donate their
                # buffers and refuse retain_graph=True.
                task[0] = t
                leaves = head_leaves[t]
                g = torch.autograd.grad(
                    loss, [*reps, *leaves], retain_graph=retain[t] or retain_graph, allow_unused=True, materialize_grads=True
                )
                grads.append(list(g[: len(reps)]))
                for p, gp in zip(leaves, g[len(reps) :]):
                    prev = heads.get(id(p))
                    heads[id(p)] = (p, gp if prev is None else prev[1] + gp)
        finally:
            for handle in guard:
                handle.remove()
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
        n = [math.sqrt(max(gram[i][i], 0.0)) for i in range(T)]
        live = [i for i in range(T) if n[i] > 0.0]
        if not live:
            return [1.0] * T
        # Tasks with a zero gradient contribute nothing whatever their weight; solve on the rest
        # (kept in, a zero gradient makes the min-norm point 0 and the whole step vanish).
        w = [1.0] * T
        if self.mgda_normalize == "none":
            alpha = min_norm_weights([[gram[i][j] for j in live] for i in live])
            for a, i in zip(alpha, live):
                w[i] = len(live) * a
            return w
        unit = [[gram[i][j] / (n[i] * n[j]) for j in live] for i in live]
        alpha = min_norm_weights(unit)
        nbar = sum(n[i] for i in live) / len(live)
        for a, i in zip(alpha, live):
            w[i] = len(live) * a * nbar / n[i]
        return w

    def _magnitude_weights(self, norms: torch.Tensor) -> torch.Tensor:
        if self._ema is None or self._ema.shape != norms.shape:
            self._ema = torch.zeros_like(norms)
            self._count = torch.zeros_like(norms)
        self._ema, self._count = self._ema.to(norms), self._count.to(norms)
        # Without a GPU->host sync: tasks with a non-finite norm (an overflowed AMP step) or a
        # zero one (no signal this step) keep their EMA and count.
        update = torch.isfinite(norms) & (norms != 0)
        self._ema = torch.where(update, self.beta * self._ema + (1 - self.beta) * norms.nan_to_num(0.0, 0.0, 0.0), self._ema)
        self._count = torch.where(update, self._count + 1, self._count)
        corr = 1.0 - torch.pow(torch.full_like(self._count, self.beta), self._count)
        n = torch.where(self._count > 0, self._ema / corr.clamp_min(1e-30), torch.zeros_like(self._ema))
        # A task with a zero gradient this step, or no signal yet (n_t = 0), keeps weight 1:
        # nothing to rescale. It is not part of the target either. So every task keeps weight 1
        # while there is no target.
        live = (n > 0) & (norms != 0)
        tau, has_tau = self._target(n, live)
        ratio = torch.where(live & has_tau, tau / n.clamp_min(1e-30), torch.ones_like(n))
        return (1.0 - self.relax) + self.relax * ratio

    def _target(self, n: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tau`` from the bias-corrected norms ``n`` and whether there is one.

        ``"mean"``, ``"max"`` and ``"min"`` are taken over the ``live`` tasks (a magnitude
        estimate and a non-zero gradient this step): a task that contributes nothing this step
        must not pull the others' scale. An anchor task's estimate is the target as long as it
        has one, even on a step where its own gradient is zero."""
        if isinstance(self.target, int):
            return n[self.target], n[self.target] > 0
        if self.target == "mean":
            tau = torch.where(live, n, torch.zeros_like(n)).sum() / live.sum().clamp_min(1)
        elif self.target == "max":
            tau = torch.where(live, n, torch.full_like(n, -math.inf)).max()
        else:
            tau = torch.where(live, n, torch.full_like(n, math.inf)).min()
        return tau, live.any()


def _real(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (Python or NumPy), else a TypeError; bools
    are refused, as ``relax=True`` is more likely a slip than ``1.0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_reps(rep: Any) -> list[torch.Tensor]:
    """``rep`` as a non-empty list of distinct tensors that require grad."""
    if isinstance(rep, torch.Tensor):
        reps = [rep]
    else:
        try:
            reps = list(rep)
        except TypeError:
            msg = f"rep must be a tensor or a sequence of tensors (the shared bottom's outputs), got {type(rep).__name__}"
            raise TypeError(msg) from None
    if not reps:
        raise ValueError("rep is empty: pass the shared bottom's output tensor(s) that the heads read")
    seen: dict[Any, int] = {}
    for i, r in enumerate(reps):
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"rep[{i}] must be a tensor, got {type(r).__name__}")
        if not r.requires_grad:
            raise ValueError(f"rep[{i}] must be a tensor that requires grad (the shared bottom's output)")
        key = (r.grad_fn, r.output_nr) if r.grad_fn is not None else id(r)
        if key in seen:
            raise ValueError(f"rep[{i}] is the same tensor as rep[{seen[key]}]: pass each tensor once (its gradient would count twice)")
        seen[key] = i
    return reps


def _combine(w: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """``sum_t w_t g_t``, accumulated in at least float32 (bf16/fp16 gradients under AMP) and
    returned in the gradients' dtype."""
    acc = torch.promote_types(grads[0].dtype, torch.float32)
    out = sum(w[t].to(acc) * g.to(acc) for t, g in enumerate(grads))
    return out.to(grads[0].dtype)


def _walk(roots: list, stop: set, edges: set | None = None) -> tuple[list[torch.Tensor], set, list, bool]:
    """Walk the autograd graph from ``roots`` without passing through any node in ``stop``.

    Returns the leaf tensors (AccumulateGrad variables) in first-visit order, each once, the set
    of nodes visited and, when ``edges`` (allowed ``(node, input_nr)`` pairs into ``stop``) is
    given, the edges into a ``stop`` node that are not in it, as ``(node, input_nr)``, and
    whether the walk met one of ``edges``."""
    seen, out, stray, stack = set(), [], [], [r for r in roots if r is not None]
    reached = False
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            out.append(var)
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            if edges is not None and nxt in stop:
                if (nxt, nr) in edges:
                    reached = True
                else:
                    stray.append((nxt, nr))
            stack.append(nxt)
    uniq, ids = [], set()
    for v in out:
        if id(v) not in ids:
            ids.add(id(v))
            uniq.append(v)
    return uniq, seen, stray, reached


def _guard_bottom(reps: list[torch.Tensor], task: list[int]) -> list:
    """Pre-hooks on the nodes that produced ``rep`` that fail a head's backward which would run
    them; the caller removes the returned handles.

    ``autograd.grad(loss_t, [*reps, *head_leaves])`` runs a node only if one of its inputs lies
    behind it, so a rep's node runs only when a head reaches the shared bottom other than
    through ``rep``: a head leaf that the bottom also uses (tied weights, a shared parameter in
    a loss), a head reading an intermediate of the bottom (a skip connection; every node
    there leads to the bottom's parameters) or a rep computed from another rep. Running it
    would free the bottom's graph, or with ``retain_graph=True`` count that task's gradient
    behind rep a second time, unweighted. ``task[0]`` is the task running, for the message."""
    handles, nodes = [], set()
    for i, r in enumerate(reps):
        node = r.grad_fn
        if node is None or node in nodes:
            continue
        nodes.add(node)
        name = node.name()  # not the node itself: a hook that holds its node keeps the graph alive

        def hook(grad_outputs, i=i, name=name):
            raise ValueError(
                f"losses[{task[0]}] reaches the shared bottom other than through rep (its backward would run "
                f"{name}, which produced rep[{i}]): a head reads a parameter of the shared bottom (tied "
                "weights), an intermediate of the bottom (a skip connection), or one rep tensor is computed "
                "from another. Pass as rep tensors that are the only way from the heads to the bottom and do "
                "not depend on each other, or use mode='param', which balances the shared parameters' "
                "gradients and handles such graphs"
            )

        handles.append(node.register_prehook(hook))
    return handles


def _check_apart(apart: list[int], num_tasks: int, leaves: list[list[torch.Tensor]], reps: list[torch.Tensor]) -> None:
    """Tasks ``apart`` have losses that never reach ``rep``. A task of its own (a loss on its own
    parameters only) is fine: its gradient at rep is 0. But when no loss reaches rep, or one
    that does not reaches a parameter behind rep, rep is not the tensor the heads read (say the
    output of a second call of the shared bottom), and that task's gradient would reach the
    bottom unbalanced, as in the plain summed loss. Only then is the bottom's graph walked."""
    if len(apart) == num_tasks:
        raise ValueError(
            "no loss reaches rep: the heads read other tensors than the ones passed as rep (the output of "
            "another call of the shared bottom?), so nothing would be balanced. Pass as rep the very tensor(s) "
            "the heads were computed from"
        )
    bottom = {id(p) for p in _leaves_behind(reps)}
    for t in apart:
        if any(id(p) in bottom for p in leaves[t]):
            raise ValueError(
                f"losses[{t}] does not reach rep but reaches parameters of the shared bottom: its head read "
                "another tensor than rep (the output of another call of the shared bottom?), so its gradient "
                "would reach the bottom unbalanced. Pass as rep the very tensor(s) the heads were computed "
                "from, or use mode='param'"
            )


def _sibling_hint(node: Any) -> str:
    """The usual cause when ``rep`` and the heads' outputs come out of one node."""
    name = node.name()
    if "DDPSink" in name:
        return (
            ". DDP with find_unused_parameters=True or static_graph=True passes every output of the forward "
            "through this one node, so rep mode needs both off"
        )
    if "CompiledFunction" in name:
        return (
            ". torch.compile of a module that computes both rep and the heads makes them outputs of one "
            "compiled graph: compile the shared bottom and the heads separately"
        )
    return ""


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
    edges = {(r.grad_fn, r.output_nr) for r in reps if r.grad_fn is not None}
    rep_ids = {id(r) for r in reps}
    leaves, nodes, apart = [], [], []
    for t, loss in enumerate(losses):
        found, seen, stray, reached = _walk([loss.grad_fn], stop, edges)
        if stray:
            node, nr = stray[0]
            i = next(i for i, r in enumerate(reps) if r.grad_fn is node)
            raise ValueError(
                f"losses[{t}] reads output {nr} of {node.name()}, the op that produced rep[{i}], but that output "
                "is not in rep, so its gradient would be lost: pass every tensor the heads read from the shared "
                f"bottom as rep (e.g. all the outputs of a chunk or split), or use mode='param'{_sibling_hint(node)}"
            )
        if not reached and not any(id(v) in rep_ids for v in found):
            apart.append(t)
        leaves.append([v for v in found if id(v) not in rep_ids])
        nodes.append({n for n in seen if getattr(n, "variable", None) is None})
    if apart:
        _check_apart(apart, len(losses), leaves, reps)
    retain = []
    later: set = set()
    for t in range(len(losses) - 1, -1, -1):
        retain.append(bool(nodes[t] & later))
        later |= nodes[t]
    return leaves, retain[::-1]
