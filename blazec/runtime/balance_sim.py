"""``blazec balance-sim``: simulate the bubble fraction of sample-partitioning methods.

Draws global batches of ``ranks * per_rank`` sample lengths from a distribution, assigns them
to ranks with random assignment (what a plain DistributedSampler does), sorted round-robin,
LPT and Karmarkar-Karp, and prints each method's mean bubble fraction and its reduction
against random. When the true cost has an ``L^2`` term it also shows KK balancing by token
count alone, to show why the cost model matters.

Run as ``python -m blazec.runtime.balance_sim --ranks 256 --per-rank 32 --lengths zipf:1.2``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from blazec.runtime.balance import METHODS, CostModel, bubble_fraction, bubble_reduction, part_costs, partition

DEFAULT_METHODS = ("random", "sorted_rr", "lpt", "kk")
LENGTH_SPECS = "zipf:S, uniform[:LO:HI], lognormal:MU:SIGMA, fixed:N or file:PATH"
# Zipf lengths are drawn with torch.multinomial over max_len categories, which takes at most
# 2**24 of them (holding ~32 bytes per category while it draws: 512 MiB at 2**24). Other
# distributions only clip to max_len; lengths are float64, exact up to 2**53.
MAX_ZIPF_LEN = 2**24
MAX_LEN = 2**53


def check_max_len(max_len: int, kind: str, name: str = "max_len") -> None:
    """The upper bounds of ``max_len`` (called ``name`` in the message) for lengths of ``kind``."""
    if max_len > MAX_LEN:
        raise ValueError(f"{name} must be <= 2**53 = {MAX_LEN:,d} (lengths are float64), got {max_len:,d}")
    if kind == "zipf" and max_len > MAX_ZIPF_LEN:
        raise ValueError(f"{name} must be <= 2**24 = {MAX_ZIPF_LEN:,d} with zipf lengths (drawn from {name} "
                         f"categories), got {max_len:,d}")


def sample_lengths(spec: str, n: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` integer lengths in ``[1, max_len]`` from a distribution spec.

    * ``zipf:S``: truncated Zipf, ``P(L = l) ∝ l^-S`` for ``l = 1..max_len`` (S > 0).
    * ``uniform[:LO:HI]``: uniform integers in ``[LO, HI]`` (default ``[1, max_len]``).
    * ``lognormal:MU:SIGMA``: ``round(exp(N(MU, SIGMA^2)))``, clipped to ``[1, max_len]``.
    * ``fixed:N``: every length is N.
    * ``file:PATH``: resample (with replacement) the integers in PATH, one per line; a length
      above ``max_len`` is an error.

    ``max_len`` is at most ``2**53`` (``2**24`` for Zipf); spec parameters must be finite.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    kind, _, arg = spec.strip().partition(":")
    check_max_len(max_len, kind)
    args = arg.split(":") if arg else []

    def nums(names: tuple[str, ...], cast=float, optional: bool = False) -> list:
        ok = (0, len(names)) if optional else (len(names),)
        if len(args) not in ok:
            raise ValueError(f"bad lengths spec {spec!r}: {kind} takes {' or '.join(map(str, ok))} argument(s); use {LENGTH_SPECS}")
        try:
            out = [cast(a) for a in args]
        except ValueError:
            raise ValueError(f"bad lengths spec {spec!r}: arguments must be numbers") from None
        for name, v in zip(names, out):
            if not math.isfinite(v):
                raise ValueError(f"bad lengths spec {spec!r}: {name} must be a finite number, got {v}")
        return out

    if kind == "zipf":
        (s,) = nums(("S",))
        if not s > 0:
            raise ValueError(f"bad lengths spec {spec!r}: Zipf exponent must be > 0")
        support = torch.arange(1, max_len + 1, dtype=torch.float64)
        p = support.pow(-s)
        L = torch.multinomial(p / p.sum(), n, replacement=True, generator=generator) + 1
    elif kind == "uniform":
        lo, hi = nums(("LO", "HI"), int, optional=True) or [1, max_len]
        if not 1 <= lo <= hi <= max_len:
            raise ValueError(f"bad lengths spec {spec!r}: need 1 <= LO <= HI <= max_len ({max_len})")
        L = torch.randint(lo, hi + 1, (n,), generator=generator)
    elif kind == "lognormal":
        mu, sigma = nums(("MU", "SIGMA"))
        if not sigma > 0:
            raise ValueError(f"bad lengths spec {spec!r}: SIGMA must be > 0")
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        L = (mu + sigma * z).exp().round().clamp(1, max_len).long()
    elif kind == "fixed":
        (v,) = nums(("N",), int)
        if not 1 <= v <= max_len:
            raise ValueError(f"bad lengths spec {spec!r}: need 1 <= N <= max_len ({max_len})")
        L = torch.full((n,), v)
    elif kind == "file":
        if not arg:
            raise ValueError(f"bad lengths spec {spec!r}: file needs a path")
        try:
            with open(arg) as f:
                vals = [int(line) for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read lengths file {arg!r}: {e.strerror}") from None
        except ValueError:
            raise ValueError(f"lengths file {arg!r} must hold one integer per line") from None
        if not vals or min(vals) < 1:
            raise ValueError(f"lengths file {arg!r} must hold integers >= 1")
        if max(vals) > max_len:  # before the tensor: a value past int64 would fail there
            raise ValueError(f"lengths file {arg!r} holds a length of {max(vals)}, above max_len ({max_len}; "
                             "--max-len on the command line): raise it")
        pool = torch.tensor(vals)
        L = pool[torch.randint(len(vals), (n,), generator=generator)]
    else:
        raise ValueError(f"bad lengths spec {spec!r}: unknown distribution {kind!r}; use {LENGTH_SPECS}")
    return L.to(torch.float64)


@dataclass
class SimResult:
    """Mean bubble fraction per method over the simulated steps, and partition time."""

    bubbles: dict[str, float]
    seconds: dict[str, float]

    def reduction(self, method: str, baseline: str = "random") -> float:
        return bubble_reduction(self.bubbles[method], self.bubbles[baseline])


def simulate(
    ranks: int,
    per_rank: int,
    lengths: str,
    max_len: int,
    cost: CostModel,
    *,
    steps: int = 10,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    equal_counts: bool = False,
    token_baseline: bool = True,
    progress: bool = False,
) -> SimResult:
    """Mean bubble fraction of each method over ``steps`` random global batches.

    ``"random"`` is a random equal split (a shuffled DistributedSampler). Every method is
    scored with the true ``cost``. With ``token_baseline`` and ``cost.b > 0`` the row
    ``"kk (tokens)"`` partitions with ``CostModel.tokens()`` and is scored with ``cost``.
    Extra cost features (e.g. unique ids) are set to the length: every token is a unique id.
    """
    for name, v in (("ranks", ranks), ("per_rank", per_rank), ("steps", steps)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    g = torch.Generator().manual_seed(seed)
    rows = list(methods) + (["kk (tokens)"] if token_baseline and cost.b > 0 else [])
    bubbles = {m: 0.0 for m in rows}
    seconds = {m: 0.0 for m in rows}
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="balance-sim", unit="step", file=sys.stderr)
    tokens = CostModel.tokens()
    for step in it:
        L = sample_lengths(lengths, ranks * per_rank, max_len, g)
        true = cost(L, **{k: L for k in cost.extra}).tolist()
        for m in rows:
            method, believed = ("kk", tokens(L).tolist()) if m == "kk (tokens)" else (m, true)
            t0 = time.perf_counter()
            parts = partition(believed, ranks, method, equal_counts=equal_counts, seed=seed + step)
            seconds[m] += time.perf_counter() - t0
            bubbles[m] += bubble_fraction(part_costs(true, parts)) / steps
    return SimResult(bubbles, {m: s / steps for m, s in seconds.items()})


def format_table(res: SimResult) -> str:
    """Markdown table: method, bubble %, reduction vs random, partition ms per step."""
    lines = ["| method | bubble | reduction vs random | partition ms/step |", "|---|---|---|---|"]
    for m, b in res.bubbles.items():
        red = "-" if m == "random" or "random" not in res.bubbles else f"{100 * res.reduction(m):.2f}%"
        lines.append(f"| {m} | {100 * b:.3f}% | {red} | {1000 * res.seconds[m]:.1f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``blazec balance-sim``."""
    parser.add_argument("--ranks", type=int, default=256, help="data-parallel ranks (default 256)")
    parser.add_argument("--per-rank", type=int, default=32, help="samples per rank per step (default 32)")
    parser.add_argument("--lengths", default="zipf:1.2", help=f"length distribution: {LENGTH_SPECS} (default zipf:1.2)")
    parser.add_argument("--max-len", type=int, default=4096,
                        help="largest sample length (default 4096): lognormal lengths are clipped to it, "
                             "a file's longer length is an error")
    parser.add_argument(
        "--cost", default="transformer",
        help="true per-sample cost: tokens, transformer[:D], recsys[:D] or a=..,b=..,c=.. (default transformer = L + L^2/6144)",
    )
    parser.add_argument("--steps", type=int, default=10, help="global batches to simulate (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled lengths and of the random split (default 0)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; also: greedy")
    parser.add_argument("--equal-counts", action="store_true", help="balanced methods keep per-rank sample counts equal")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# Bytes a simulated step holds per sample, at least: the lengths and costs as tensors and as
