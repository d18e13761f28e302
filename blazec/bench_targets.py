"""The targets of docs/BASELINES.md ("What blazec must reach"), checked on one bench run.

``blazec bench`` prints these under its table so that a run answers the question it is for.
They compare rows of the *same* run: blazec on the loop model (``blazec-loop``, and
``blazec-loop-recompute``) against the fastest baseline row that ran (eager loop, sort +
grouped_mm eager or compiled). BASELINES.md's external rows (ScatterMoE, MegaBlocks, ...) are
not in this process; its numbers stay the reference for those.

- time: blazec-loop's median step <= 0.8x the best baseline's at olmoe-like, 0.9x at
  mixtral-like (other shapes: the ratio is reported without a limit);
- time, graphs: the same limit for blazec-loop-cudagraphs (``mode="reduce-overhead"``) against
  the fastest baseline row of the run, sort-grouped-mm-compile-cudagraphs (the compiled
  baseline under the same mode, also without the host's per-step launch cost) included;
- act: what blazec-loop keeps after forward <= (the expert pre-activations, S x n_in elements
  with S = T*k and n_in = 2I for SwiGLU, + the O(T*k) index bytes: the route's sorted pairs,
  pair positions and offsets, and the router's top-k ids and weights) x 1.05; the router's
  [T, E] probabilities, which every row keeps, fit in the slack at the GPU shapes;
- recompute act: blazec-loop-recompute keeps < 0.1 GiB after forward;
- recompute time: blazec-loop-recompute <= 1.3x blazec-loop's time;
- peak: blazec-loop's peak <= the lowest baseline peak (GPU only: CPU runs measure no peak).
  BASELINES.md says "at or below the best row's", and calls the fastest row the best in its
  speed target; the lowest peak is the stricter reading, and the line also gives the fastest
  baseline row's peak where that row is another;
- agreement: blazec-loop's output, dL/dx and weight-gradient errors against the eager loop stay within a sanity
  bound for the dtype (a fast row with wrong numbers meets nothing; the exact numerical
  contract is what the kernel tests check).

A target whose rows did not run (or failed) is left out. These are benchmark readings, never
test assertions; on CPU they are printed with a note that CPU timings are not the claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

BASELINE_ROWS = ("eager-loop", "sort-grouped-mm", "sort-grouped-mm-compile", "hf-grouped-mm-compile")
# Rows whose steps replay CUDA graphs (mode="reduce-overhead"): the "time, graphs" target
GRAPH_BASELINE, GRAPH_BLAZE = "sort-grouped-mm-compile-cudagraphs", "blazec-loop-cudagraphs"
TIME_LIMIT = {"olmoe-like": 0.8, "mixtral-like": 0.9}
ACT_SLACK = 1.05
RECOMPUTE_ACT_GIB = 0.1
RECOMPUTE_TIME = 1.3
GiB = 1024**3
ERR_BOUND = {2: 2e-2, 4: 1e-4}  # by element size: bf16/fp16 a few ulps of the max, fp32


@dataclass
class Target:
    name: str
    value: float
    limit: Optional[float]  # None: reported without a limit
    unit: str  # "x" (a ratio) or "GiB"
    detail: str
    void: str = ""  # why the reading does not count: a blazec row it reads computed wrong numbers

    @property
    def met(self) -> Optional[bool]:
        if self.void:
            return False
        return None if self.limit is None else self.value <= self.limit

    def line(self) -> str:
        verdict = {True: "met", False: "MISSED", None: "no limit"}[self.met]
        lim = "-" if self.limit is None else f"{self.limit:.4g}{self.unit}"
        why = f"{self.void}; " if self.void else ""
        return f"  {self.name:15s} {self.value:.4g}{self.unit}  limit {lim}  {verdict}: {why}{self.detail}"


def wrong(row, elem_bytes: int) -> str:
    """Why a blazec row's numbers do not count ("" when they do): it rewrote nothing, its first
    step differed from a later one, or its errors against the eager loop pass the bound."""
    note = getattr(row, "note", "")
    if "rewrote nothing" in note or "FIRST STEP DIFFERS" in note:
        return f"{row.impl}: {note}"
    bound = ERR_BOUND.get(elem_bytes)
    errs = _errors(row)
    if errs and not math.isfinite(_worst(errs)):
        return f"{row.impl}'s error against the eager loop is not finite ({', '.join(f'{e:.3g}' for e in errs)})"
    if bound is not None and errs and _worst(errs) > bound:
        return f"{row.impl}'s error {_worst(errs):.3g} against the eager loop is past {bound:g}"
    return ""


def _errors(row) -> list[float]:
    """The row's measured errors against the eager loop: output, dL/dx and (where measured) dW."""
    return [e for e in (row.err_out, row.err_dx, getattr(row, "err_dw", None)) if e is not None]


