"""Multiway number partitioning of per-sample costs into ranks (and micro-batches).

This file holds the partitioning algorithms behind ``blazec.runtime.balance``: Karmarkar-Karp
largest differencing (the default), LPT, online greedy, sorted round-robin and random
assignment (the last two are the baselines a plain sampler gives). Every function takes a list
of non-negative costs and returns ``parts`` lists of sample indices, each index exactly once.

The algorithms run in pure Python on Python floats: the inner loops are heap operations on
scalars, where tensor calls would cost more in dispatch than they save.
"""

from __future__ import annotations

import bisect
import collections.abc
import gc
import heapq
import math
import random
import sys
from typing import Sequence

import torch

from blazec._args import as_flag, as_int

METHODS = ("kk", "lpt", "greedy", "sorted_rr", "random")

CostsLike = Sequence[float] | torch.Tensor


def as_cost_list(costs: CostsLike, what: str = "costs", *, check_sum: bool = True) -> list[float]:
    """Validate ``costs`` (1-D, finite, non-negative) and return them as a list of floats.

    With ``check_sum`` their total must also fit in a float64 (see below).
    """
    if isinstance(costs, torch.Tensor):
        if costs.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(costs.shape)}")
        if costs.is_complex():
            raise ValueError(f"{what} must be real numbers, got a {costs.dtype} tensor")
        out = costs.detach().to("cpu", torch.float64).tolist()
    elif isinstance(costs, (str, bytes, collections.abc.Mapping)):
        # Iterating a string gives its characters: "123" would read as the costs 1, 2, 3; a
        # dict gives its keys.
        raise ValueError(f"{what} must be a sequence of numbers, got a {type(costs).__name__} {costs!r}")
    else:
        try:
            out = [float(c) for c in costs]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} must be a sequence of numbers: {e}") from None
    for i, c in enumerate(out):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"{what} must be finite and >= 0, got {what}[{i}] = {c}")
    # Part loads are sums of costs: a total beyond float64 would make them inf (and the
    # partitions' comparisons meaningless, math.fsum raise OverflowError). Costs are >= 0, so
    # the plain sum is inf exactly when the running total leaves float64's range.
    if check_sum and math.isinf(sum(out)):
        raise ValueError(
            f"{what} sum to more than the largest float64 ({sys.float_info.max:.4g}), so part sums "
            f"would overflow; rescale them (only ratios matter), largest is {max(out):.4g}"
        )
    return out


def check_count(value: object, what: str) -> int:
    """``value`` as an int >= 1: Python or numpy integers (else a TypeError), >= 1 (else a
    ValueError), named ``what`` in the message."""
    n = as_int(value, what)
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return n


def partition(
    costs: CostsLike,
    parts: int,
    method: str = "kk",
    *,
    equal_counts: bool = False,
    seed: int = 0,
) -> list[list[int]]:
    """Split sample indices ``0..n-1`` into ``parts`` lists that balance the summed cost.

    Args:
        costs: per-sample cost, 1-D, finite, >= 0.
        parts: number of parts (ranks, or micro-batches), a Python or numpy int >= 1.
        method: one of ``METHODS``: ``"kk"`` (Karmarkar-Karp largest differencing),
            ``"lpt"`` (longest processing time first), ``"greedy"`` (online, input order),
            ``"sorted_rr"`` (sort by cost, deal round-robin), ``"random"`` (shuffle, chunk).
        equal_counts: every part gets ``floor(n/parts)`` or ``ceil(n/parts)`` samples.
            ``sorted_rr`` and ``random`` always satisfy it. For ``"kk"`` it selects balanced
            differencing followed by a swap local search (see ``_kk_equal``).
        seed: an int, only used by ``"random"``.

    Returns:
        ``parts`` lists of indices, each sorted ascending; together they hold every index once.
        With fewer samples than parts some parts are empty.

    Wrong types (``parts=2.0``, ``equal_counts=1``, ``seed="a"``) raise a ``TypeError``; bad
    values (``parts=0``, a negative or non-finite cost, an unknown method) a ``ValueError``.
    """
    parts = check_count(parts, "parts")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; choose one of {', '.join(METHODS)}")
    equal_counts, seed = as_flag(equal_counts, "equal_counts"), as_int(seed, "seed")
    c = as_cost_list(costs)
    if method == "kk":
        # The run allocates ~n small tuples; the cyclic GC would scan them repeatedly for
        # nothing (they hold no cycles), which doubled the run time at n = 100k.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            out = _refine_swaps(c, _kk_equal(c, parts)) if equal_counts else _kk(c, parts)
        finally:
            if gc_was_enabled:
                gc.enable()
    elif method == "lpt":
        order = sorted(range(len(c)), key=lambda i: (-c[i], i))
        out = _greedy(c, parts, order, equal_counts)
    elif method == "greedy":
        out = _greedy(c, parts, range(len(c)), equal_counts)
    elif method == "sorted_rr":
        order = sorted(range(len(c)), key=lambda i: (-c[i], i))
        out = [order[p::parts] for p in range(parts)]
    else:
        perm = list(range(len(c)))
        random.Random(seed).shuffle(perm)
        out = [perm[lo:hi] for lo, hi in _chunk_bounds(len(c), parts)]
    for p in out:
        p.sort()
    return out


