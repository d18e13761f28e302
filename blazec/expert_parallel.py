"""Expert parallelism: the runtime side of the expert-parallel MoE rewrite.

With ``options={"expert_parallel": "world"}`` (or a ``ProcessGroup``), rank ``r`` of ``W``
owns experts ``[r*E/W, (r+1)*E/W)``. The MoE rewrite (``passes/moe_ep.py``) then emits, per
layer (``_i`` is a token chunk)::

    dest_i, present_i, counts_i = ep_plan(ids_i, keep_i, n_local, world)   # local
    splits = ep_exchange_counts([counts_0, ...], world, group)      # one small all_to_all + sync
    send_tok_i, send_ids_i, mine_i = ep_rows(ids_i, dest_i, present_i, splits[i][0], n_local)
    rx_i, rids_i, rw_i = ep_send(x_i, w_i, send_tok_i, send_ids_i, mine_i, *splits[i], group)
    y_local_i = moe_experts(rx_i, rw_i, *local_route(rids_i, n_local), local weights)
    back_i = ep_return(y_local_i, *splits[i], group)                 # all_to_all back
    y_i = ep_sum(back_i, x_i, send_tok_i)                            # sum per token

These functions are plain torch code. The rewrite calls them from the Dynamo graph, so
AOTAutograd traces them into aten ops and ``_c10d_functional`` collectives, and autograd derives
the backward (the reverse all_to_alls) itself. ``local_route`` is the custom op
``blazec::moe_route_sink``, whose outputs carry ``moe_route``'s mark of a valid route.

**Dispatch sends each token row once per destination rank**, not once per (token, expert)
pair: a token whose k experts live on two ranks is sent twice, with its k slots' local expert
ids (or ``n_local``, a sink, for slots owned elsewhere) and routing weights (0 for those
slots) riding along. Rows are ordered by destination rank, then by token, so the receiving
rank sees its sources in rank order. The split sizes are computed on device, exchanged for
all chunks with one small all_to_all, and read back with ``.tolist()``: one host sync per
layer (the collectives need their split sizes as integers), before any row moves.

**Capacity** (GShard/Switch forms) is applied on the source rank, over its own tokens, with the
same priority order as the single-process op, so dropped pairs are exactly the ones the
single-process model drops for that rank's batch. Dropped slots are sent as sink slots (or not
sent, when all of a token's slots are dropped or remote).

**Numerics.** Outputs and gradients equal the single-process model's up to float summation
order: a token's contributions are summed per rank in slot order, then across ranks in rank
order (``index_add``; on CUDA it uses atomics, so that last sum is not bitwise deterministic).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

import blazec.ops  # noqa: F401 - registers torch.ops.blazec.*


class ExpertParallelError(ValueError):
    """The expert-parallel option cannot be honoured (no process group, bad world size, ...)."""


@dataclass(frozen=True)
class EPGroup:
    """A resolved expert-parallel process group, as compiled into the graph."""

    name: str  # the c10d group name the functional collectives address
    rank: int
    world: int
    backend: str

    def local_experts(self, num_experts: int) -> range:
        n = num_experts // self.world
        return range(self.rank * n, (self.rank + 1) * n)


def resolve_group(value) -> EPGroup:
    """``"world"`` or a ``ProcessGroup`` -> :class:`EPGroup`; a clear error otherwise."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ExpertParallelError("expert_parallel needs torch.distributed, which this torch build lacks")
    if isinstance(value, str):
        if value != "world":
            raise ExpertParallelError(
                f"expert_parallel must be 'world' or a torch.distributed ProcessGroup, got {value!r}"
            )
    elif type(value) is int and value == getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None):
        raise ExpertParallelError(
            "expert_parallel: this process is not a member of the given process group "
            "(torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER on this rank)"
        )
    elif not isinstance(value, dist.ProcessGroup):
        raise ExpertParallelError(
            f"expert_parallel must be 'world' or a torch.distributed ProcessGroup, got {type(value).__name__}"
        )
    if not dist.is_initialized():
        raise ExpertParallelError(
            "expert_parallel needs torch.distributed initialized before the first compiled call "
            "(torch.distributed.init_process_group(...), for example under torchrun)"
        )
    group = dist.group.WORLD if isinstance(value, str) else value
    rank = dist.get_rank(group)
    if rank < 0:
        raise ExpertParallelError("expert_parallel: this process is not a member of the given process group")
    return EPGroup(group.group_name, rank, dist.get_world_size(group), str(dist.get_backend(group)))


