"""The opt-in grouped_mm weight gradients (``BLAZEC_WGRAD=grouped_mm``) against the reference.

On a GPU the path runs only on Hopper in bf16; here ``use`` is forced on, so the backward's
other kernels run under the interpreter and ``torch._grouped_mm`` runs on the CPU, with the
same sorted-copy operands, offsets and output layout the launcher builds for CUDA. Shapes keep
d and I multiples of 8 (16-byte strides, which torch's grouped GEMM requires on CPU too).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.cases import check, make_case
from tests.kernels.conftest import ON_GPU


@pytest.fixture
def forced(monkeypatch):
    """Force the grouped_mm path on and count its grouped GEMMs."""
    from blazec.kernels import wgrad_grouped_mm as gm

    calls: list[tuple] = []
    real = gm.grouped_mm

    def spy(a, b, offs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, offs)

    monkeypatch.setattr(gm, "use", lambda x, d, I: True)
    monkeypatch.setattr(gm, "grouped_mm", spy)
    return calls


BF16 = torch.bfloat16
CASES = {  # fp32 runs on the CPU only: torch's CUDA grouped GEMM takes bf16
    "swiglu, ragged, fp32": dict(activation="swiglu", ids_kind="ragged", dtype=torch.float32),
    "swiglu, ragged": dict(activation="swiglu", ids_kind="ragged", dtype=BF16),
    "swiglu, empty experts, capacity drops": dict(activation="swiglu", ids_kind="empty_experts", capacity=3,
                                                  dtype=BF16),
    "relu, hidden mode, per-expert lists": dict(activation="relu", weight_pos="hidden", layout="list", dtype=BF16),
    "geglu, recompute, k=1": dict(activation="geglu", recompute=True, k=1, dtype=BF16),
    "swiglu, one expert": dict(activation="swiglu", ids_kind="one_expert", dtype=BF16),
}


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_matches_the_reference(forced, kw: dict) -> None:
    if ON_GPU and kw["dtype"] != BF16:
        pytest.skip("torch's CUDA grouped GEMM takes bf16 only")
    check(make_case(T=13, d=24, I=16, E=5, **{"k": 3, "seed": 21, **kw}))
    gated = kw["activation"] in ("swiglu", "geglu")
    assert len(forced) == (3 if gated else 2), forced  # dWd, dWg[, dWu]: all through grouped_mm


def test_a_wider_grad_y_keeps_the_triton_kernel_for_dwd(forced) -> None:
    """bf16 x with out_dtype=fp32 (the loop form's fp32 accumulator): grad_y is fp32, and dWd's
    grouped GEMM got (fp32, bf16) operands and raised "expected m1 and m2 to have the same
    dtype" (found in review; the default path on Hopper). dWd now takes the Triton kernel."""
    check(make_case(T=13, d=24, I=16, E=5, k=3, seed=21, activation="swiglu", dtype=BF16,
                    out_dtype=torch.float32, tw_dtype=torch.float32))
    assert len(forced) == 2, forced  # dWg and dWu only


def test_biases_keep_the_triton_kernel_for_their_weight(forced) -> None:
    # Gate and up biases: dWg and dWu by _wgrad_kernel (it fuses db); "output" mode's down bias
    # needs w-scaled grad_y rows, so dWd by _wgrad_kernel too. Nothing left for grouped_mm.
    check(make_case(T=13, d=24, I=16, E=5, k=2, bias="stacked", dtype=BF16, seed=22))
    assert forced == []
    # "hidden" mode: dbd is a sum of plain grad_y rows, which grouped_mm does not produce;
    # a weight with a bias keeps the Triton kernel in every mode.
    check(make_case(T=13, d=24, I=16, E=5, k=2, bias="stacked", weight_pos="hidden", dtype=BF16, seed=23))
    assert forced == []


def test_the_variable_and_the_conditions(monkeypatch) -> None:
    from blazec.kernels import wgrad_grouped_mm as gm

    import warnings

    monkeypatch.delenv("BLAZEC_WGRAD", raising=False)
    assert gm.mode() == "auto"
    monkeypatch.setenv("BLAZEC_WGRAD", "grouped_mm")
    assert gm.mode() == "grouped_mm"
    monkeypatch.setenv("BLAZEC_WGRAD", "cutlass")
    with pytest.raises(ValueError, match="BLAZEC_WGRAD must be one of .* got 'cutlass'"):
        gm.mode()

    x = torch.zeros(4, 24, dtype=torch.bfloat16)
    assert "not CUDA" in gm.unsupported(x, 24, 16)
    monkeypatch.setenv("BLAZEC_WGRAD", "grouped_mm")
    gm._WARNED.clear()
    with pytest.warns(UserWarning, match="BLAZEC_WGRAD=grouped_mm: using the Triton .* not CUDA"):
        assert not gm.use(x, 24, 16)
    gm._WARNED.clear()
    for quiet in ("triton", "auto"):  # the default falls back without a warning
        monkeypatch.setenv("BLAZEC_WGRAD", quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not gm.use(x, 24, 16)

    class Cuda:  # what unsupported reads of x
        device = torch.device("cuda")
        dtype = torch.bfloat16

    for cc, dtype, d, I, why in [
        ((10, 0), torch.bfloat16, 24, 16, "compute capability 10.0 is not 9.0"),
        ((9, 0), torch.float16, 24, 16, "dtype torch.float16 is not bfloat16"),
        ((9, 0), torch.bfloat16, 20, 16, "d=20 and I=16 must be multiples of 8"),
        ((9, 0), torch.bfloat16, 24, 16, None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev, cc=cc: cc)
        monkeypatch.setattr(gm, "_CAPABILITY", {})  # cached per device
        Cuda.dtype = dtype
        got = gm.unsupported(Cuda, d, I)
        assert (got is None) if why is None else (why in got), (cc, dtype, got)
    # where it applies, auto and grouped_mm take it and triton does not
    monkeypatch.setattr(gm, "unsupported", lambda x, d, I: None)
    for m, want in (("auto", True), ("grouped_mm", True), ("triton", False)):
        monkeypatch.setenv("BLAZEC_WGRAD", m)
        assert gm.use(x, 24, 16) is want, m
