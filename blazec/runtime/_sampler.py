"""A DataLoader batch sampler that gives each rank a cost-balanced share of every global batch.

At each global step all ranks draw the same global batch (a seeded permutation, like
``DistributedSampler``), compute its per-sample costs, partition them into ``world_size``
parts (and ``micro_batches`` parts within each rank) and keep their own part. Costs come either
from lengths known up front (no communication: every rank computes the same partition) or from
a ``cost_fn`` evaluated on 1/world_size of the batch per rank and shared with one
``all_gather``. The partition of the next step can be computed on a background thread.
"""

from __future__ import annotations

import math
import numbers
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Mapping, Sequence, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from blazec._args import as_flag, as_int
from blazec.runtime._cost import CostModel, _as_float64
from blazec.runtime._partition import (
    METHODS,
    _refine_swaps,
    as_cost_list,
    check_count,
    fill_short_parts,
    partition,
    split_in_rounds,
)


def partition_ranks(
    costs: Sequence[float] | torch.Tensor,
    ranks: int,
    micro_batches: int = 1,
    method: str = "kk",
    *,
    equal_counts: bool = False,
    seed: int = 0,
) -> list[list[list[int]]]:
    """Two-level partition: ``out[r][m]`` are the indices of micro-batch m on rank r.

    With ``micro_batches == 1`` this is ``partition`` into ``ranks`` parts. Otherwise the ranks
    come first, so their sums are as balanced as with one micro-batch (what a step costs when
    the gradients are synchronised once per step, ``no_sync`` on the other micro-batches), and
    then each rank's samples are split into micro-batches:

    * ``equal_counts=True``: ranks with equal counts (``floor``/``ceil`` of ``n/ranks``), then
      each rank's samples into micro-batches, again with equal counts, by the same method.
    * ``equal_counts=False``, ``"random"`` and ``"sorted_rr"`` (the baselines): these already
      give equal counts; each rank is split by the same method.
    * ``equal_counts=False``, ``"kk"``, ``"lpt"``, ``"greedy"``: a rank that drew a few very
      long samples can hold fewer samples than micro-batches, i.e. run fewer micro-batches than
      the others (a hang under DDP gradient accumulation). Such a rank takes the smallest
      samples of ranks with more than ``micro_batches`` (``fill_short_parts``; then, for
      ``"kk"``, the swap search ``_refine_swaps``, which keeps counts). The micro-batches are
      then filled in rounds so that micro-batch m costs about the same on every rank
      (``split_in_rounds``): with DDP synchronising after every micro-batch a step takes
      ``sum_m max_r cost[r][m]``.

    When ``n >= ranks * micro_batches`` no micro-batch is empty; with fewer samples some must
    be, and are. ``BalancedBatchSampler`` never partitions fewer. The result depends only on the
    arguments (every rank computes the same plan) and holds every index once.
    """
    ranks = check_count(ranks, "ranks")
    micro_batches = check_count(micro_batches, "micro_batches")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; choose one of {', '.join(METHODS)}")
    equal_counts, seed = as_flag(equal_counts, "equal_counts"), as_int(seed, "seed")
    c = as_cost_list(costs)
    if micro_batches == 1:
        return [[idx] for idx in partition(c, ranks, method, equal_counts=equal_counts, seed=seed)]
    if equal_counts or method in ("random", "sorted_rr"):
        out = []
        for r, idx in enumerate(partition(c, ranks, method, equal_counts=True, seed=seed)):
            sub = partition([c[i] for i in idx], micro_batches, method, equal_counts=True, seed=seed + 1 + r)
            out.append([[idx[j] for j in part] for part in sub])
        return out
    parts = partition(c, ranks, method, seed=seed)
    if fill_short_parts(c, parts, min(micro_batches, len(c) // ranks)) and method == "kk":
        parts = _refine_swaps(c, parts)
    return split_in_rounds(c, parts, micro_batches)


class BalancedBatchSampler(Sampler[list[int]]):
    """Batch sampler for ``DataLoader(ds, batch_sampler=...)`` with cost-balanced rank shares.

    Each global step takes ``global_batch_size`` sample indices, partitions them by cost over
    the ranks, and yields this rank's share as ``micro_batches`` consecutive batches (so the
    DataLoader yields ``micro_batches`` batches per optimizer step; accumulate over them).
    Rank shares have different sizes unless ``equal_counts=True``: that is the point, a rank
    with long samples gets fewer. So do not take a per-rank mean: use
    ``loss = per_sample_losses.sum() * world_size / global_batch_size`` on each micro-batch;
    accumulated over micro-batches and averaged by DDP over ranks, that is the mean over the
    global batch, with every sample weighted alike.

    Every rank yields exactly ``len()`` batches per epoch, ``micro_batches`` per step, none of
    them empty: under DDP a rank that ran one step or micro-batch fewer than the others would
    hang them. With ``drop_last=False`` the last, short global batch of
    ``r = num_samples % global_batch_size`` samples is kept as one more step only when
    ``r >= world_size * micro_batches`` (enough for one sample per micro-batch); otherwise its
    ``r`` samples are dropped from the epoch, with a warning at construction. The short last
    step holds ``r`` samples, so the loss scaling above weights it by ``r / global_batch_size``.

    Args:
        data_source: the dataset (anything with ``len``) or its size.
        global_batch_size: samples per optimizer step over all ranks, >= world_size * micro_batches.
        lengths: per-sample lengths of the whole dataset, if known up front. Costs are then
            ``cost_model(lengths, **features)`` (float64) and no communication happens.
        features: extra per-sample features for the cost model (with ``lengths``).
        cost_fn: alternative to ``lengths``: ``cost_fn(index) -> cost`` (e.g. reads the sample and
            applies a cost model). Each rank evaluates it on 1/world_size of the global batch and
            the costs are shared with one ``all_gather`` per step, on a dedicated gloo group.
        cost_model: model applied to ``lengths``; default ``CostModel.transformer()``.
        rank, world_size: default to ``torch.distributed``'s when initialised, else 0 and 1. In
            ``cost_fn`` mode with ``world_size > 1`` both must match ``group``'s.
        micro_batches: micro-batches per rank per step.
        method: partition method, one of ``METHODS`` (default Karmarkar-Karp).
        equal_counts: equal sample counts per rank (and per micro-batch), within one.
        shuffle, seed: draw global batches from a permutation seeded by ``seed + epoch``.
        drop_last: drop the last incomplete global batch (see above for ``False``).
        prefetch: compute the next step's partition on a background thread.
        group: process group for the cost ``all_gather`` (``cost_fn`` mode).

    Integer arguments take Python or numpy integers (not bools or floats), flags take bools;
    anything else raises a ``TypeError`` naming the argument.
    """

    def __init__(
        self,
        data_source: Sized | int,
        global_batch_size: int,
        *,
        lengths: Sequence[float] | torch.Tensor | None = None,
        features: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
        cost_fn: Callable[[int], float] | None = None,
        cost_model: CostModel | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        micro_batches: int = 1,
        method: str = "kk",
        equal_counts: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        prefetch: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        n = self._dataset_size(data_source)
        dist_on = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size(group) if dist_on else 1
        if rank is None:
            rank = dist.get_rank(group) if dist_on else 0
        world_size, rank = as_int(world_size, "world_size"), as_int(rank, "rank")
        global_batch_size = as_int(global_batch_size, "global_batch_size")
        micro_batches = as_int(micro_batches, "micro_batches")
        seed = as_int(seed, "seed")
        equal_counts, shuffle = as_flag(equal_counts, "equal_counts"), as_flag(shuffle, "shuffle")
        drop_last, prefetch = as_flag(drop_last, "drop_last"), as_flag(prefetch, "prefetch")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"unknown partition method {method!r}; choose one of {', '.join(METHODS)}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        if global_batch_size < world_size * micro_batches:
            raise ValueError(
                f"global_batch_size must be >= world_size * micro_batches = {world_size * micro_batches} "
                f"so that no micro-batch is empty, got {global_batch_size}"
            )
        if global_batch_size > n and drop_last:
            raise ValueError(f"global_batch_size {global_batch_size} > dataset size {n} with drop_last=True: no step")
        if n < world_size * micro_batches:
            raise ValueError(
                f"dataset size {n} < world_size * micro_batches = {world_size * micro_batches}: no step "
                "can give every rank micro_batches non-empty micro-batches"
            )
        if (lengths is None) == (cost_fn is None):
            raise ValueError("pass exactly one of lengths= (known up front) or cost_fn= (computed per step)")
        if features is not None and not isinstance(features, Mapping):
            raise TypeError(f"features must map each feature name to its per-sample values, got "
                            f"{type(features).__name__}")
        if features and lengths is None:
            raise ValueError("features= needs lengths=; with cost_fn= put the features into cost_fn")
        if cost_model is not None and lengths is None:
            raise ValueError("cost_model= needs lengths=; with cost_fn= apply the cost model inside cost_fn")
        if cost_fn is not None and not callable(cost_fn):
            raise TypeError(f"cost_fn must be callable (index -> cost), got {cost_fn!r}")
        if cost_model is not None and not callable(cost_model):
            raise TypeError(f"cost_model must be a CostModel (CostModel.from_spec parses a spec), got {cost_model!r}")

        self.num_samples = n
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.micro_batches = micro_batches
        self.method, self.equal_counts = method, equal_counts
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.prefetch = prefetch
        self.epoch = 0
        self.cost_fn = cost_fn
        self.cost_model = cost_model or CostModel.transformer()
        #: summed cost of each rank at the last step this rank consumed (for bubble metrics)
        self.last_rank_costs: list[float] = []
        self._costs: torch.Tensor | None = None
        if lengths is not None:
            self._costs = self._known_costs(lengths, features)
        rest = n % global_batch_size
        if not drop_last and 0 < rest < world_size * micro_batches:
            warnings.warn(
                f"BalancedBatchSampler(drop_last=False): the last {rest} samples of each epoch "
                f"(dataset size {n} % global_batch_size {global_batch_size}) are fewer than "
                f"world_size * micro_batches = {world_size * micro_batches} and are dropped, so that "
                "every rank runs the same number of non-empty micro-batches",
                stacklevel=2,
            )
        # Costs are gathered only when several processes really exist; without an initialised
        # process group cost_fn is evaluated on the whole batch locally (tests, single process).
        self._gather = cost_fn is not None and world_size > 1
        self._group = group
        if self._gather:
            self._check_group(dist_on, group)
            if group is None:
                # A private gloo group: costs are CPU tensors (NCCL would need a copy to the
                # GPU), and the prefetch thread must not interleave its collective with the
                # training loop's collectives on the default group. new_group is collective:
                # every rank builds its sampler, so every rank calls it in the same order.
                self._group = dist.new_group(backend="gloo")
            self._check_ranks_agree()

    @staticmethod
    def _dataset_size(data_source: object) -> int:
        if hasattr(data_source, "__len__"):
            n = len(data_source)  # type: ignore[arg-type]
        else:
            try:
                n = as_int(data_source, "data_source")
            except TypeError:
                raise TypeError(
                    f"data_source must be a dataset with len() or its size (an int), got {data_source!r}"
                ) from None
        if n < 1:
            raise ValueError(f"data_source must be a non-empty dataset or a size >= 1, got {data_source!r}")
        return n

    def _known_costs(self, lengths, features) -> torch.Tensor:
        """Costs of the whole dataset from ``lengths``, checked: 1-D, one per sample, finite, >= 0.

        Lengths are read as float64 (Python floats and ints up to 2**53 stay exact; float32
        would round 16777217 to 16777216 and overflow above 3.4e38).
        """
        L = _as_float64(lengths, "lengths")
        if L.numel() != self.num_samples:
            raise ValueError(
                f"lengths must be 1-D with one entry per sample ({self.num_samples}), got shape {tuple(L.shape)}"
            )
        costs = as_cost_list(self.cost_model(L, **dict(features or {})), "cost_model(lengths)")
        if len(costs) != self.num_samples:
            raise ValueError(f"cost_model(lengths) returned {len(costs)} costs for {self.num_samples} samples")
        return torch.tensor(costs, dtype=torch.float64)

    def _check_group(self, dist_on: bool, group: dist.ProcessGroup | None) -> None:
        """``cost_fn`` mode gathers costs by rank: ``world_size`` must be the group's size."""
        if not dist_on:
            raise ValueError("cost_fn= with world_size > 1 needs torch.distributed to be initialised")
        if dist.get_world_size(group) != self.world_size:
            raise ValueError(f"world_size={self.world_size} but the process group has {dist.get_world_size(group)} ranks")

    def _check_ranks_agree(self) -> None:
        """``rank`` must be this process's rank in the cost group (collective: every rank raises).

        Each rank evaluates the slice of the batch its ``rank`` names and keeps that rank's
        share, so a wrong ``rank=`` would make two processes train on the same share while
        another share is never used. A rank that raised alone would leave the others waiting in
        the first cost gather, so the passed ranks are gathered and checked on every rank.
        """
        passed = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(passed, torch.tensor([self.rank], dtype=torch.int64), group=self._group)
        got = [int(t) for t in passed]
        if got != list(range(self.world_size)):
            raise ValueError(
                f"rank= disagrees with the process group: its ranks 0..{self.world_size - 1} passed rank={got}; "
                "in cost_fn= mode leave rank= unset or pass each process's rank in the process group"
            )

    # Sizes ---------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches, plus the short last one when ``drop_last=False`` and it has at
        least ``world_size * micro_batches`` samples (see the class docstring)."""
        q, r = divmod(self.num_samples, self.global_batch_size)
        keep_last = not self.drop_last and r >= self.world_size * self.micro_batches
        return q + 1 if keep_last else q

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches

    def set_epoch(self, epoch: int) -> None:
        """Use a different permutation each epoch (call on every rank, like DistributedSampler)."""
        self.epoch = as_int(epoch, "epoch")

    # Partitioning ----------------------------------------------------------------------------

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        # manual_seed takes [-2**63, 2**64) and maps negatives mod 2**64; do that for any int.
        g = torch.Generator().manual_seed((self.seed + self.epoch) % 2**64)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def _batch_costs(self, batch: list[int]) -> list[float]:
        if self._costs is not None:
            return self._costs[batch].tolist()
        if not self._gather:
            return [self._checked_cost(i) for i in batch]
        # Each rank evaluates a contiguous slice; all slices are padded to the same size for
        # all_gather. A failing cost_fn must not leave the other ranks hanging in the
        # collective, so failures travel as NaN and every rank raises after the gather.
        per = math.ceil(len(batch) / self.world_size)
        mine = batch[self.rank * per : (self.rank + 1) * per]
        local = torch.full((per,), float("nan"), dtype=torch.float64)
        err: Exception | None = None
        for j, i in enumerate(mine):
            try:
                local[j] = self._checked_cost(i)
            except Exception as e:  # noqa: BLE001 - re-raised below on every rank
                err = err or e
        parts = [torch.empty(per, dtype=torch.float64) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self._group)
        costs = torch.cat(parts)[: len(batch)]
        bad = torch.nonzero(~torch.isfinite(costs))
        if bad.numel():
            j = int(bad[0, 0])
            msg = f"cost_fn failed for sample {batch[j]} (evaluated on rank {j // per})"
            raise ValueError(msg + (f": {err}" if err else "")) from err
        return costs.tolist()

    def _checked_cost(self, i: int) -> float:
        out = self.cost_fn(i)
        # a real number (Python, NumPy) or a one-element real tensor; not a bool, nor a string
        # float() would parse
        if isinstance(out, torch.Tensor) and out.numel() == 1 and out.dtype != torch.bool and \
                not out.dtype.is_complex:
            v = float(out.item())
        elif isinstance(out, numbers.Real) and not isinstance(out, bool):
            v = float(out)
        else:
            raise TypeError(f"cost_fn({i}) returned {out!r}; it must return a number (the sample's cost)")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"cost_fn({i}) returned {v}; costs must be finite and >= 0")
        return v

    def _step(self, order: list[int], step: int) -> tuple[list[list[list[int]]], list[float]]:
        B = self.global_batch_size
        batch = order[step * B : (step + 1) * B]
        costs = self._batch_costs(batch)
        # Every step, the short last one included, holds >= world_size * micro_batches samples
        # (steps_per_epoch), so partition_ranks leaves no micro-batch empty: every rank yields
        # exactly micro_batches batches per step.
        local = partition_ranks(
            costs, self.world_size, self.micro_batches, self.method,
            equal_counts=self.equal_counts, seed=self.seed + 7919 * (self.epoch * 100003 + step),
        )
        if not all(len(r) == self.micro_batches and all(r) for r in local):  # would desync DDP
            raise RuntimeError(f"internal error: an empty micro-batch at step {step} ({len(batch)} samples)")
        rank_costs = [sum(costs[j] for mb in r for j in mb) for r in local]
        return [[[batch[j] for j in mb] for mb in r] for r in local], rank_costs

    def step_partition(self, step: int) -> list[list[list[int]]]:
        """Dataset indices of every rank's micro-batches at ``step`` of the current epoch:
        ``out[rank][micro_batch]``. Collective in ``cost_fn`` mode (call it on all ranks)."""
        step = as_int(step, "step")
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
        return self._step(self._order(), step)[0]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        steps = self.steps_per_epoch
        if not self.prefetch:
            for s in range(steps):
                parts, self.last_rank_costs = self._step(order, s)
                yield from parts[self.rank]
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blazec-balance")
        try:
            nxt: Future | None = pool.submit(self._step, order, 0) if steps else None
            for s in range(steps):
                parts, self.last_rank_costs = nxt.result()
                # Start step s+1 before handing out step s, so it overlaps the training step.
                nxt = pool.submit(self._step, order, s + 1) if s + 1 < steps else None
                yield from parts[self.rank]
        finally:
            # A consumer that stops early (break) closes the generator; wait for the running
            # step so that its collective (if any) completes on this rank as on the others.
            pool.shutdown(wait=True)