def ep_plan(ids: Tensor, keep: Tensor | None, n_local: int, world: int):
    """Which ranks each token of a chunk goes to; local compute only, no host sync.

    Args:
        ids: ``[T, k]`` global expert ids. keep: ``[T, k]`` bool, False for pairs dropped by
        capacity, or None. n_local: experts per rank. world: ranks in the group.

    Returns ``(dest, present, send_counts)``: each slot's owning rank ``[T, k]`` (``world``
    for a dropped slot), whether token t goes to rank r ``[T, W]`` (0/1), and the rows per
    destination rank ``[W]``.
    """
    dest = torch.div(ids.to(torch.int64), n_local, rounding_mode="floor")
    if keep is not None:
        dest = torch.where(keep, dest, world)  # dropped pairs go to a rank that does not exist
    present = torch.zeros(ids.shape[0], world + 1, dtype=torch.int64, device=ids.device).scatter_(1, dest, 1)
    present = present[:, :world]
    return dest, present, present.sum(0)


def ep_rows(ids: Tensor, dest: Tensor, present: Tensor, in_splits, n_local: int):
    """The rows to send, once the row counts are known on the host (so no further sync).

    Returns ``(send_tok, send_ids, mine)``: the token of each row ``[S]`` (grouped by
    destination rank, then in token order), its slots' local expert ids at the destination
    ``[S, k]`` (``n_local``, a sink, for a slot owned elsewhere), and which slots the
    destination owns ``[S, k]``.
    """
    rank_tok = torch.nonzero_static(present.t(), size=sum(in_splits))  # [S, 2]: (rank, token)
    send_tok = rank_tok[:, 1]
    mine = dest.index_select(0, send_tok) == rank_tok[:, :1]
    send_ids = torch.where(mine, ids.to(torch.int64).index_select(0, send_tok) - rank_tok[:, :1] * n_local,
                           n_local)
    return send_tok, send_ids, mine


def ep_exchange_counts(send_counts: list[Tensor], world: int, group_name: str) -> list[tuple[list, list]]:
    """One all_to_all of every chunk's row counts, and one host read: ``[(in_splits, out_splits)]``.

    The collectives need their split sizes as integers, so this is the layer's one host sync.
    Doing it once for all chunks, before any row moves, keeps later chunks' transfers from
    waiting behind it.
    """
    import torch.distributed._functional_collectives as fc

    n = len(send_counts)
    sent = torch.stack(send_counts, 1)  # [W, N]: rows to rank r from chunk i
    recv = fc.all_to_all_single(sent.reshape(-1), [n] * world, [n] * world, group_name).view(world, n)
    sent_l, recv_l = sent.tolist(), recv.tolist()
    out = []
    for i in range(n):
        in_splits = [sent_l[r][i] for r in range(world)]
        out_splits = [recv_l[r][i] for r in range(world)]
        for v in in_splits + out_splits:
            torch._check(v >= 0)
        out.append((in_splits, out_splits))
    return out


def ep_send(x: Tensor, weights: Tensor, send_tok: Tensor, send_ids: Tensor, mine: Tensor,
            in_splits, out_splits, group_name: str):
    """Send a chunk's rows, slot ids and slot weights: ``(rx [R, d], rids [R, k], rw [R, k])``.

    Slots the destination does not own carry weight 0 (and the sink id from :func:`ep_rows`).
    """
    import torch.distributed._functional_collectives as fc

    send_w = torch.where(mine, weights.index_select(0, send_tok),
                         torch.zeros((), dtype=weights.dtype, device=weights.device))
    rx = fc.all_to_all_single_autograd(x.index_select(0, send_tok), out_splits, in_splits, group_name)
    rids = fc.all_to_all_single(send_ids, out_splits, in_splits, group_name)
    rw = fc.all_to_all_single_autograd(send_w, out_splits, in_splits, group_name)
    return rx, rids, rw


