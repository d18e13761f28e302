"""Where a profiled GPU step leaves the GPU idle: the lead-in before its first kernel and the
gaps between kernels, with the kernels on either side of the largest gaps.

``blazec bench`` times a step from a CUDA event recorded before the forward to one recorded
after the backward, so the GPU's idle time inside the step counts: the time the host takes to
reach the first kernel, and any gap where the host had not yet launched the next kernel (or
waited for the GPU). The step's time less its summed kernel time gives the total; this splits
it by place, which says whether the host's forward path, a sync, or launch gaps in the
backward cost the time.

Input: each kernel as (name, start us, end us), in any order, and the step's start on the same
clock (the profiler aligns CPU and CUDA events). Kernels that overlap (several streams) count
once: a gap is time when no kernel runs.

The profiler adds host time to every op it records, so host-bound gaps read somewhat longer
than in the unprofiled timed steps; the places, not the exact sizes, are the point.
"""

from __future__ import annotations

from typing import Any, Sequence

TOP_GAPS = 5


def idle(kernels: Sequence[tuple[str, float, float]], step_start_us: float, top: int = TOP_GAPS) -> dict[str, Any]:
    """{"lead_ms", "gap_ms", "gaps", "largest": [{"ms", "after", "before"}, ...]} of one step:
    ``lead_ms`` from the step's start to its first kernel, ``gap_ms`` the summed idle time
    between its first kernel's start and its last kernel's end over ``gaps`` gaps, and the
    ``top`` largest gaps in decreasing size."""
    if not kernels:
        return {"lead_ms": None, "gap_ms": 0.0, "gaps": 0, "largest": []}
    ks = sorted(kernels, key=lambda k: (k[1], k[2]))
    gaps: list[tuple[float, str, str]] = []
    busy_until, last = ks[0][2], ks[0][0]
    for name, start, end in ks[1:]:
        if start > busy_until:
            gaps.append(((start - busy_until) / 1e3, last, name))
        if end >= busy_until:
            busy_until, last = end, name
    largest = sorted(gaps, key=lambda g: -g[0])[:top]
    return {
        "lead_ms": max(0.0, ks[0][1] - step_start_us) / 1e3,
        "gap_ms": sum(g[0] for g in gaps),
        "gaps": len(gaps),
        "largest": [{"ms": ms, "after": a, "before": b} for ms, a, b in largest],
    }


def describe(t: dict[str, Any], width: int = 24) -> str:
    """One line for the bench's output."""
    lead = "-" if t["lead_ms"] is None else f"{t['lead_ms']:.3f} ms"
    line = f"  idle: {lead} before the first kernel, {t['gap_ms']:.3f} ms in {t['gaps']} gaps between kernels"
    if t["largest"]:
        line += "; largest: " + ", ".join(
            f"{g['ms']:.3f} ms after {g['after'][:width]} before {g['before'][:width]}" for g in t["largest"])
    return line
