"""Side by side with ``torch._functorch.config.activation_memory_budget``.

For every example MoE model and a small transformer, torch's own
budgeted partition is computed on the very joint graph blaze sees, at several budgets. At
torch's saved bytes, blazec's plan must save no more and have an estimated recompute time no
higher (both measured with blazec's cost model), and it must be strictly cheaper somewhere:
torch can only recompute a whole MoE op, blazec can recompute just its GEMM1. The table is
printed (it is docs/CHECKPOINT.md's, at the test sizes).
"""

from __future__ import annotations


from tests.helpers import load_benchmark

FRACTIONS = (0.8, 0.5, 0.2, 0.0)


def _bench():
    return load_benchmark("checkpoint_vs_torch")


def test_blazec_beats_torch_at_equal_memory(capsys):
    bench = _bench()
    factories = bench.model_factories(small=True)
    del factories["moe_transformer"]  # in the benchmark; its per-layer choice: test_checkpoint_budget
    rows = []
    for name, factory in factories.items():
        model, inputs = factory()
        caps = bench.capture_joint(model, inputs)
        assert len(caps) == 1, f"{name}: expected one graph"
        cap = caps[0]
        assert cap.default.feasible, (name, cap.default.violations)
        if name.startswith("moe_"):
            assert cap.problem.layers, f"{name}: the MoE layer must be a decision"
        rows += bench.compare_captured(name, cap, FRACTIONS)
    with capsys.disabled():
        print("\n" + bench.table(rows))
    for r in rows:
        assert not r.torch_violations, (r.model, r.fraction, r.torch_violations)
        assert r.blaze_bytes <= r.torch_bytes, r
        assert r.blaze_us <= r.torch_us * (1 + 1e-6) + 1e-9, r
        assert r.blaze_solver.endswith("/optimal"), r
        # blazec's own fraction: of the default partition's bytes
        assert r.frac_bytes <= int(r.fraction * r.default_bytes), r
    moe_rows = [r for r in rows if r.model.startswith("moe_") and r.fraction > 0]
    assert any(r.blaze_us < 0.9 * r.torch_us for r in moe_rows), "GEMM1-only recompute should pay off"
    assert sum(r.blaze_us for r in rows) < sum(r.torch_us for r in rows)