def _chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Bounds of ``parts`` contiguous chunks of sizes ceil(n/parts) (first n%parts) or floor."""
    q, r = divmod(n, parts)
    bounds, lo = [], 0
    for p in range(parts):
        hi = lo + q + (1 if p < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _greedy(c: list[float], parts: int, order, equal_counts: bool) -> list[list[int]]:
    """Assign samples in ``order`` to the currently least-loaded part (LPT when sorted).

    The heap key is ``(load, count, part)``, so zero-cost samples still spread across parts.
    With ``equal_counts`` a part closes at ``ceil(n/parts)`` samples, and once ``n % parts``
    parts have reached the ceiling the others close at the floor; closed parts are dropped
    from the heap lazily when popped.
    """
    n = len(c)
    lo, n_hi = divmod(n, parts)  # n_hi parts may hold lo + 1 samples
    out: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0.0, 0, p) for p in range(parts)]
    for i in order:
        while True:
            load, cnt, p = heapq.heappop(heap)
            if not equal_counts:
                break
            if cnt < lo or (cnt == lo and n_hi > 0):
                break  # part still open; otherwise it is closed and stays out of the heap
        out[p].append(i)
        if equal_counts and cnt + 1 > lo:
            n_hi -= 1
        heapq.heappush(heap, (load + c[i], cnt + 1, p))
    return out


def _kk(c: list[float], k: int) -> list[list[int]]:
    """k-way Karmarkar-Karp largest differencing method (LDM).

    Every sample starts as a partial partition ("state") of k subset sums ``(c_i, 0, ..., 0)``.
    The spread of a state is ``max - min`` of its sums. LDM repeatedly removes the two states
    with the largest spreads, A and B, and replaces them by their combination: the sums of A in
    descending order are added to the sums of B in ascending order (largest with smallest), so
    the two spreads cancel as much as one pairing can. After ``n - 1`` combinations one state
    is left; its k subsets are the parts.

    A direct implementation sorts k sums per combination, ``O(n k log k)``: too slow for
    100k samples and 256 parts in Python. Two facts make it cheap:

    * Most states are sparse: m < k occupied subsets, the rest empty with sum 0. For sparse A
      and B with ``m_A + m_B <= k``, pairing A descending with B ascending puts every occupied
      subset of A against an empty one of B and vice versa, so the combination is the union
      (``O(min(m_A, m_B))`` with ``list.extend``).
    * Otherwise let S be the state with fewer occupied subsets (m_S of them) and H the other,
      padded with empty subsets to k. Largest-with-smallest only changes the m_S smallest sums
      of H, which receive S's sums in descending order. With H kept as a min-heap that costs
      ``O(m_S log k)``.

    Sums are never normalised (LDM subtracts the minimum): the pairing depends only on ranks
    and the spread ``max - min`` is shift-invariant, so the final sums are the true part costs.
    Subset membership is kept as linked lists over sample indices (``nxt``/``tail``), so joining
    two subsets is O(1). Empty padding subsets carry negative ids, so on ties the heap fills
    empty subsets first and no part stays empty when n >= k.
    """
    n = len(c)
    if k == 1:
        return [list(range(n))]
    nxt = [-1] * n
    tail = list(range(n))

    def join(a: int, b: int) -> int:
        # Concatenate the linked lists headed by a and b; negative ids are empty subsets.
        if a < 0:
            return b
        if b < 0:
            return a
        nxt[tail[a]] = b
        tail[a] = tail[b]
        return a

    # Merged states live in a heap of (-spread, seq, full, max_sum, items). items is a list
    # of (sum, head); for full states it is a heap of exactly k entries, for sparse ones
    # (full=False) it holds the m < k occupied subsets in no particular order and the spread
    # is max_sum (the minimum is an empty subset, 0). Singletons are never pushed back, so
    # they stay in one list sorted by descending cost and are consumed from the front: that
    # saves a heap push and pop per sample, most of the run time for large n.
    single = sorted(range(n), key=c.__getitem__, reverse=True)  # stable: ties by index
    sc = [c[i] for i in single]
    si = 0
    states: list = []
    seq = 0
    carry = None  # the newest state, when it is certain to be popped next

    def pop():
        nonlocal si, carry
        if carry is not None:
            out, carry = carry, None
            return out
        if si < n and (not states or sc[si] >= -states[0][0]):
            v = sc[si]
            si += 1
            return False, v, [(v, single[si - 1])]
        _, _, full, mx, items = heapq.heappop(states)
        return full, mx, items

    def push(spread: float, full: bool, mx: float, items: list) -> None:
        nonlocal carry
        # A new state with a strictly larger spread than every other state is the next one
        # LDM pops (on ties older states go first, as the heap's sequence numbers order
        # them), so it skips the heap round trip. Long runs of merges continue one state
        # (a sparse state collecting singletons, a full one absorbing them): ~25% faster.
        if (not states or spread > -states[0][0]) and (si >= n or spread > sc[si]):
            carry = (full, mx, items)
        else:
            heapq.heappush(states, (-spread, seq, full, mx, items))

    for _ in range(n - 1):
        full_a, max_a, items_a = pop()
        full_b, max_b, items_b = pop()
        seq += 1
        if not full_a and not full_b and len(items_a) + len(items_b) < k:
            if len(items_a) < len(items_b):
                items_a, items_b = items_b, items_a
            items_a.extend(items_b)
            mx = max(max_a, max_b)
            push(mx, False, mx, items_a)
            continue
        # S = the state with fewer occupied subsets, H = the other, padded to k as a heap.
        if len(items_a) < len(items_b):
            items_a, items_b, full_a, full_b = items_b, items_a, full_b, full_a
        h, s = items_a, items_b
        if not full_a:
            h.extend((0.0, -1 - j) for j in range(k - len(h)))
            heapq.heapify(h)
        mx = max(max_a, max_b)
        m_s = len(s)
        s_desc = sorted(s, reverse=True)
        if m_s * 4 > k:
            # Many subsets change: one sort of H beats m_s heap pops.
            h_asc = sorted(h)
            new = [(hv + sv, join(hh, sh)) for (hv, hh), (sv, sh) in zip(h_asc, s_desc)]
            for v, _ in new:
                if v > mx:
                    mx = v
            new.extend(h_asc[m_s:])
            heapq.heapify(new)
            h = new
        elif m_s == 1:
            # The most common merge (a full state absorbing one subset): join inlined.
            (sv, sh), (hv, hh) = s[0], h[0]
            v = hv + sv
            if v > mx:
                mx = v
            if hh >= 0:
                nxt[tail[hh]] = sh
                tail[hh] = tail[sh]
                sh = hh
            heapq.heapreplace(h, (v, sh))
        else:
            low = [heapq.heappop(h) for _ in range(m_s)]
            for (hv, hh), (sv, sh) in zip(low, s_desc):
                v = hv + sv
                if v > mx:
                    mx = v
                heapq.heappush(h, (v, join(hh, sh)))
        push(mx - h[0][0], True, mx, h)
    if carry is not None:
        items = carry[2]
    elif states:
        items = states[0][4]
    else:  # n <= 1: no merge happened
        items = [(c[i], i) for i in single]
    out = [_walk(head, nxt) for _, head in items]
    out.extend([] for _ in range(k - len(out)))
    return out


def _walk(head: int, nxt: list[int]) -> list[int]:
    out = []
    while head >= 0:
        out.append(head)
        head = nxt[head]
    return out


def _kk_equal(c: list[float], k: int) -> list[list[int]]:
    """Balanced largest differencing (LDM with a cardinality constraint).

    Samples are sorted by cost, padded with zero-cost dummies to a multiple of k, and cut into
    consecutive chunks of k; each chunk is a state with one sample per subset. Combining two
    states pairs sums largest-with-smallest as in plain LDM, so every subset gains exactly one
    sample per chunk and all parts end with the same count (real samples differ by at most one
    because the dummies are dropped).

    The chunk structure is a strong constraint (each part gets exactly one sample of each
    chunk, a stronger one than equal counts): when the first chunk's spread is larger than all
    other chunks' spreads together, as with heavy-tailed lengths, combining cannot cancel it
    (13% bubble at 256 parts x 32 Zipf(1.2) samples). ``partition`` therefore follows it with
    ``_refine_swaps``, which brought that case to 0.006%.
    """
    n = len(c)
    if n == 0:
        return [[] for _ in range(k)]
    order = sorted(range(n), key=lambda i: (-c[i], i))
    n_pad = -(-n // k) * k
    order.extend(range(n, n_pad))  # dummies: ids >= n, cost 0, smallest, so in the last chunk
    cost = c + [0.0] * (n_pad - n)
    nxt = [-1] * n_pad
    tail = list(range(n_pad))
    states = []
    for j in range(0, n_pad, k):
        chunk = order[j : j + k]
        sums = sorted((cost[i], i) for i in chunk)
        states.append((-(sums[-1][0] - sums[0][0]), j, sums))
    heapq.heapify(states)
    seq = n_pad
    while len(states) > 1:
        _, _, a = heapq.heappop(states)  # both ascending
        _, _, b = heapq.heappop(states)
        merged = []
        for (av, ah), (bv, bh) in zip(a, reversed(b)):
            nxt[tail[ah]] = bh
            tail[ah] = tail[bh]
            merged.append((av + bv, ah))
        merged.sort()
        seq += 1
        heapq.heappush(states, (-(merged[-1][0] - merged[0][0]), seq, merged))
    return [[i for i in _walk(h, nxt) if i < n] for _, h in states[0][2]]


def _refine_swaps(c: list[float], parts: list[list[int]], candidates: int = 8) -> list[list[int]]:
    """Local search that lowers the maximum part cost by swapping two samples (counts kept).

    With P the heaviest part, Q a lighter one and gap ``G = load_P - load_Q``, swapping
    ``i in P`` for ``j in Q`` with ``d = c_i - c_j`` gives the two parts
    ``load_P - d`` and ``load_Q + d``; their maximum drops below ``load_P`` iff
    ``0 < d < G``, by ``min(d, G - d)``, best at ``d = G/2``. For each i the best j is found by
    bisection in Q's sorted costs. Q runs over the ``candidates`` lightest parts (the largest
    gaps); the first Q with an improving swap is taken, and the search stops when the heaviest
    part has none, or after ``4 k`` swaps (enough in the cases measured: the 256-part Zipf
    and log-normal cases stop after about 2 k; heavy single samples otherwise make it creep). Each swap strictly lowers the heaviest part's load
    or moves the maximum to another part, so it cannot cycle.
    """
    k = len(parts)
    if k < 2:
        return parts
    loads = [math.fsum(c[i] for i in p) for p in parts]
    srt: dict[int, tuple[list[float], list[int]]] = {}  # part -> (sorted costs, indices), lazily

    def sorted_part(p: int) -> tuple[list[float], list[int]]:
        if p not in srt:
            pairs = sorted((c[i], i) for i in parts[p])
            srt[p] = ([v for v, _ in pairs], [i for _, i in pairs])
        return srt[p]

    for _ in range(4 * k):
        P = max(range(k), key=loads.__getitem__)
        LP = loads[P]
        # Gains below 1e-6 of the maximum do not matter for a step's wall time, and chasing
        # them made a case with one dominant sample run 1024 tiny swaps (0.5 s at n = 100k).
        tol = 1e-6 * LP
        swapped = False
        for Q in heapq.nsmallest(candidates, range(k), key=loads.__getitem__):
            G = LP - loads[Q]
            if G <= tol:
                break
            pv, pi = sorted_part(P)
            qv, qi = sorted_part(Q)
            best, bi, bj = tol, -1, -1
            for a, ci in enumerate(pv):
                pos = bisect.bisect_left(qv, ci - G / 2)
                for b in (pos - 1, pos):
                    if 0 <= b < len(qv):
                        d = ci - qv[b]
                        if 0 < d < G and min(d, G - d) > best:
                            best, bi, bj = min(d, G - d), a, b
            if bi < 0:
                continue
            ci, ii = pv.pop(bi), pi.pop(bi)
            cj, jj = qv.pop(bj), qi.pop(bj)
            at = bisect.bisect_left(pv, cj)
            pv.insert(at, cj)
            pi.insert(at, jj)
            at = bisect.bisect_left(qv, ci)
            qv.insert(at, ci)
            qi.insert(at, ii)
            loads[P] += cj - ci
            loads[Q] += ci - cj
            swapped = True
            break
        if not swapped:
            break
    return [sorted(srt[p][1]) if p in srt else parts[p] for p in range(k)]


def part_costs(costs: CostsLike, parts: Sequence[Sequence[int]]) -> list[float]:
    """Summed cost of each part. ``parts`` holds sample indices in ``[0, len(costs))``, each at
    most once over all parts (not necessarily all of them)."""
    c = as_cost_list(costs)
    if isinstance(parts, (str, bytes)) or not isinstance(parts, (Sequence, torch.Tensor)):
        raise TypeError(f"parts must be a sequence of parts, each a sequence of sample indices, got {parts!r} "
                        f"({type(parts).__name__})")
    seen: dict[int, int] = {}
    for p, part in enumerate(parts):
        if isinstance(part, (str, bytes)) or not isinstance(part, (Sequence, torch.Tensor)):
            raise TypeError(f"parts[{p}] must be a sequence of sample indices, got {part!r} ({type(part).__name__})")
        for i in part:
            i = as_int(i, f"parts[{p}] entry")
            if not 0 <= i < len(c):
                raise ValueError(f"parts[{p}] holds sample index {i}, outside [0, {len(c)}) for {len(c)} costs")
            if i in seen:
                where = f"twice in parts[{p}]" if seen[i] == p else f"in parts[{seen[i]}] and parts[{p}]"
                raise ValueError(f"sample index {i} is {where}: each sample belongs to one part, once")
            seen[i] = p
    return [math.fsum(c[int(i)] for i in p) for p in parts]


def fill_short_parts(c: list[float], parts: list[list[int]], least: int) -> bool:
    """Give every part at least ``least`` samples (``len(c) >= len(parts) * least``), in place.

    Parts with fewer receive the smallest samples of the parts that have more than ``least``
    (smallest first, ties by index), which changes the loads as little as single moves can. A
    part is short when it drew a few very costly samples, so it is the heaviest one and the
    moved samples add to the maximum. Returns whether anything moved.
    """
    counts = [len(p) for p in parts]
    short = [p for p, n in enumerate(counts) if n < least]
    if not short:
        return False
    pool = sorted((c[i], i, p) for p, idx in enumerate(parts) if counts[p] > least for i in idx)
    moved: dict[int, int] = {}  # sample -> its new part
    pos = 0
    for p in short:
        while counts[p] < least:
            _, i, d = pool[pos]
            pos += 1
            if counts[d] > least:  # the donor keeps at least ``least``
                counts[d] -= 1
                counts[p] += 1
                moved[i] = p
    for p in range(len(parts)):
        parts[p] = [i for i in parts[p] if i not in moved]
    for i, p in moved.items():
        parts[p].append(i)
    return True


def split_in_rounds(c: list[float], ranks: list[list[int]], micro_batches: int) -> list[list[list[int]]]:
    """Split each rank's samples into ``micro_batches`` micro-batches whose costs match across
    ranks: ``out[r][m]``, every micro-batch non-empty when its rank has >= ``micro_batches``
    samples (otherwise the last ones are empty).

    Micro-batch m of every rank runs at the same time (DDP all-reduces the gradients after each
    micro-batch's backward, unless ``no_sync``), so the step takes ``sum_m max_r cost[r][m]``.
    Splitting each rank evenly is not enough: a rank holding one very costly sample cannot, and
    its micro-batch with that sample sets the pace. So the micro-batches are filled in rounds.
    In round m, with ``k = micro_batches - m`` micro-batches left, the target ``P`` is the
    largest over ranks of ``max(largest sample left, cost left / k)``, the least that the
    fullest rank's micro-batch m can cost; every rank then takes its remaining samples largest
    first, each one that keeps the micro-batch at or below ``P`` while ``k - 1`` samples stay
    for the later rounds. The last micro-batch takes the rest. Rank sums are not changed.
    """
    rest = [sorted(idx, key=lambda i: (-c[i], i)) for idx in ranks]
    out: list[list[list[int]]] = [[] for _ in ranks]
    for m in range(micro_batches - 1):
        k = micro_batches - m
        target = max((max(c[r[0]], math.fsum(c[i] for i in r) / k) for r in rest if r), default=0.0)
        for r, order in enumerate(rest):
            keep = min(k - 1, len(order) - 1)  # samples the later rounds still need
            take, left, load = [], [], 0.0
            for i in order:
                if load + c[i] <= target and len(order) - len(take) - 1 >= keep:
                    take.append(i)
                    load += c[i]
                else:
                    left.append(i)
            out[r].append(sorted(take))
            rest[r] = left
    for r, order in enumerate(rest):
        out[r].append(sorted(order))
    return out
