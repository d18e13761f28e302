"""Compile the kernels for sm_90 without a GPU, with Triton's real compiler (not the interpreter).

    pytest tests/kernels/test_aot_compile.py                  # a cover of the first configs: ~40 s on 2 CPUs
    BLAZEC_AOT=1 pytest -m "" tests/kernels/test_aot_compile.py   # every first config, then every config: many minutes

Runs ``tests/kernels/aot_compile.py`` in a fresh process without TRITON_INTERPRET (this
session's kernels are interpreted) and with an empty Triton cache, so every variant is really
compiled; see that file for what it checks. It is the only check of the compiled path that
runs without a GPU: compile errors the interpreter cannot see, shared memory per block, that
every 16-bit GEMM compiles to wgmma for Hopper, and that every K loop is pipelined (no
synchronous tile load in it, and no wait for every outstanding copy or MMA in each
iteration), and that no two kernel variants share an autotune key.

By default it compiles ``--cover``: the fewest first-config variants that still compile every
kernel with each argument type, constexpr value and launch option the launchers produce (44 of
124 on 2026-11-28; all 124 took 4 of the suite's 28 minutes on the 2-core sandbox). The
combinations the cover drops are compiled by ``BLAZEC_AOT=1`` and by any GPU run of the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _compile(tmp_path: Path, *flags: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    r = subprocess.run([sys.executable, "-m", "tests.kernels.aot_compile", "--arch", "90", *flags], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " 0 failure(s)" in r.stdout and "kernel variants compiled for cuda:90" in r.stdout, r.stdout


def test_compile_a_cover_of_the_kernel_variants_for_sm90(tmp_path: Path) -> None:
    _compile(tmp_path, "--cover")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BLAZEC_AOT") != "1", reason="opt-in: set BLAZEC_AOT=1 (every variant and config)")
@pytest.mark.parametrize("flags", [(), ("--all",)], ids=["first-configs", "all-configs"])
def test_compile_every_kernel_variant_for_sm90(tmp_path: Path, flags) -> None:
    _compile(tmp_path, *flags)


def test_mma_kind_reads_the_tensor_core_instructions_from_ptx() -> None:
    from tests.kernels.aot_compile import expected_mma, expects_pipelining, loop_drains, loop_tile_loads, mma_kind

    assert mma_kind("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}") == "wgmma"
    assert mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma.sync"
    assert mma_kind("wgmma.mma_async.sync.aligned.m64n64k16\nmma.sync.aligned.m16n8k16") == "wgmma+mma.sync"
    assert mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"
    # what each variant must compile to: 16-bit (or tf32) GEMMs, wgmma on Hopper, mma.sync on Ampere/Ada
    assert expected_mma("_gemm1_kernel", {"x": "*bf16", "ids": "*i64"}, 90) == "wgmma"
    assert expected_mma("_wgrad_kernel", {"x": "*fp16"}, 80) == "mma.sync"
    assert expected_mma("_dh_kernel", {"x": "*fp32"}, 90) is None  # fp32: tf32 only when torch allows it
    assert expected_mma("_dh_kernel", {"x": "*fp32"}, 90, {"PREC": "tf32"}) == "wgmma"  # and then tensor cores
    assert expected_mma("_combine_kernel", {"x": "*bf16"}, 90) is None  # not a GEMM
    # pipelining is required of GEMMs whose tables (if any) are 16-byte aligned
    assert expects_pipelining("_gemm1_kernel", {"WG_TAB": 16, "WU_TAB": 0, "BLOCK_M": 128}, 90)
    assert not expects_pipelining("_gemm1_kernel", {"WG_TAB": 1, "WU_TAB": 1}, 90)  # unaligned views
    assert not expects_pipelining("_combine_kernel", {}, 90) and not expects_pipelining("_dh_kernel", {}, 75)
    ir = """  tt.func @k() {
    %a = tt.load %p0 : tensor<128x!tt.ptr<i64>, #blocked>
    %r:2 = scf.for %i = %c0 to %n step %c64 iter_args(%x = %y) -> (tensor<128x64xf32>) {
      %b = tt.load %bp, %m, %o : tensor<64x128x!tt.ptr<bf16>, #blocked1>
      %c = ttg.async_copy_global_to_local %ap, %s : tensor<128x64x!tt.ptr<bf16>, #blocked> -> <128x64xbf16>
      %v = tt.load %vp : tensor<64x!tt.ptr<bf16>, #blocked2>
      scf.yield %x
    }
    %g = tt.load %gp, %m2 : tensor<128x128x!tt.ptr<bf16>, #mma>
  }"""
    assert loop_tile_loads(ir) == 1  # the 2-D load in the loop; not the async copy, a 1-D load, or the epilogue
    assert loop_drains(ir) == 0
    drained = """  tt.func @k() {
    %r = scf.for %i = %c0 to %n step %c64 iter_args(%x = %y) -> (tensor<128x64xf32>) {
      %w = ttg.async_wait %a, %b {num = 0 : i32}
      %w2 = ttg.async_wait %a {num = 2 : i32}
      %d:2 = ttng.warp_group_dot_wait %acc, %b {pendings = 1 : i32} : tensor<128x128xf32, #mma>
      scf.yield %x
    }
    %e = ttg.async_wait {num = 0 : i32}
  }"""
    assert loop_drains(drained) == 1  # the first wait in the loop; not those that keep 2 or 1, or the epilogue's
    serial = drained.replace("pendings = 1", "pendings = 0")
    assert loop_drains(serial) == 2  # the copy wait, and now an MMA wait for every issued wgmma
    # triton 3.9 prints the MMA wait with an attribute after the count
    assert loop_drains(serial.replace("pendings = 0 : i32}", "pendings = 0 : i32, warpGroupLocal}")) == 2
    # A persistent kernel's flattened tile loop: its epilogue, under an scf.if (or its else) on
    # a tile's last K step, waits for that tile's MMAs once; any other drain still counts.
    flat = """  tt.func @k() {
    %r = scf.for %i = %c0 to %n step %c1 iter_args(%x = %y) -> (tensor<128x64xf32>) {
      %w2 = ttg.async_wait %a {num = 2 : i32}
      scf.if %last {
        %d:2 = ttng.warp_group_dot_wait %acc, %b {pendings = 0 : i32, warpGroupLocal} : tensor<128x128xf32, #mma>
        tt.store %p, %v
      } else {
        %z = arith.addi %q, %q : i32
      }
      scf.yield %x
    }
  }"""
    assert loop_drains(flat) == 1 and loop_drains(flat, persistent=True) == 0
    twice = flat.replace("%z = arith.addi %q, %q : i32", "%e:2 = ttng.warp_group_dot_wait %acc {pendings = 0 : i32}")
    assert loop_drains(twice, persistent=True) == 1  # a second conditional MMA drain
    copies = flat.replace("tt.store %p, %v", "%c = ttg.async_wait {num = 0 : i32}")
    assert loop_drains(copies, persistent=True) == 1  # it would wait out the next tile's copies
    assert loop_drains(flat.replace("%w2 = ttg.async_wait %a {num = 2 : i32}", "%w2 = ttg.async_wait %a {num = 0 : i32}"),
                       persistent=True) == 1  # an unconditional drain


def test_cover_keeps_every_kernel_type_flag_and_option() -> None:
    from types import SimpleNamespace

    from tests.kernels.aot_compile import cover, features

    a, b = SimpleNamespace(__name__="_a_kernel"), SimpleNamespace(__name__="_b_kernel")
    v = [  # (fn, kwargs, opts, sig, consts)
        (a, {}, {"num_warps": 4}, {"x": "*bf16", "B": "constexpr"}, {"B": 64, "ACT": "relu"}),
        (a, {}, {"num_warps": 4}, {"x": "*bf16", "B": "constexpr"}, {"B": 64, "ACT": "relu"}),  # nothing new
        (a, {}, {"num_warps": 8}, {"x": "*fp16", "B": "constexpr"}, {"B": 64, "ACT": "relu"}),
        (a, {}, {"num_warps": 4}, {"x": "*bf16", "B": "constexpr"}, {"B": 128, "ACT": "gelu"}),
        (a, {}, {"num_warps": 8}, {"x": "*fp16", "B": "constexpr"}, {"B": 128, "ACT": "gelu"}),  # covers 2 and 3
        (b, {}, {"num_warps": 4}, {"x": "*bf16"}, {}),
    ]
    kept = cover(v)
    union = set().union(*(features(fn, s, c, o) for fn, _, o, s, c in v))
    assert set().union(*(features(fn, s, c, o) for fn, _, o, s, c in kept)) == union
    assert [v.index(k) for k in kept] == [0, 4, 5]
