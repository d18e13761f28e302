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
        {"final_stage": "inductor", "passes": ["moe_dispatch"], "moe_recompute": "recompute_gemm1",
         "inductor_config": {"max_autotune": False}},
        mode="max-autotune-no-cudagraphs",
    )
    assert cfg.final_stage == "inductor" and cfg.passes == ("moe_dispatch",)
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
        # accepted, and then no pass ran
        ({"passes": ["moe_dispatch"], "disable_passes": ["moe_dispatch"]}, None,
         "options 'passes' and 'disable_passes' both name 'moe_dispatch': drop it from one of the two"),
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


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"max_autotune": "yes"}, "option 'inductor_config': 'max_autotune' takes a bool (its current value is "),
        ({"triton.cudagraphs": 1}, "'triton.cudagraphs' takes a bool"),
        ({"compile_threads": True}, "'compile_threads' takes an int"),
        ({"cpu_gpu_bw": "fast"}, "'cpu_gpu_bw' takes a float"),
        ({"max_autotune_gemm_backends": ["ATEN"]}, "'max_autotune_gemm_backends' takes a str"),
        ({"triton.no_such": 1}, "unknown Inductor config key(s) ['triton.no_such']"),
        ({"triton": {"cudagraphs": True}}, "unknown Inductor config key(s) ['triton']"),
        ({"patch": 1}, "unknown Inductor config key(s) ['patch']"),
        ({"custom_partitioner_fn": None}, "'custom_partitioner_fn' is set by the blaze backend itself"),
    ],
)
def test_inductor_config_keys_and_value_types_are_checked(patch, message):
    """Each inductor_config key must name an Inductor setting (dotted names reach nested ones),
    and its value fit the setting's type; a str for a bool setting was accepted, and an unknown
    nested key failed inside Inductor with an AttributeError."""
    with pytest.raises(BlazeOptionError) as e:
        BlazeConfig.from_options({"inductor_config": patch})
    assert message in str(e.value)
    if "takes" in message:
        (name, value), = patch.items()
        assert f"got {value!r} ({type(value).__name__})" in str(e.value)


def test_numpy_scalars_where_python_ones_are_taken():
    """ep_chunks and sm_free_comm refused numpy's int and bool where memory_budget and the
    runtime helpers take numpy numbers; an Inductor setting still takes Python types only, and
    the message names numpy's bool as such (it read "got True (bool)" for a bool setting)."""
    import numpy as np

    from blazec.expert_parallel import EPGroup

    cfg = BlazeConfig.from_options({"expert_parallel": EPGroup("world", 0, 2, "gloo"), "ep_chunks": np.int64(3),
                                    "sm_free_comm": np.True_})
    assert cfg.ep_chunks == 3 and type(cfg.ep_chunks) is int and cfg.sm_free_comm is True
    for bad in (True, 2.0, np.float32(2)):
        with pytest.raises(BlazeOptionError, match=r"'ep_chunks' must be an int in \[1, 64\]"):
            BlazeConfig.from_options({"expert_parallel": EPGroup("world", 0, 2, "gloo"), "ep_chunks": bad})
    with pytest.raises(BlazeOptionError, match=r"'sm_free_comm' must be True or False, got 1"):
        BlazeConfig.from_options({"sm_free_comm": 1})
    with pytest.raises(BlazeOptionError, match=r"'max_autotune' takes a bool .* got np.True_ \(numpy.bool"):
        BlazeConfig.from_options({"inductor_config": {"max_autotune": np.True_}})


def test_inductor_config_values_that_fit():
    patch = {"max_autotune": True, "triton.cudagraphs": False, "compile_threads": 1, "cpu_gpu_bw": 20,
             "max_autotune_gemm_backends": "ATEN", "cpp.simdlen": 8}  # a float setting takes an int; None: any
    assert dict(BlazeConfig.from_options({"inductor_config": patch}).inductor_config) == patch


def test_inductor_settings_with_the_eager_final_stage_are_an_error():
    """final_stage='eager' runs no Inductor: its config patches and mode= would be ignored silently."""
    with pytest.raises(BlazeOptionError, match="inductor_config is set but final_stage='eager'.*'max_autotune'"):
        BlazeConfig.from_options({"final_stage": "eager", "inductor_config": {"max_autotune": True}})
    with pytest.raises(BlazeOptionError, match="mode='max-autotune' is set but final_stage='eager'"):
        BlazeConfig.from_options({"final_stage": "eager"}, mode="max-autotune")
    eager = BlazeConfig.from_options({"final_stage": "eager", "inductor_config": {}})
    assert eager.final_stage == "eager"
    with pytest.raises(BlazeOptionError, match="mode='reduce-overhead' is set but final_stage='eager'"):
        BlazeConfig.from_options(eager, mode="reduce-overhead")


def test_unknown_nested_inductor_key_through_torch_compile_is_an_option_error():
    m = torch.nn.Linear(3, 3)
    with pytest.raises(Exception) as e:
        torch.compile(m, backend="blaze", options={"inductor_config": {"triton.no_such": 1}})(torch.randn(2, 3))
    inner = getattr(e.value, "inner_exception", e.value)
    assert isinstance(inner, BlazeOptionError) and "'triton.no_such'" in str(inner)


def test_ep_chunks_without_expert_parallel_is_an_error():
    """ep_chunks only splits expert-parallel layers: without expert_parallel it was accepted and
    ignored."""
    for options in ({"ep_chunks": 4}, {"ep_chunks": 2, "expert_parallel": None}):
        with pytest.raises(BlazeOptionError, match="ep_chunks is set but expert_parallel is not: ep_chunks="):
            BlazeConfig.from_options(options)
    with pytest.raises(BlazeOptionError, match=r"'ep_chunks' must be an int in \[1, 64\], got 0"):
        BlazeConfig.from_options({"ep_chunks": 0})  # a bad value is still named as such


def test_ep_chunks_with_expert_parallel():
    import torch.distributed as dist

    from blazec.expert_parallel import EPGroup

    group = EPGroup("world", 0, 2, "gloo")
    cfg = BlazeConfig.from_options({"expert_parallel": group, "ep_chunks": 4})
    assert cfg.ep_chunks == 4 and cfg.expert_parallel == group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = BlazeConfig.from_options({"expert_parallel": "world", "ep_chunks": 3})
        assert cfg.ep_chunks == 3 and cfg.expert_parallel.world == 1
    finally:
        dist.destroy_process_group()


def test_dump_ep_chunks_without_expert_parallel_is_one_error_line(capsys):
    from blazec import cli
    from tests.helpers import REPO

    example = str(REPO / "examples" / "moe_loop_stacked.py")
    for argv in ([], ["--expert-parallel", "1"]):
        assert cli.main(["dump", example, "--ep-chunks", "3", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("blazec dump: error: ep_chunks is set but expert_parallel is not")
