"""CostModel evaluation, specs, presets and calibrate() of blazec.runtime.balance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blazec.runtime.balance import CostModel, calibrate




def test_cost_formula_and_extra_features():
    m = CostModel(a=2.0, b=0.5, c=3.0, extra={"unique_ids": 0.25})
    L = torch.tensor([1.0, 4.0, 10.0])
    ids = torch.tensor([1.0, 2.0, 8.0])
    expected = 2 * L + 0.5 * L * L + 3 + 0.25 * ids
    torch.testing.assert_close(m(L, unique_ids=ids), expected.double())
    assert m([1, 4, 10], unique_ids=[1, 2, 8]).dtype == torch.float64


def test_presets():
    t = CostModel.transformer(d_model=512)
    assert (t.a, t.b, t.c) == (1.0, 1.0 / 3072, 0.0)
    assert CostModel.tokens()(torch.tensor([5.0])).item() == 5.0
    r = CostModel.recsys(unique_ids=0.5)
    with pytest.raises(ValueError, match="needs feature 'unique_ids'"):
        r([3.0])
    assert r([3.0], unique_ids=[2.0]).item() == pytest.approx(3 + 9 / 1536 + 64 + 1.0)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tokens", CostModel(1.0)),
        ("transformer", CostModel.transformer(1024)),
        ("transformer:256", CostModel.transformer(256)),
        ("recsys:128", CostModel.recsys(128)),
        ("a=1,b=1e-4", CostModel(1.0, 1e-4, 0.0)),
        ("b=2, c=5, ids=0.5", CostModel(0.0, 2.0, 5.0, {"ids": 0.5})),
    ],
)
def test_from_spec(spec, expected):
    assert CostModel.from_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        ("quadratic", "expected tokens, transformer"),
        ("transformer:x", "d_model must be an int"),
        ("transformer:0", "d_model must be >= 1"),
        ("tokens:3", "takes no argument"),
        ("a=1,b", "'b' is not key=value"),
        ("a=one", "a='one' is not a number"),
        ("a=1,a=2", "a given twice"),
        ("a=-1", "must be a finite number >= 0"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        CostModel.from_spec(spec)


def test_bad_evaluation_inputs():
    m = CostModel(1.0, extra={"ids": 1.0})
    with pytest.raises(ValueError, match="unknown cost feature"):
        m([1.0], ids=[1.0], other=[2.0])
    with pytest.raises(ValueError, match="feature 'ids' has 2 values"):
        m([1.0], ids=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1"):
        m([-1.0], ids=[1.0])
    with pytest.raises(ValueError, match="cost coefficient b"):
        CostModel(b=float("nan"))


def _batches(seed, count=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(4, 40, (1,), generator=g))
        out.append(torch.randint(1, 2048, (n,), generator=g).double())
    return out


def test_calibrate_recovers_exact_coefficients():
    true = CostModel(a=3e-3, b=2e-6, c=0.05)
    batches = _batches(0)
    times = [true(L).sum().item() + 0.7 for L in batches]  # 0.7: per-batch overhead
    fit = calibrate(batches, times)
    assert fit.a == pytest.approx(true.a, rel=1e-6)
    assert fit.b == pytest.approx(true.b, rel=1e-6)
    assert fit.c == pytest.approx(true.c, rel=1e-5)


def test_calibrate_with_noise_and_extra_feature():
    true = CostModel(a=1e-3, b=5e-7, c=0.02, extra={"ids": 4e-4})
    batches = _batches(1, count=40)
    g = torch.Generator().manual_seed(5)
    ids = [(L * torch.rand(L.shape, generator=g, dtype=torch.float64)).round() for L in batches]
    clean = [true(L, ids=f).sum().item() for L, f in zip(batches, ids)]
    noisy = [t * (1 + 0.01 * torch.randn(1, generator=g).item()) for t in clean]
    fit = calibrate(batches, noisy, batch_features={"ids": ids}, fit_overhead=False)
    pred = [fit(L, ids=f).sum().item() for L, f in zip(batches, ids)]
    for p, t in zip(pred, clean):
        assert p == pytest.approx(t, rel=0.05)
    assert fit.b == pytest.approx(true.b, rel=0.2)


def test_calibrate_nonnegative_clamps_to_support():
    # Times that a negative per-sample constant would fit best: NNLS must return c = 0 and
    # the best fit on the remaining coefficients instead.
    batches = _batches(2)
    times = [(2e-3 * L).sum().item() - 0.01 * len(L) for L in batches]
    fit = calibrate(batches, times, quadratic=False, fit_overhead=False)
    assert fit.c == 0.0 and fit.a > 0
    with pytest.raises(ValueError, match="negative coefficients"):
        calibrate(batches, times, quadratic=False, fit_overhead=False, nonnegative=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_lengths=[[1.0]], times=[1.0, 2.0]), "got 1 batches but 2 times"),
        (dict(batch_lengths=[[1.0], [2.0]], times=[1.0, 2.0]), "need at least 4 measured batches"),
        (dict(batch_lengths=[[1.0, 2.0]] * 5, times=[1.0] * 5), "rank deficient"),
        (dict(batch_lengths=[[1.0]] * 5, times=[1.0, 2, 3, 4, float("inf")]), "times must be finite"),
    ],
)
def test_calibrate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(**kwargs)


@pytest.mark.parametrize("name", ["a", "b", "c", "__overhead__"])
def test_calibrate_refuses_a_feature_named_like_its_own_coefficients(name):
    """A feature named "b" overwrote the sum of L^2 column, and its fitted weight came back as
    the L^2 coefficient (a feature "a" or "c" gave a misleading rank-deficiency error)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, 100, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (30,), generator=g)]
    half = [[v // 2 for v in b] for b in batches]
    times = [sum(b) + 3 * sum(u) for b, u in zip(batches, half)]
    fit = calibrate(batches, times, quadratic=False, fit_overhead=False, batch_features={"u": half})
    assert fit.a == pytest.approx(1.0) and fit.extra["u"] == pytest.approx(3.0) and fit.b == 0.0
    with pytest.raises(ValueError, match=f"the feature name '{name}' is reserved"):
        calibrate(batches, times, quadratic=False, fit_overhead=False, batch_features={name: half})


@pytest.mark.parametrize("features, match", [
    ([1], "batch_features must map each feature name to its values"),
    ({"u": 5}, r"batch_features\['u'\] must be a sequence with one entry per batch"),
    ({1: [[1.0]]}, "feature names must be strings"),
])
def test_calibrate_names_a_malformed_batch_features(features, match):
    with pytest.raises(TypeError, match=match):
        calibrate([[1.0]] * 5, [1.0] * 5, batch_features=features)


def test_numpy_coefficients_and_d_model_are_accepted():
    m = CostModel(a=np.float32(1.0), b=np.float64(0.5), c=np.int64(2), extra={"ids": np.float32(0.25)})
    assert (m.a, m.b, m.c, m.extra) == (1.0, 0.5, 2.0, {"ids": 0.25})
    assert all(type(v) is float for v in (m.a, m.b, m.c, *m.extra.values()))
    assert CostModel.transformer(np.int64(512)) == CostModel.transformer(512)
    assert CostModel.recsys(np.int32(128), unique_ids=np.float32(0.5)) == CostModel.recsys(128, unique_ids=0.5)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: CostModel(a=True), TypeError, r"cost coefficient a must be a real number, got True \(bool\)"),
        (lambda: CostModel(b="1"), TypeError, r"cost coefficient b must be a real number, got '1' \(str\)"),
        (lambda: CostModel(extra={"ids": None}), TypeError, "cost coefficient ids must be a real number"),
        (lambda: CostModel(extra=[("ids", 1.0)]), TypeError, "extra must be a mapping"),
        (lambda: CostModel(c=np.float32("nan")), ValueError, "cost coefficient c must be a finite number >= 0"),
        (lambda: CostModel.transformer(0.5), TypeError, r"d_model must be an int, got 0.5 \(float\)"),
        (lambda: CostModel.transformer("x"), TypeError, "d_model must be an int, got 'x'"),
        (lambda: CostModel.recsys(0), ValueError, "d_model must be >= 1, got 0"),
        (lambda: CostModel.recsys(unique_ids=-1.0), ValueError, "cost coefficient unique_ids must be a finite number >= 0"),
    ],
)
def test_bad_coefficients_and_presets(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cost_that_overflows_float64_is_an_error():
    # 1e200 is a finite float64 length; its L^2 term is not.
    with pytest.raises(ValueError, match=r"the cost of sample 1 overflows float64 \(lengths\[1\] = 1e\+200"):
        CostModel.transformer()([1.0, 1e200])
    assert CostModel.tokens()([1e200]).item() == 1e200


def test_from_spec_and_calibrate_argument_types():
    with pytest.raises(TypeError, match=r"cost spec must be a string .* got None \(NoneType\)"):
        CostModel.from_spec(None)
    batches = [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0], [70.0], [8.0, 90.0]]
    times = [1.0, 2.0, 3.0, 40.0, 50.0]
    with pytest.raises(TypeError, match=r"quadratic must be True or False, got 'no' \(str\)"):
        calibrate(batches, times, quadratic="no")
    with pytest.raises(TypeError, match="fit_overhead must be True or False"):
        calibrate(batches, times, fit_overhead=0)
    with pytest.raises(TypeError, match="batch_lengths must be a sequence of batches, .* got int"):
        calibrate(5, [1.0])
    # A generator of batches works like the list ("object of type 'generator' has no len()" before).
    # (Equal up to rounding: two identical LAPACK solves differed in the last bit in one CI run.)
    gen, lst = calibrate((b for b in batches), times), calibrate(batches, times)
    assert (gen.a, gen.b, gen.c) == pytest.approx((lst.a, lst.b, lst.c), rel=1e-12, abs=1e-15)
    assert gen.extra == lst.extra
