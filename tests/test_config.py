"""BlazeConfig: option parsing and its errors, directly and through torch.compile."""

import pytest
import torch

from blazec.config import BlazeConfig, BlazeOptionError


def test_defaults():
    cfg = BlazeConfig.from_options(None)
    assert cfg.final_stage == "inductor" and cfg.passes is None and cfg.mode == "default"
    assert cfg.pass_enabled("moe_dispatch")


def test_valid_options():
    cfg = BlazeConfig.from_options(
        {"final_stage": "eager", "passes": ["moe_dispatch"], "moe_recompute": "recompute_gemm1",
         "inductor_config": {"max_autotune": False}},
        mode="max-autotune-no-cudagraphs",
    )
    assert cfg.final_stage == "eager" and cfg.passes == ("moe_dispatch",)
    assert cfg.moe_recompute == "recompute_gemm1" and cfg.mode == "max-autotune-no-cudagraphs"
    assert not BlazeConfig.from_options({"disable_passes": "moe_dispatch"}).pass_enabled("moe_dispatch")
    assert not BlazeConfig.from_options({"passes": []}).pass_enabled("moe_dispatch")


@pytest.mark.parametrize(
    "options, mode, message",
    [
        ({"bogus": 1}, None, "unknown blaze option(s) 'bogus'; valid keys: passes, disable_passes, final_stage"),
        ({"final_stage": "tvm"}, None, "option 'final_stage' must be one of 'inductor', 'eager', got 'tvm'"),
        ({"passes": ["nope"]}, None, "option 'passes': unknown pass name(s) 'nope'; known passes: moe_dispatch, moe_gating, comm_overlap"),
        ({"passes": 3}, None, "option 'passes' must be a list of pass names, got 3"),
        ({"disable_passes": ["x"]}, None, "option 'disable_passes': unknown pass name(s) 'x'"),
        ({"moe_recompute": True}, None, "option 'moe_recompute' must be one of 'save_preact', 'recompute_gemm1'"),
        ({"inductor_config": {"not_a_key": 1}}, None, "unknown Inductor config key(s) ['not_a_key']"),
        ({"inductor_config": 5}, None, "option 'inductor_config' must be a dict"),
        (["final_stage"], None, "blaze options must be a dict, got list; valid keys:"),
        ({}, "turbo", "unknown mode 'turbo' for the blaze backend; valid modes: default"),
    ],
)
def test_bad_options(options, mode, message):
    with pytest.raises(BlazeOptionError) as e:
        BlazeConfig.from_options(options, mode)
    assert message in str(e.value)


def test_bad_option_through_torch_compile_names_the_key():
    m = torch.nn.Linear(3, 3)
    with pytest.raises(Exception) as e:
        torch.compile(m, backend="blaze", options={"final_stag": "eager"})(torch.randn(2, 3))
    inner = getattr(e.value, "inner_exception", e.value)
    assert isinstance(inner, BlazeOptionError)
    assert "unknown blaze option(s) 'final_stag'" in str(inner) and "final_stage" in str(inner)


def test_fingerprint_changes_with_options():
    a = BlazeConfig.from_options({})
    b = BlazeConfig.from_options({"moe_recompute": "recompute_gemm1"})
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == BlazeConfig.from_options({}).fingerprint()