def _worst(errs: list[float]) -> float:
    """The largest error, or the first that is not finite: NaN compares False with a bound,
    and max() may pass over it."""
    return next((e for e in errs if not math.isfinite(e)), max(errs))


def check(rows: Sequence, shape: str, T: int, I: int, E: int, k: int, elem_bytes: int) -> list[Target]:
    """Targets from the bench rows (objects with impl, ms, peak_gib, act_gib, err_out, err_dx, note)."""
    ok = {r.impl: r for r in rows if r.ms is not None and not r.note.startswith(("failed", "OOM"))}
    base = [ok[n] for n in BASELINE_ROWS if n in ok]
    blaze, rec = ok.get("blazec-loop"), ok.get("blazec-loop-recompute")
    out: list[Target] = []
    if blaze and base:
        best = min(base, key=lambda r: r.ms)
        out.append(Target("time", blaze.ms / best.ms, TIME_LIMIT.get(shape), "x",
                          f"blazec-loop {blaze.ms:.2f} ms / best baseline {best.impl} {best.ms:.2f} ms"))
    gbase, gblaze = ok.get(GRAPH_BASELINE), ok.get(GRAPH_BLAZE)
    if gblaze and (base or gbase):
        best = min(base + ([gbase] if gbase else []), key=lambda r: r.ms)
        out.append(Target("time, graphs", gblaze.ms / best.ms, TIME_LIMIT.get(shape), "x",
                          f"{GRAPH_BLAZE} {gblaze.ms:.2f} ms / best baseline {best.impl} {best.ms:.2f} ms"
                          + (" (CUDA graphs on both sides)" if best is gbase else "")))
    if blaze and blaze.act_gib is not None:
        P = T * k
        preact = P * 2 * I * elem_bytes / GiB
        index = (2 * P * 8 + (E + 1) * 8 + P * (8 + elem_bytes)) / GiB
        out.append(Target("act", blaze.act_gib, ACT_SLACK * (preact + index), " GiB",
                          f"kept after forward; pre-activations {preact:.4g} GiB + index {index:.2g} GiB, +5%"))
    if rec and rec.act_gib is not None:
        out.append(Target("recompute act", rec.act_gib, RECOMPUTE_ACT_GIB, " GiB",
                          "blazec-loop-recompute, kept after forward"))
    if rec and blaze:
        out.append(Target("recompute time", rec.ms / blaze.ms, RECOMPUTE_TIME, "x",
                          f"blazec-loop-recompute {rec.ms:.2f} ms / blazec-loop {blaze.ms:.2f} ms"))
    peaks = [r for r in base if r.peak_gib is not None]
    if blaze and blaze.peak_gib is not None and peaks:
        low = min(peaks, key=lambda r: r.peak_gib)
        fastest = min(peaks, key=lambda r: r.ms)
        also = (f"; the fastest baseline row, {fastest.impl}, peaked at {fastest.peak_gib:.4g} GiB"
                if fastest is not low else "")
        out.append(Target("peak", blaze.peak_gib, low.peak_gib, " GiB", f"lowest baseline peak: {low.impl}{also}"))
    about = {"time": [blaze], "time, graphs": [gblaze], "act": [blaze], "recompute act": [rec],
             "recompute time": [rec, blaze], "peak": [blaze]}
    for t in out:  # a fast or lean row with wrong numbers meets nothing
        t.void = "; ".join(w for w in (wrong(r, elem_bytes) for r in about.get(t.name, []) if r) if w)
    if blaze and blaze.err_out is not None and blaze.err_dx is not None:
        errs = _errors(blaze)
        out.append(Target("agreement", _worst(errs), ERR_BOUND.get(elem_bytes), "",
                          "blazec-loop max(err out, err dx" + (", err dW" if len(errs) == 3 else "")
                          + ") vs eager-loop"))
    return out