# Python floats, and each method's partition (about 340 measured at 1M samples with kk, and a
# 3.09 GB peak RSS at 10M samples in a review, 2026-11-27: 310 a sample). 200 let runs of
# ~1e8 samples pass the check and then exhaust the machine.
BYTES_PER_SAMPLE = 300


def _check_memory(samples: int) -> None:
    """--ranks x --per-rank samples per step must fit this machine's memory (a lower bound):
    too many failed as an allocation error after the setup, or ran out of memory part-way."""
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # the platform does not say
        return
    if samples * BYTES_PER_SAMPLE > have:
        raise ValueError(f"--ranks x --per-rank = {samples:,d} samples per step need at least "
                         f"{samples * BYTES_PER_SAMPLE / 1024**3:,.1f} GiB (an estimate, {BYTES_PER_SAMPLE} B a "
                         f"sample), more than this machine's physical memory, {have / 1024**3:,.1f} GiB")


def run(args: argparse.Namespace) -> int:
    """Run the simulation and print the table; returns the exit code (2 on bad input)."""
    try:
        for flag, v in (("--ranks", args.ranks), ("--per-rank", args.per_rank), ("--steps", args.steps),
                        ("--max-len", args.max_len)):
            if v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        if not 0 <= args.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
        # --max-len bounds the memory too: Zipf lengths take ~32 B per category (512 MiB at 2**24).
        check_max_len(args.max_len, args.lengths.strip().partition(":")[0], "--max-len")
        _check_memory(args.ranks * args.per_rank)
        cost = CostModel.from_spec(args.cost)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise ValueError(f"--methods is empty; give a comma-separated list from {', '.join(METHODS)}")
        repeated = sorted({m for m in methods if methods.count(m) > 1})
        if repeated:
            raise ValueError(f"--methods lists {', '.join(repeated)} more than once")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if "random" not in methods:
            methods.insert(0, "random")  # the baseline every reduction is measured against
        # Validate the spec before the long run so a typo fails at once.
        sample_lengths(args.lengths, 1, args.max_len, torch.Generator().manual_seed(0))
        res = simulate(
            args.ranks, args.per_rank, args.lengths, args.max_len, cost,
            steps=args.steps, seed=args.seed, methods=methods,
            equal_counts=args.equal_counts, progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"blazec balance-sim: error: {e}", file=sys.stderr)
        return 2
    print(
        f"balance-sim: {args.ranks} ranks x {args.per_rank} samples, lengths {args.lengths} "
        f"(max {args.max_len}), cost {cost}, {args.steps} steps, seed {args.seed}"
        + (", equal counts" if args.equal_counts else "")
    )
    print(format_table(res))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m blazec.runtime.balance_sim``: the same as ``blazec balance-sim``, one-line
    errors included."""
    from blazec.cli import main as cli_main

    return cli_main(["balance-sim", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