def local_route(rids: Tensor, n_local: int):
    """``moe_route`` over the received slots, with sink slots (id ``n_local``) marked dropped
    (``blazec::moe_route_sink``, whose outputs carry the mark of a valid route, so that
    ``moe_experts`` reads them without checking them on the host)."""
    return torch.ops.blazec.moe_route_sink(rids, n_local)


def kept_pairs(ids: Tensor, num_experts: int, capacity: int, priority: str) -> Tensor:
    """``[T, k]`` bool: which pairs the single-process op keeps under ``capacity``."""
    _, _, pair_pos = torch.ops.blazec.moe_route(ids, num_experts, capacity, priority)
    return (pair_pos >= 0).view(ids.shape)


def ep_return(y_local: Tensor, in_splits, out_splits, group_name: str) -> Tensor:
    """Send expert outputs back to their source ranks: ``[S, d]``, in ``ep_rows``'s row order."""
    import torch.distributed._functional_collectives as fc

    return fc.all_to_all_single_autograd(y_local, in_splits, out_splits, group_name)


def ep_sum(back: Tensor, x: Tensor, send_tok: Tensor) -> Tensor:
    """Sum each token's returned rows (one per rank it was sent to): ``[T, d]``.

    ``x`` is the dispatched input; only its row count is read.
    """
    out = torch.zeros(x.shape[0], back.shape[1], dtype=back.dtype, device=back.device)
    return out.index_add(0, send_tok, back)


# ------------------------------------------------------------------------------------------
# Gradients: which parameters are sharded experts, and the data-parallel reduction of the rest


# id -> tensor, weakly: a WeakSet would compare tensors with ==, and a dead tensor drops out
_EXPERT_PARAMS: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()
_UNMAPPED: list[str] = []  # layers whose expert weights could not be traced back to parameters
_SINGLE: list[str] = []  # layers rewritten single-process: their experts do not split over the ranks
# Weights some compiled graph reads outside an expert-parallel layer: dense for every graph
_DENSE: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def register_expert_params(tensors: list[Tensor], unmapped: list[str], single: list[str] = (),
                           dense: list[Tensor] = ()) -> None:
    """Called by the MoE rewrite (after the pass succeeded) for its expert-parallel layers, and
    with ``single`` for the layers it rewrote single-process under ``expert_parallel``.

    ``dense``: weights that this graph reads outside an expert-parallel layer (every rank gets a
    gradient for them there). They are dense from then on, for every compiled graph, even if an
    earlier or later graph's layer owns them: all-reducing an owned weight's gradient is exact
    (the ranks that do not own it contribute zeros, see ``sync_grads``), skipping a weight that
    every rank has a gradient for is not."""
    for t in dense:
        _DENSE[id(t)] = t
        if _EXPERT_PARAMS.get(id(t)) is t:
            del _EXPERT_PARAMS[id(t)]
    for t in tensors:
        if _DENSE.get(id(t)) is not t:
            _EXPERT_PARAMS[id(t)] = t
    _UNMAPPED.extend(unmapped)
    _SINGLE.extend(single)


def is_expert_param(p: Tensor) -> bool:
    """Whether ``p`` holds expert weights of a compiled expert-parallel MoE layer."""
    return _EXPERT_PARAMS.get(id(p)) is p


