"""Routing index build for ``blazec::moe_route``: counts, a prefix scan, a stable scatter.

Replaces ``blazec.ops.reference.moe_route`` on CUDA (same signature, same outputs bit for bit).
No sort and no atomics: the T*k pairs are read in *priority order* (pair p = t*k + j for
"token"; position q = j*T + t for "slot", GShard), cut into NB blocks of BLOCK positions, and

1. ``_route_count_kernel`` (grid NB): counts[e, b] = pairs of expert e in block b, and
   counts[E, b] = ids of block b outside [0, E).
2. ``_route_scan_kernel`` (grid 1): base[e, b] = exclusive prefix of counts[e, :] over blocks
   (a pair's rank among its expert's pairs that come earlier in priority order, up to its
   block), totals, kept = min(total, capacity) and expert_offsets = exclusive cumsum of kept;
   ``ok`` = no id outside [0, E), which one ``torch._assert_async`` then checks (on the device,
   without a host sync: the op's range check for this kernel, one launch where a check of its
   own on the ids takes five).
3. ``_route_scatter_kernel`` (grid NB): for each pair, rank = base[e, b] + its exclusive rank
   inside the block among pairs of the same expert (a one-hot cumsum, in expert chunks).
   A pair is kept iff rank < capacity, so capacity drops keep the original priority order.
   Kept pairs go to dest = offsets[e] + rank: sorted_pairs[dest] = p, pair_pos[p] = dest;
   dropped pairs get pair_pos[p] = -1, and the tail of sorted_pairs stays -1.

Every output element is written by exactly one program with a value that does not depend on
scheduling, so the result is deterministic.

Floor (P = T*k pairs, E experts, int64 outputs): reads topk_ids twice (2*P*s bytes, s = its
element size), writes sorted_pairs and pair_pos (16*P bytes) and offsets (8*(E+1)); the
counts/base scratch is 8*E*NB bytes. No FLOPs to speak of: O(P*E/CHUNK) compares in
registers. At olmoe-like (P = 131072, int64 ids) that is ~4 MiB, about 1.5 us of HBM time:
the three launches (~10 us) dominate, which is noise next to the expert GEMMs.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from blazec.kernels._common import INTERPRET, MAX_BLOCK, csum, empty, host_cdiv, next_pow2, rsum
from blazec.ops.route import id_range_message


_WARNED_E: set[int] = set()


@triton.jit
def _priority_pairs(b, T, K, P, SLOT: tl.constexpr, BLOCK: tl.constexpr):
    """Pair ids of block b in priority order, and the validity mask."""
    q = b * BLOCK + tl.arange(0, BLOCK)
    valid = q < P
    if SLOT:
        p = (q % T) * K + q // T  # q = j*T + t  ->  p = t*K + j
    else:
        p = q
    return p, valid


@triton.jit
def _route_count_kernel(
    ids_ptr,  # [T*K] topk_ids, contiguous, any integer dtype (read)
    counts_ptr,  # [E+1, NB] int32: pairs of expert e in priority block b; row E: bad ids (written)
    T, K, P, E, NB,
    SLOT: tl.constexpr,  # priority "slot" (GShard) instead of "token"
    BLOCK: tl.constexpr,  # priority positions per block
    E_CHUNK: tl.constexpr,  # experts handled per one-hot pass
):
    b = tl.program_id(0)
    p, valid = _priority_pairs(b, T, K, P, SLOT, BLOCK)
    # -1 on padding lanes after the cast: as ``other`` it would wrap in an unsigned dtype (255
    # for uint8, a valid expert once E > 255)
    raw = tl.load(ids_ptr + p, mask=valid, other=0)
    # compared before the cast, which would take an int64 id of 2**32 + 3 to expert 3
    bad = valid & ((raw < 0) | (raw >= E))
    tl.store(counts_ptr + E * NB + b, rsum(bad.to(tl.int32), 0))
    ids = tl.where(valid, raw.to(tl.int32), -1)
    for e0 in range(0, E, E_CHUNK):
        ec = e0 + tl.arange(0, E_CHUNK)
        hit = (ids[:, None] == ec[None, :]).to(tl.int32)
        tl.store(counts_ptr + ec * NB + b, rsum(hit, 0), mask=ec < E)


@triton.jit
def _route_scan_kernel(
    counts_ptr,  # [E+1, NB] int32 per-block counts, row E the bad ids (read)
    base_ptr,  # [E, NB] int32 exclusive prefix over blocks (written)
    offsets_ptr,  # [E+1] int64 expert_offsets of kept pairs (written)
    ok_ptr,  # [1] bool: no id outside [0, E) (written)
    E, NB, capacity,  # capacity < 0 keeps every pair
    E_PAD: tl.constexpr,  # next power of two >= E
    B_CHUNK: tl.constexpr,  # blocks scanned per step
):
    e = tl.arange(0, E_PAD)
    emask = e < E
    run = tl.full([E_PAD], 0, dtype=tl.int32)
    nbad = tl.full([B_CHUNK], 0, dtype=tl.int32)
    for b0 in range(0, NB, B_CHUNK):
        bb = b0 + tl.arange(0, B_CHUNK)
        m = emask[:, None] & (bb < NB)[None, :]
        c = tl.load(counts_ptr + e[:, None] * NB + bb[None, :], mask=m, other=0)
        incl = csum(c, 1)
        tl.store(base_ptr + e[:, None] * NB + bb[None, :], run[:, None] + incl - c, mask=m)
        run += rsum(c, 1)
        nbad += tl.load(counts_ptr + E * NB + bb, mask=bb < NB, other=0)
    tl.store(ok_ptr, rsum(nbad, 0) == 0)
    if capacity >= 0:
        kept = tl.where(run < capacity, run, capacity)
    else:
        kept = run
    incl = csum(kept, 0)
    tl.store(offsets_ptr + 1 + e, incl.to(tl.int64), mask=emask)
    tl.store(offsets_ptr + e, tl.full([E_PAD], 0, dtype=tl.int64), mask=e == 0)


@triton.jit
def _route_scatter_kernel(
    ids_ptr,  # [T*K] topk_ids (read)
    base_ptr,  # [E, NB] int32 per-block exclusive prefix from the scan (read)
    offsets_ptr,  # [E+1] int64 expert_offsets (read)
    sorted_ptr,  # [P] int64 sorted_pairs (written at kept destinations)
    pos_ptr,  # [P] int64 pair_pos (written for every pair)
    T, K, P, E, NB, capacity,
    SLOT: tl.constexpr,
    BLOCK: tl.constexpr,
    E_CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    p, valid = _priority_pairs(b, T, K, P, SLOT, BLOCK)
    # -1 on padding lanes after the cast: as ``other`` it would wrap in an unsigned dtype (255
    # for uint8, a valid expert once E > 255)
    ids = tl.where(valid, tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32), -1)
    # Exclusive rank of each pair among same-expert pairs earlier in this block.
    rank = tl.full([BLOCK], 0, dtype=tl.int32)
    for e0 in range(0, E, E_CHUNK):
        ec = e0 + tl.arange(0, E_CHUNK)
        hit = (ids[:, None] == ec[None, :]).to(tl.int32)
        before = csum(hit, 0) - hit
        rank += rsum(before * hit, 1)
    # an id outside [0, E) (the assert after the scan fails) reads in bounds all the same
    e_safe = tl.where(valid & (ids >= 0) & (ids < E), ids, 0)
    rank += tl.load(base_ptr + e_safe * NB + b, mask=valid, other=0)
    if capacity >= 0:
        keep = valid & (rank < capacity)
    else:
        keep = valid
    dest = tl.load(offsets_ptr + e_safe, mask=valid, other=0) + rank.to(tl.int64)
    tl.store(sorted_ptr + dest, p.to(tl.int64), mask=keep)
    tl.store(pos_ptr + p, tl.where(keep, dest, -1), mask=valid)


def route_block(P: int) -> int:
    """Priority positions per block: small under the interpreter so tests cross blocks."""
    if INTERPRET:
        return 16
    return 256 if P >= 4096 else 64


def moe_route(topk_ids: Tensor, num_experts: int, capacity: int, priority: str) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``moe_route`` with the signature and outputs of ``reference.moe_route``.

    It checks that the ids lie in [0, num_experts) itself, on the device (``torch._assert_async``
    of the scan's flag: a ``RuntimeError`` on the CPU, a device-side assert on a GPU), so the op
    skips its own check for it (``CHECKS_ID_RANGE``)."""
    T, K = topk_ids.shape
    P, E = T * K, int(num_experts)
    dev = topk_ids.device
    if P == 0 or next_pow2(E) > MAX_BLOCK:  # the scan holds every expert's count in one block
        from blazec.ops import reference, route

        if P and E not in _WARNED_E and not INTERPRET:
            _WARNED_E.add(E)
            warnings.warn(f"blazec kernels: moe_route with {E} experts, more than 2**20, past Triton's largest "
                          "block; using the reference implementation", stacklevel=2)
        route.check_ids_in_range(topk_ids, num_experts)  # the op leaves it to this function
        return reference.moe_route(topk_ids, num_experts, capacity, priority)
    if P >= 2**31 - 1:
        raise ValueError(f"moe_route kernel: T*k = {P} pairs exceeds int32 indexing")
    ids = topk_ids.contiguous()
    BLOCK = route_block(P)
    NB = host_cdiv(P, BLOCK)
    E_PAD = max(16, next_pow2(E))
    E_CHUNK = min(E_PAD, 64)
    B_CHUNK = max(1, min(next_pow2(NB), 4096 // E_PAD))
    slot = priority == "slot"

    counts = empty((E + 1, NB), torch.int32, dev)
    base = empty((E, NB), torch.int32, dev)
    offsets = empty((E + 1,), torch.int64, dev)
    ok = empty((1,), torch.bool, dev)
    if capacity >= 0:
        sorted_pairs = torch.full((P,), -1, dtype=torch.int64, device=dev)
    else:
        sorted_pairs = empty((P,), torch.int64, dev)  # every slot is written
    pair_pos = empty((P,), torch.int64, dev)

    _route_count_kernel[(NB,)](ids, counts, T, K, P, E, NB, SLOT=slot, BLOCK=BLOCK, E_CHUNK=E_CHUNK)
    _route_scan_kernel[(1,)](counts, base, offsets, ok, E, NB, capacity, E_PAD=E_PAD, B_CHUNK=B_CHUNK)
    torch._assert_async(ok, id_range_message(num_experts))
    _route_scatter_kernel[(NB,)](ids, base, offsets, sorted_pairs, pair_pos, T, K, P, E, NB, capacity,
                                 SLOT=slot, BLOCK=BLOCK, E_CHUNK=E_CHUNK)
    return sorted_pairs, offsets, pair_pos


moe_route.CHECKS_ID_RANGE = True
