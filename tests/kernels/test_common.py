"""Unit tests of the shared kernel plumbing: weight operands, pointer tables, poisoning."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import KERNEL_DEVICE


def test_weight_operand_forms() -> None:
    from blazec.kernels._common import weight_operand

    stacked = torch.randn(3, 5, 4, device=KERNEL_DEVICE).transpose(1, 2)  # [E, out, in] view
    op = weight_operand([stacked], 2)
    assert op.table == 0 and op.ptr is stacked and op.strides == stacked.stride()

    ws = [torch.randn(4, 5, device=KERNEL_DEVICE).t() for _ in range(3)]
    op = weight_operand(ws, 2)
    assert op.table and op.strides == (0, 1, 5)
    assert op.tab.dtype == torch.int64 and op.tab.tolist() == [w.data_ptr() for w in ws]

    assert op.table == 16  # fresh allocations: the kernels may assume 16-byte aligned addresses
    odd = [torch.randn(21, device=KERNEL_DEVICE)[1:].view(4, 5) for _ in range(3)]
    assert weight_operand(odd, 2).table == 1  # one element in: no alignment is claimed

    mixed = [torch.randn(5, 4, device=KERNEL_DEVICE), torch.randn(4, 5, device=KERNEL_DEVICE).t()]
    assert weight_operand(mixed, 2) is None  # the launcher falls back to the reference


def test_pointer_table_cache() -> None:
    from blazec.kernels._common import pointer_table

    ws = [torch.randn(3, device=KERNEL_DEVICE) for _ in range(4)]
    a, align = pointer_table(ws)
    assert pointer_table(ws)[0] is a  # parameters hit the cache: no H2D copy per step
    assert pointer_table(ws[:3])[0] is not a
    assert pointer_table(ws[::-1])[0].tolist() == a.tolist()[::-1]
    assert align == 16 and a.tolist() == [w.data_ptr() for w in ws]
    odd = [w[1:] for w in ws]  # 4 bytes into each storage
    assert pointer_table(odd)[1] == 1 and pointer_table(odd)[0].tolist() == [w.data_ptr() for w in odd]


def test_pointer_table_of_a_captured_graph_is_never_evicted(monkeypatch) -> None:
    """A CUDA graph replays a table's device address: evicting it (the cache held 256 tables,
    least recently used first) freed memory a captured graph still read (kernel review). A
    table seen during a capture now stays; the others are evicted as before."""
    import collections

    from blazec.kernels import _common

    monkeypatch.setattr(_common, "_TABLE_CACHE", collections.OrderedDict())
    monkeypatch.setattr(_common, "_CAPTURED", {})
    monkeypatch.setattr(_common, "_TABLE_CACHE_SIZE", 3)
    capturing = [True]
    monkeypatch.setattr(_common, "_capturing", lambda dev: capturing[0])
    lists = [[torch.randn(3, device=KERNEL_DEVICE) for _ in range(2)] for _ in range(6)]
    first = _common.pointer_table(lists[0])[0]  # built during a capture
    capturing[0] = False
    hit = _common.pointer_table(lists[1])[0]
    capturing[0] = True
    assert _common.pointer_table(lists[1])[0] is hit  # a hit during a capture pins it too
    capturing[0] = False
    tables = [_common.pointer_table(ws)[0] for ws in lists[2:]]
    assert _common.pointer_table(lists[0])[0] is first and _common.pointer_table(lists[1])[0] is hit
    assert _common.pointer_table(lists[2])[0] is not tables[0]  # evicted, rebuilt
    assert len(_common._TABLE_CACHE) == 3


def test_grad_buffer_is_one_stacked_gradient() -> None:
    from blazec.kernels._common import grad_buffer

    stacked = torch.randn(3, 5, 4, device=KERNEL_DEVICE).transpose(1, 2)
    outs = grad_buffer([stacked], 2)
    assert len(outs) == 1 and outs[0].shape == stacked.shape and outs[0].is_contiguous()
    ws = [torch.randn(4, 5, device=KERNEL_DEVICE).t() for _ in range(3)]
    outs = grad_buffer(ws, 2)  # per-expert list: stacked too, no pointer table
    assert len(outs) == 1 and outs[0].shape == (3, 5, 4) and outs[0].is_contiguous()
    assert outs[0].stride() == (20, 4, 1)
    outs = grad_buffer([torch.randn(7, device=KERNEL_DEVICE)], 1)  # one expert's bias
    assert outs[0].shape == (1, 7)
    outs = grad_buffer([torch.randn(2, 7, device=KERNEL_DEVICE)], 1)  # stacked biases
    assert outs[0].shape == (2, 7)
    assert grad_buffer([], 1) == []  # no bias, no gradient


def test_poison() -> None:
    from blazec.kernels._common import INT_POISON, empty

    assert torch.isnan(empty((3,), torch.float32, KERNEL_DEVICE)).all()  # the fixture turned it on
    assert (empty((3,), torch.int64, KERNEL_DEVICE) == INT_POISON).all()


def test_autotune_choices_reports_each_kernels_pick(monkeypatch) -> None:
    import triton

    from blazec.kernels import moe_experts, moe_grouped_gemm as gg

    class FakeTuner:  # what triton.autotune leaves behind: cache[key] = the fastest Config
        cache = {(2048, 1024, 5, "torch.bfloat16"): triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4)}

    monkeypatch.setattr(gg, "dh_tuned", FakeTuner())
    got = moe_experts.autotune_choices()
    assert got["dh"] == {"(2048, 1024, 5, 'torch.bfloat16')": "BLOCK 128x64x32, 8 warps, 4 stages"}
    assert set(got) == {"dh"}  # the others are None under the interpreter, or not yet tuned


def test_launch_with_autotuning_off_takes_the_first_fitting_config(monkeypatch) -> None:
    import triton

    from blazec.kernels import _common

    calls = []

    class Kernel:  # k[grid](**kwargs), as a JITFunction
        def __getitem__(self, grid):
            calls.append(("grid", grid))
            return lambda **kw: calls.append(("call", kw))

    class Tuned(Kernel):  # configs + the early pruner, as triton.autotune leaves them
        configs = [triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=5),
                   triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2)]

        @staticmethod
        def early_config_prune(configs, args):
            return [c for c in configs if c.kwargs["BLOCK_M"] <= args["limit"]]

    monkeypatch.setattr(_common, "INTERPRET", False)
    grid = lambda meta: (meta["BLOCK_M"],)  # noqa: E731
    monkeypatch.setenv("BLAZEC_AUTOTUNE", "0")
    _common.launch(Kernel(), Tuned(), grid, {"limit": 128}, {})
    assert calls == [("grid", (64,)), ("call", {"limit": 128, "BLOCK_M": 64, "num_warps": 4, "num_stages": 2})]
    calls.clear()
    monkeypatch.delenv("BLAZEC_AUTOTUNE")
    _common.launch(Kernel(), Tuned(), grid, {"limit": 128}, {})
    assert calls == [("grid", grid), ("call", {"limit": 128})]  # the autotuner itself


@pytest.mark.parametrize("value", ["off", "false", "", "2"])
def test_autotune_switch_takes_0_or_1_only(monkeypatch, value) -> None:
    """A typo turned autotuning on (anything but "0" did), the minutes of timing that
    ``BLAZEC_AUTOTUNE=0`` is there to skip."""
    from blazec.kernels import _common

    monkeypatch.setenv("BLAZEC_AUTOTUNE", value)
    with pytest.raises(ValueError, match=rf"BLAZEC_AUTOTUNE must be one of \('0', '1'\) \(default 1\), got '{value}'"):
        _common.autotune_enabled()
    for value, on in (("0", False), (" 1", True)):
        monkeypatch.setenv("BLAZEC_AUTOTUNE", value)
        assert _common.autotune_enabled() is on
    monkeypatch.delenv("BLAZEC_AUTOTUNE")
    assert _common.autotune_enabled() is True


def test_smem_budget_follows_the_cards_shared_memory(monkeypatch) -> None:
    import types

    import blazec.kernels._common as c

    c._device_smem_budget.cache_clear()
    cards = {0: 232448, 1: 166912, 2: 101376}  # H100/H200, A100, sm_89 opt-in bytes per block
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(shared_memory_per_block_optin=cards[i]))
    try:
        assert c._device_smem_budget(0) == c.SMEM_BUDGET == 200 * 1024
        assert c._device_smem_budget(1) == 166912 - 27 * 1024
        assert c._device_smem_budget(2) == 101376 - 27 * 1024
    finally:
        c._device_smem_budget.cache_clear()
    assert c.smem_budget(torch.empty(1)) == c.SMEM_BUDGET  # CPU tensors: the interpreter, AOT for sm_90


def test_pruner_keeps_configs_within_the_budget(monkeypatch) -> None:
    import triton

    import blazec.kernels._common as c

    cfgs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_stages=4),  # 4*(8K+8K)*2 = 128 KiB
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_stages=3)]  # 48 KiB
    prune = c.smem_pruner("x", lambda a: (1, 1))
    x = torch.empty(1, dtype=torch.bfloat16)
    assert prune(cfgs, {"x": x}) == cfgs
    monkeypatch.setattr(c, "smem_budget", lambda t: 100 * 1024)
    assert prune(cfgs, {"x": x}) == cfgs[1:]
    monkeypatch.setattr(c, "smem_budget", lambda t: 40 * 1024)
    (small,) = prune(cfgs, {"x": x})  # nothing fits: the smallest, with a shorter K step (3 stages kept)
    assert (small.num_stages, small.num_warps) == (3, cfgs[1].num_warps)
    assert small.kwargs == {**cfgs[1].kwargs, "BLOCK_K": 32}  # 3*(64*32+32*64)*2 B = 24 KiB
    monkeypatch.setattr(c, "smem_budget", lambda t: 20 * 1024)
    (small,) = prune(cfgs, {"x": x})  # then BLOCK_K 16 (12 KiB)
    assert small.num_stages == 3 and small.kwargs["BLOCK_K"] == 16
    cfgs4 = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_stages=5)]
    (small,) = prune(cfgs4, {"x": x})  # stages above 3 go first: 5 -> 3, then BLOCK_K 64 -> 16
    assert small.num_stages == 3 and small.kwargs["BLOCK_K"] == 16
    monkeypatch.setattr(c, "smem_budget", lambda t: 1)
    (small,) = prune(cfgs, {"x": x})  # it stops at 2 stages and BLOCK_K 16 (a dot's minimum)
    assert small.num_stages == 2 and small.kwargs["BLOCK_K"] == 16


def test_host_integer_helpers_equal_tritons() -> None:
    """The launchers' host ``host_cdiv`` and ``next_pow2`` give what ``triton.cdiv`` and
    ``triton.next_power_of_2`` give (they replaced them in grids and block sizes)."""
    import triton

    from blazec.kernels._common import host_cdiv, next_pow2

    for a in range(0, 700):
        for b in (1, 2, 3, 16, 64, 128, 256):
            assert host_cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(1, 5000)) + [2**31 - 1, 2**31, 2**40 + 1]:
        assert next_pow2(n) == triton.next_power_of_2(n), n


def test_kernels_call_no_jitted_language_helper() -> None:
    """Helpers of triton.language that are themselves ``@jit`` functions (tl.zeros, tl.sum,
    tl.cdiv, ...) re-patch the whole language under the interpreter on every call (about 3 ms;
    tl.zeros alone was 10% of the split-dh tests). The kernels use the builtin they wrap
    (tl.full) or a ``device_fn`` of kernels/_common.py (rsum, csum, cdiv) instead, which
    compile to the same code."""
    import ast
    import pathlib

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        InterpretedFunction = JITFunction
    jitted = {n for n in dir(tl) if isinstance(getattr(tl, n), (JITFunction, InterpretedFunction))}
    assert {"zeros", "sum", "cdiv"} <= jitted, sorted(jitted)  # the check still sees them
    root = pathlib.Path(__file__).parents[2] / "kernels"
    calls = [f"{p.name}:{n.lineno}: tl.{n.func.attr}" for p in sorted(root.glob("*.py"))
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and n.func.value.id == "tl" and n.func.attr in jitted]
    assert calls == [], calls