def sync_grads(model: torch.nn.Module, group="world", average: bool = False) -> None:
    """Make every gradient the gradient of the sum (or mean) of all ranks' losses.

    Call after ``backward()``. Expert weights need nothing: the reverse all_to_all already
    brought every rank's contribution to the owning rank. Every other parameter (router, norms,
    attention, ...) is data-parallel; its gradient is all-reduced here, in one flat buffer.
    With ``average=True`` all gradients are divided by the group size, which matches a loss
    averaged over ranks. Do not also wrap the model in DDP. A layer whose experts do not split
    evenly over the ranks runs single-process (every rank holds all its experts, a warning says
    so when it is compiled): its expert weights are data-parallel too, and reduced here.
    """
    import torch.distributed as dist

    g = resolve_group(group)
    pg = dist.group.WORLD if group == "world" else group
    params = list(model.parameters())
    known = any(is_expert_param(p) or _DENSE.get(id(p)) is p for p in params)  # dense: once owned, then read densely
    if not known and not _SINGLE:
        raise ExpertParallelError(
            "sync_grads: no expert-parallel MoE layer of this model has been compiled yet, so its experts "
            "cannot be told apart: run a compiled forward with options={'expert_parallel': ...} first; if "
            "one ran, the rewrite left its MoE layers alone (the blaze report's near misses say why: "
            "blazec.report.capture(), or `blazec dump`)")
    if _UNMAPPED:
        raise ExpertParallelError(
            "sync_grads: the expert weights of " + ", ".join(_UNMAPPED) + " could not be traced back to "
            "parameters; reduce the gradients yourself")
    # The ranks agree on which of the rest have a gradient (an expert weight that another graph
    # reads densely is dense here too, and the ranks that do not own it have none from its
    # expert-parallel layer): one that has none here while another rank has one reduces zeros.
    rest = [p for p in params if not is_expert_param(p)]
    if rest:
        has = torch.tensor([p.grad is not None for p in rest], dtype=torch.int32,
                           device=next((p.grad.device for p in rest if p.grad is not None), rest[0].device))
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=pg)
        for p, h in zip(rest, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
    dense = [p.grad for p in rest if p.grad is not None]
    if dense:
        flat = torch._utils._flatten_dense_tensors(dense)
        dist.all_reduce(flat, group=pg)
        if average:
            flat /= g.world
        for grad, new in zip(dense, torch._utils._unflatten_dense_tensors(flat, dense)):
            grad.copy_(new)
    if average:
        for p in params:
            if p.grad is not None and is_expert_param(p):
                p.grad /= g.world


# ------------------------------------------------------------------------------------------
# SM-free (copy-engine) collectives


LOW_CONTENTION_KEY = "aten_distributed_optimizations.enable_low_contention_collectives"


def _torch_has_low_contention() -> bool:
    import torch._inductor.config as inductor_config

    group = getattr(inductor_config, "aten_distributed_optimizations", None)
    return group is not None and hasattr(group, "enable_low_contention_collectives")


def sm_free_plan(group: EPGroup | None, final_stage: str) -> tuple[dict, str]:
    """What ``sm_free_comm=True`` can do here: ``(Inductor config patches, one-line notice)``.

    torch (>= 2.13) has copy-engine ("low-contention") all_gather and reduce_scatter through
    symmetric memory, which Inductor substitutes when
    ``aten_distributed_optimizations.enable_low_contention_collectives`` is on; torch itself
    skips the groups it cannot set symmetric memory up for. There is no copy-engine all_to_all
    in torch, so the expert-parallel all_to_alls keep NCCL's kernels. The notice says which.
    """
    head = "blazec: sm_free_comm: "
    if group is None:
        return {}, head + "using ordinary collectives: torch.distributed is not initialized"
    if group.backend != "nccl" or not torch.cuda.is_available():
        return {}, head + f"using ordinary collectives: needs CUDA and the NCCL backend (group backend is {group.backend!r})"
    if not _torch_has_low_contention():
        return {}, head + (f"using ordinary collectives: torch {torch.__version__} has no copy-engine collectives "
                           f"(Inductor's {LOW_CONTENTION_KEY}, torch >= 2.13)")
    if final_stage != "inductor":
        return {}, head + "using ordinary collectives: copy-engine collectives are an Inductor pass; use final_stage='inductor'"
    return {LOW_CONTENTION_KEY: True}, head + (
        "all_gather/reduce_scatter may use copy engines (torch's low-contention collectives); all_to_all has "
        "no copy-engine variant in torch, so expert-parallel all_to_alls keep NCCL's kernels")


_NOTICED: set[str] = set()


def sm_free_notice(group: EPGroup | None, final_stage: str = "inductor") -> tuple[dict, str]:
    """:func:`sm_free_plan` for the configured or the world group; logs its notice once per process."""
    import logging

    import torch.distributed as dist

    if group is None and dist.is_available() and dist.is_initialized():
        group = resolve_group("world")
    patches, msg = sm_free_plan(group, final_stage)
    if msg not in _NOTICED:
        _NOTICED.add(msg)
        logging.getLogger("blazec").warning(msg)
    return patches, msg
