"""blazec.bench_timeline: where a profiled step leaves the GPU idle (pure; no GPU needed)."""

import pytest

from blazec import bench_timeline


def test_lead_gaps_and_largest_in_order() -> None:
    # us: step starts at 100; kernels a [600, 900], b [950, 1000], c [2000, 2500], d [2510, 2600]
    ks = [("c", 2000, 2500), ("a", 600, 900), ("d", 2510, 2600), ("b", 950, 1000)]  # any order
    t = bench_timeline.idle(ks, 100)
    assert t["lead_ms"] == pytest.approx(0.5)
    assert t["gaps"] == 3 and t["gap_ms"] == pytest.approx((50 + 1000 + 10) / 1e3)
    assert [(g["after"], g["before"]) for g in t["largest"]] == [("b", "c"), ("a", "b"), ("c", "d")]
    assert t["largest"][0]["ms"] == pytest.approx(1.0)


def test_overlapping_kernels_count_once() -> None:
    # b runs inside a (another stream); the gap after them starts at a's end, after a.
    t = bench_timeline.idle([("a", 0, 1000), ("b", 200, 400), ("c", 1300, 1400)], 0)
    assert t["gaps"] == 1 and t["gap_ms"] == pytest.approx(0.3)
    assert t["largest"] == [{"ms": pytest.approx(0.3), "after": "a", "before": "c"}]
    assert t["lead_ms"] == 0.0


def test_top_and_no_kernels() -> None:
    ks = [(f"k{i}", i * 100, i * 100 + 10 * (i + 1)) for i in range(9)]
    t = bench_timeline.idle(ks, 0, top=2)
    assert len(t["largest"]) == 2 and t["gaps"] == 8
    assert t["largest"][0]["after"] == "k0"  # the shortest kernel leaves the longest gap
    assert bench_timeline.idle([], 5) == {"lead_ms": None, "gap_ms": 0.0, "gaps": 0, "largest": []}


def test_describe() -> None:
    t = bench_timeline.idle([("_gemm1_kernel", 500, 900), ("_rows_gemm_kernel", 1400, 1500)], 0)
    assert bench_timeline.describe(t) == (
        "  idle: 0.500 ms before the first kernel, 0.500 ms in 1 gaps between kernels; "
        "largest: 0.500 ms after _gemm1_kernel before _rows_gemm_kernel")
    assert bench_timeline.describe(bench_timeline.idle([], 0)).startswith("  idle: - before")
