"""``blazec bench`` on CPU: small shapes run and print one table; GPU shapes give one line."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest
import torch

from blazec import bench


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def _run_small(tmp_path, *argv: str) -> tuple[int, str, dict]:
    """The bench on CPU at a tiny shape, one untimed-warm-up-free step: (rc, printed text, JSON)."""
    out = io.StringIO()
    path = tmp_path / "bench.json"
    rc = bench.run(_args("--device", "cpu", "--shape", "32,16,24,4,2", "--iters", "1", "--warmup", "0",
                         *argv, "--json", str(path)), stream=out)
    return rc, out.getvalue(), json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
@pytest.mark.parametrize("shape", ["olmoe-like", "mixtral-like"])
def test_gpu_shape_on_cpu_is_one_line(shape: str, capsys) -> None:
    assert bench.run(_args("--shape", shape)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blazec bench: error:") and "CUDA" in err[0]


@pytest.mark.parametrize("argv", [["--shape", "1,2,3"], ["--shape", "8,4,4,2,3"], ["--iters", "0"], ["--profile", "0"]])
def test_bad_arguments_are_one_line(argv, capsys) -> None:
    assert bench.run(_args(*argv, "--device", "cpu")) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_more_pairs_than_int32_offsets_is_an_error(capsys) -> None:
    assert bench.run(_args("--shape", f"{2**30},1,1,4,2", "--device", "cpu")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "T*k = 2147483648 (token, expert) pairs do not fit the int32 group offsets" in err


def test_cpu_small_shape_table_and_json(tmp_path) -> None:
    rc, text, data = _run_small(tmp_path, "--impl", "eager-loop", "--impl", "sort-grouped-mm", "--impl", "blazec-ops",
                                "--impl", "blazec-ops-recompute")
    assert rc == 0
    assert "CPU timings are not the GPU claim" in text
    assert text.count("| blazec-ops") == 2 and "| eager-loop |" in text
    # each row's result is printed as it ends, before the table (a run cut short keeps them)
    done = [line for line in text.splitlines() if line.startswith("    ") and " ms, peak " in line]
    assert [line.split(":")[0].strip() for line in done] == ["eager-loop", "sort-grouped-mm", "blazec-ops",
                                                             "blazec-ops-recompute"]
    assert text.index(done[-1]) < text.index("| implementation |")
    assert data["meta"]["T"] == 32 and data["meta"]["device"] == "CPU"
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"eager-loop", "sort-grouped-mm", "blazec-ops", "blazec-ops-recompute"}
    for r in rows.values():
        assert r["ms"] > 0 and not r["note"].startswith("failed"), r
        # the host's time to issue a step (on CPU the step itself: the same median)
        assert r["extra"]["host_ms"] == r["ms"], r
        # dW maps each row's weight layout (stacked, transposed, gate|up concatenated) onto the
        # loop's: a swapped or untransposed weight would show here
        assert r["err_out"] < 1e-5 and r["err_dx"] < 1e-5 and r["err_dw"] < 1e-5, r
        assert r["extra"]["first_step_diff"] == 0.0, r
    assert "| err dW |" in text and "first step: bitwise equal to a later one" in text
    # Recompute keeps less for backward than saving the pre-activations, which keeps less than eager.
    assert rows["blazec-ops-recompute"]["act_gib"] < rows["blazec-ops"]["act_gib"] < rows["eager-loop"]["act_gib"]


def test_dense_equivalent_row_is_the_percent_dense_denominator(tmp_path) -> None:
    rc, text, data = _run_small(tmp_path, "--impl", "dense-equivalent", "--impl", "blazec-ops")
    assert rc == 0
    rows = {r["impl"]: r for r in data["rows"]}
    dense, ops = rows["dense-equivalent"], rows["blazec-ops"]
    assert dense["pct_dense"] == pytest.approx(100.0) and dense["err_out"] is None and dense["err_dx"] is None
    assert ops["pct_dense"] == pytest.approx(100 * ops["tflops"] / dense["tflops"])
    assert ops["err_out"] < 1e-5  # the MoE rows are still checked against the loop, run untimed
    assert "| % dense |" in text


def test_a_first_step_that_differs_is_flagged(tmp_path, monkeypatch) -> None:
    """The first (compiling, autotuning) step's results must equal a later step's for blazec's
    deterministic kernels; a row whose first step differs says so in its note."""
    real = bench._build

    def build(impl, loop, x):
        model, facts = real(impl, loop, x)
        calls = []

        class FirstOff(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, x):
                calls.append(1)
                out = self.inner(x)
                return out + 1e-3 if len(calls) == 1 else out

        return FirstOff(), facts

    monkeypatch.setattr(bench, "_build", build)
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-ops")
    assert rc == 0
    row = data["rows"][0]
    assert row["extra"]["first_step_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert "FIRST STEP DIFFERS from a later one by 1.00e-03" in row["note"]
    assert "first step differs by 1.0e-03" in text


@pytest.mark.slow  # left out of the default run (README, "Tests")
def test_row_env_is_set_for_its_row_only(tmp_path, monkeypatch) -> None:
    """blazec-loop-grouped-mm-wgrad / -triton-wgrad run with BLAZEC_WGRAD set for their own
    row, and the variable is restored (here: unset) afterwards."""
    import os

    monkeypatch.delenv("BLAZEC_WGRAD", raising=False)
    seen = []
    real = bench._build

    def build(impl, loop, x):
        seen.append((impl, os.environ.get("BLAZEC_WGRAD")))
        return real(impl, loop, x)

    monkeypatch.setattr(bench, "_build", build)
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-loop-grouped-mm-wgrad", "--impl", "blazec-ops",
                                "--impl", "blazec-loop-triton-wgrad")
    assert rc == 0 and "BLAZEC_WGRAD" not in os.environ
    assert seen == [("blazec-loop-grouped-mm-wgrad", "grouped_mm"), ("blazec-ops", None),
                    ("blazec-loop-triton-wgrad", "triton")]
    assert all(r["err_dw"] < 1e-5 and "1 MoE rewrite(s)" in r["note"] for r in data["rows"] if "loop" in r["impl"])


def test_baseline_rows_compile_under_torchs_default_capture_settings() -> None:
    """Importing blazec.backend (the first blazec row) turns two Dynamo settings on for the
    whole process; the compiled baseline rows after it compiled under them (bench review).
    A row that is not blazec's now runs under torch's defaults; blazec's rows keep blaze's."""
    import blazec.backend  # noqa: F401  (turns the settings on, as the first blazec row does)

    cfg = torch._dynamo.config
    with cfg.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        with bench._row_env("sort-grouped-mm-compile-cudagraphs"):
            assert not cfg.capture_scalar_outputs and not cfg.capture_dynamic_output_shape_ops
        assert cfg.capture_scalar_outputs and cfg.capture_dynamic_output_shape_ops
        with bench._row_env("blazec-loop"):
            assert cfg.capture_scalar_outputs and cfg.capture_dynamic_output_shape_ops


def F_dense(dense):
    import torch.nn.functional as F

    r = dense.rows
    return F.linear(F.silu(F.linear(r, dense.w1)) * F.linear(r, dense.w3), dense.w2)


def test_dense_equivalent_has_the_moe_layers_flops() -> None:
    T, d, I, E, k = 6, 8, 12, 4, 2
    loop = bench.LoopMoE(d, I, E, k)
    x = torch.randn(T, d)
    dense = bench.DenseEquivalent(loop, x)
    # the bench's FLOP count, 3*T*k*2*d*3*I, is three [T*k, d] x [d, I]-sized GEMMs, forward and backward
    assert dense.rows.shape == (T * k, d) and dense.w1.shape == dense.w3.shape == (I, d) and dense.w2.shape == (d, I)
    out = dense(x)
    assert out.shape == (T, d)  # each token's k rows summed: the loss runs over [T, d], as the MoE rows'
    torch.testing.assert_close(out, F_dense(dense).view(T, k, d).sum(1))
    out.pow(2).mean().backward()
    assert dense.rows.grad is not None and dense.w1.grad is not None


@pytest.mark.slow  # left out of the default run (README, "Tests")
def test_the_hf_layout_baseline_computes_what_the_loop_does(tmp_path) -> None:
    """BASELINES.md's fastest mixtral-like row stores the experts as Hugging Face v5 does
    ([E, 2I, d] and [E, d, I], used transposed); torch's grouped GEMM picks its kernel by that
    layout, and the bench's own baseline stored them the other way (bench review)."""
    # (the other layout's compiled row runs on CPU as sort-grouped-mm-compile-cudagraphs, checked below)
    rc, text, data = _run_small(tmp_path, "--impl", "hf-grouped-mm-compile")
    assert rc == 0, text
    (r,) = data["rows"]
    assert r["impl"] == "hf-grouped-mm-compile", r
    assert r["err_out"] < 1e-5 and r["err_dx"] < 1e-5 and r["err_dw"] < 1e-5, r
    loop = bench.LoopMoE(8, 12, 4, 2)
    hf = bench.SortedMoE(loop, hf_layout=True)
    assert hf.w_gate_up.shape == (4, 24, 8) and hf.w_down.shape == (4, 8, 12)


def test_a_dense_matmul_is_measured_in_the_same_run(tmp_path, monkeypatch) -> None:
    """BASELINES.md's reference, a dense matmul's TFLOP/s, was never measured (bench review);
    the JSON also records the BLAZEC_* variables that choose the kernels' paths."""
    monkeypatch.setenv("BLAZEC_WGRAD", "triton")
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-loop")
    assert rc == 0, text
    mm = data["meta"]["matmul"]
    assert mm["n"] == 256 and mm["dtype"] == "float32" and mm["tflops"] > 0
    line = next(l for l in text.splitlines() if l.startswith("dense matmul in this run"))
    assert "torch.mm of two 256x256 float32 matrices" in line and "blazec-loop reaches" in line
    assert data["meta"]["env"]["BLAZEC_WGRAD"] == "triton"


def test_profile_lists_each_rows_most_expensive_ops(tmp_path) -> None:
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-ops", "--profile", "3")
    assert rc == 0
    prof = data["rows"][0]["extra"]["profile"]["top"]
    assert 1 <= len(prof) <= 3 and all(p["ms"] > 0 and p["calls"] >= 1 and p["name"] for p in prof)
    assert [p["ms"] for p in prof] == sorted((p["ms"] for p in prof), reverse=True)
    assert "profile blazec-ops, top CPU ops of one step by self time:" in text
    assert prof[0]["name"][:40] in text


def test_profile_lists_a_gpu_steps_launches_and_kernel_time(tmp_path, monkeypatch) -> None:
    """The per-launch and idle lines a GPU profile adds (kernel_ms, launches, idle), on a
    canned profile."""
    launches = [{"name": "_gemm1_kernel", "ms": 0.9}, {"name": "tiny", "ms": 0.01}]
    launches += [{"name": f"_k{i}", "ms": 0.06} for i in range(45)]
    canned = {"top": [{"name": "_gemm1_kernel", "calls": 1, "ms": 0.9}], "kernel_ms": 3.61,
              "launches": launches,
              "idle": {"lead_ms": 0.42, "gap_ms": 1.5, "gaps": 12,
                       "largest": [{"ms": 0.8, "after": "_combine_kernel", "before": "_dh_kernel"}]}}
    monkeypatch.setattr(bench, "_profile", lambda *a, **k: canned)
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-ops", "--profile")
    line = next(x for x in text.splitlines() if x.startswith("  kernels:"))
    assert line.startswith("  kernels: 47 launches, 3.610 ms in all; those of 0.05 ms or more, in order: "
                           "_gemm1_kernel 0.900, _k0 0.060")
    assert "tiny" not in line and "_k38 0.060" in line and "_k39" not in line and line.endswith(", and 6 more")
    assert rc == 0 and data["rows"][0]["extra"]["profile"]["kernel_ms"] == 3.61
    idle = text.splitlines()[text.splitlines().index(line) + 1]
    assert idle == ("  idle: 0.420 ms before the first kernel, 1.500 ms in 12 gaps between kernels; "
                    "largest: 0.800 ms after _combine_kernel before _dh_kernel")


def test_a_profiler_failure_keeps_the_rows_measurements(tmp_path, monkeypatch) -> None:
    def broken(*a, **k):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(bench, "_profile", broken)
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-ops", "--profile")
    assert rc == 0 and "profile blazec-ops: failed: RuntimeError: no profiler here" in text
    assert data["rows"][0]["ms"] > 0 and "profile" not in data["rows"][0]["extra"]
    row = next(line for line in text.splitlines() if line.startswith("| blazec-ops"))
    assert "failed" not in row and row.split("|")[2].strip() != "-"  # the row kept its time


def test_targets_are_printed_and_written(tmp_path) -> None:
    rc, text, data = _run_small(tmp_path, "--impl", "eager-loop", "--impl", "blazec-loop",
                                "--impl", "blazec-loop-recompute")
    assert rc == 0
    names = [t["name"] for t in data["meta"]["targets"]]
    assert names == ["time", "act", "recompute act", "recompute time", "agreement"]  # no peak on CPU
    assert "against the baseline rows of this run; CPU: not the claim" in text
    for t in data["meta"]["targets"]:
        assert f"  {t['name']} " in text
    by = {t["name"]: t for t in data["meta"]["targets"]}
    assert by["time"]["limit"] is None  # a custom shape has no time limit
    assert by["act"]["met"] and by["recompute act"]["met"] and by["agreement"]["met"]  # bytes and numbers hold on CPU too


def test_host_overhead_times_the_ops_host_path_with_launches_stubbed() -> None:
    """benchmarks/host_overhead.py in a subprocess (it stubs the kernel launches globally)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--tokens", "16",
                        "--experts", "4", "--dim", "32", "--hidden", "16", "--topk", "2", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "host_overhead: T=16 d=32 I=16 E=4 k=2 bf16, list weights" in r.stdout
    assert "14 kernel launches stubbed per step" in r.stdout  # the split dh step is two launches
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--topk", "9",
                          "--experts", "4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--topk 9 exceeds --experts 4" in bad.stderr


@pytest.mark.slow  # left out of the default run (README, "Tests")
def test_host_overhead_compiled_timeline_lists_each_launch_in_step_order() -> None:
    """``--compiled``: the blaze-compiled loop model's step, each stubbed launch with the host's
    time from the step's start; the route kernels come before GEMM 1, the forward's launches
    before the backward's."""
    import re
    import subprocess
    import sys

    from tests.helpers import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--compiled", "--tokens", "8",
                        "--experts", "4", "--dim", "32", "--hidden", "16", "--topk", "2", "--steps", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "blaze-compiled loop model, T=8 d=32 I=16 E=4 k=2 bf16" in r.stdout
    rows = re.findall(r"^ +([0-9.]+) +\(\+ *[0-9.]+\) +(.+)$", r.stdout, re.M)
    names = [name for _, name in rows]
    assert names[:4] == ["_route_count_kernel", "_route_scan_kernel", "_route_scatter_kernel", "_gemm1_kernel"]
    fwd = names.index("(forward returned)")
    assert names[-1] == "(backward returned)" and fwd < len(names) - 2  # backward launches between them
    times = [float(t) for t, _ in rows]
    assert times == sorted(times)
    assert re.search(r"host time before GEMM 1's launch: [0-9.]+ ms", r.stdout)
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--compiled", "--form",
                          "stacked"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "leave out --form" in bad.stderr


@pytest.mark.slow  # left out of the default run (README, "Tests")
def test_peak_memory_measures_the_kernel_path_with_launches_stubbed() -> None:
    """benchmarks/peak_memory.py in subprocesses (it stubs the kernel launches globally). The
    backward's peak, in both modes, is the three weight gradients plus the one [S, I] buffer the
    last of them reads, plus [T, d] buffers (dx, the loss's gradients): 44.5 MiB here. dg | du
    is freed (released, when written over the saved preact) before dWd is allocated; when it
    was kept to the end the peak was 46.3 MiB, and before dg | du went over the saved preact,
    49.8. What default mode keeps after forward is that preact (S x 2I bf16) and O(S) index
    bytes."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    T, d, I, E, k = 256, 512, 1792, 8, 2  # mixtral-like proportions: the weight gradients dominate
    # both modes in one process (each process spends seconds importing and warming up)
    both = (f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from peak_memory import measure; "
            f"print(json.dumps([measure(({T}, {d}, {I}, {E}, {k}), rec, 'triton') for rec in (False, True)]))")
    r = subprocess.run([sys.executable, "-c", both], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = dict(zip((False, True), json.loads(r.stdout.strip().splitlines()[-1])))
    MiB = 1 / 1024
    preact = T * k * 2 * I * 2 / 1024**3
    assert preact <= res[False]["act_gib"] <= preact + 0.1 * MiB, res
    assert res[True]["act_gib"] < 0.1 * MiB, res
    assert res[False]["peak_gib"] <= res[True]["peak_gib"] + 0.01 * MiB, res
    weight_grads = 3 * E * I * d * 2 / 1024**3
    bound = weight_grads + T * k * I * 2 / 1024**3 + T * d * (2 + 2 + 4 + 4) / 1024**3
    assert res[False]["peak_gib"] <= bound and res[True]["peak_gib"] <= bound, (res, bound)
    # The grouped_mm weight gradients (the default on Hopper in bf16) add their sorted row
    # copies (S x d) to the peak.
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peak_memory.py"), "--shape",
                        f"{T},{d},{I},{E},{k}", "--json", "--wgrad", "grouped_mm", "--trace", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    gm = json.loads(r.stdout.strip().splitlines()[-1])
    rows = T * k * d * 2 / 1024**3
    assert gm["act_gib"] == res[False]["act_gib"], (gm, res)
    assert res[False]["peak_gib"] < gm["peak_gib"] <= res[False]["peak_gib"] + rows + 0.01 * MiB, (gm, res)
    # --trace: the step's allocations of at least 1 MiB in order; the peak's lines carry the
    # peak's total, and it is reached in the blaze backward, allocating a weight gradient
    peak_lines = [ln for ln in gm["trace"] if ln.endswith("<- peak")]
    assert peak_lines and all(f"total {gm['peak_gib'] * 1024:9.1f} MiB" in ln for ln in peak_lines), gm["trace"]
    assert all("blazec::moe_experts_backward" in ln for ln in peak_lines), peak_lines
    sizes = [float(ln.split()[0]) for ln in gm["trace"] if not ln.endswith("<- peak")]
    assert all(abs(v) >= 1 for v in sizes), gm["trace"]  # (a peak's line shows at any size)
    assert E * I * d * 2 / 2**20 in map(abs, sizes + [float(ln.split()[0]) for ln in peak_lines]), gm["trace"]


@pytest.mark.slow  # left out of the default run (README, "Tests")
def test_cudagraph_rows_run_and_are_compared_with_each_other(tmp_path) -> None:
    """The mode="reduce-overhead" rows (on CPU compiled as the default mode: no CUDA graphs)
    compute what the loop does, and the targets compare them with each other."""
    rc, text, data = _run_small(tmp_path, "--impl", "sort-grouped-mm-compile-cudagraphs",
                                "--impl", "blazec-loop-cudagraphs")
    assert rc == 0
    rows = {r["impl"]: r for r in data["rows"]}
    for r in rows.values():
        assert r["ms"] > 0 and not r["note"].startswith("failed"), r
        assert r["err_out"] < 1e-5 and r["err_dx"] < 1e-5 and r["err_dw"] < 1e-5, r
    assert rows["blazec-loop-cudagraphs"]["extra"]["rewrites"] == 1
    assert "time, graphs" in text and "best baseline sort-grouped-mm-compile-cudagraphs" in text


def test_step_results_are_copies() -> None:
    """A step's kept results must not alias the step's own buffers: under CUDA graph trees (the
    -cudagraphs rows) the next replay reuses them, and the first step's results are compared
    with a later step's."""
    torch.manual_seed(0)
    loop = bench.LoopMoE(8, 12, 4, 2)
    x = torch.randn(6, 8, requires_grad=True)
    out = bench._step(loop, x)
    res = bench._result(loop, x, out)
    assert res.out.data_ptr() != out.data_ptr() and torch.equal(res.out, out)
    assert res.dx.data_ptr() != x.grad.data_ptr()  # (the weight gradients are stacked: new tensors)


def test_an_interrupt_stops_the_rows_and_reports_those_that_ran(tmp_path, monkeypatch) -> None:
    """SIGINT (the GPU script's timeout) during a row: the rows that ended are still in the
    table, the targets and the JSON."""
    real = bench._build

    def build(impl, loop, x):
        if impl == "blazec-ops":
            raise KeyboardInterrupt
        return real(impl, loop, x)

    monkeypatch.setattr(bench, "_build", build)
    rc, text, data = _run_small(tmp_path, "--impl", "eager-loop", "--impl", "blazec-ops", "--impl", "sort-grouped-mm")
    assert rc == 0
    assert "interrupted after 1 of 3 rows" in text and "| eager-loop |" in text
    assert [r["impl"] for r in data["rows"]] == ["eager-loop"]


@pytest.mark.parametrize("where, words", [("dir", "is a directory"), ("missing/x.json", "does not exist")])
def test_bad_json_path_is_an_error_before_any_row_runs(tmp_path, where, words) -> None:
    """--json's path is checked before the rows run (minutes on a GPU), with exit 2."""
    from blazec import bench

    path = tmp_path if where == "dir" else tmp_path / where
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = bench.main(["--json", str(path)])
    assert rc == 2 and f"--json {path}: " in err.getvalue() and words in err.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv, words", [(["--json", ""], "--json needs a file path"),
                                         (["--seed", str(10**23)], "--seed must be in [0, 2**63)")])
def test_module_entry_errors_are_one_line(argv, words, capsys) -> None:
    """``python -m blazec.bench`` ran without the CLI's error handling (a traceback for an
    overflowing --seed), and an empty --json ran every row and wrote nothing."""
    from blazec import bench

    assert bench.main(["--shape", "8,4,4,2,2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blazec bench: error: ") and words in err[0], err


def test_too_many_experts_is_an_error_before_any_row(capsys) -> None:
    """The loop model builds one module per expert: --shape 4,8,8,100000000,2 hung building them."""
    assert bench.run(_args("--device", "cpu", "--shape", "4,8,8,4097,2", "--impl", "eager-loop",
                           "--iters", "1", "--warmup", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blazec bench: error: --shape: E=4097 experts is more than "
                                               "the bench takes (4096)"), err


def test_a_shape_beyond_the_devices_memory_is_an_error_before_any_row(capsys) -> None:
    """A shape whose estimated bytes exceed the machine's memory failed as an internal error
    (an allocation) after the work before it."""
    assert bench.run(_args("--device", "cpu", "--shape", "1000000000,64,64,4,2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blazec bench: error: --shape T=1000000000 d=64 I=64 E=4 k=2: "
                                               "the bench needs at least "), err
    assert "(an estimate: " in err[0] and "more than this machine's physical memory" in err[0]


def test_the_memory_estimate_passes_the_gpu_shapes_on_an_80_gb_card() -> None:
    """The estimate is a lower bound; the GPU shapes, with every row in bf16, must pass on an 80 GB
    card with room (they ran on an H100)."""
    need = {name: bench.bytes_needed(*shape, 2, list(bench.IMPLS)) for name, shape in bench.SHAPES.items()}
    assert need == {"olmoe-like": 2890661888, "mixtral-like": 9127264256}, need  # 2.7 and 8.5 GiB
    assert max(need.values()) < 0.15 * 80e9
    # a row holding its own weight copy needs the loop's weights, the copy and its gradients
    T, d, I, E, k = 8, 4, 6, 2, 1
    acts = (3 * T * d + T * k * I) * 4 + T * E * 4
    w = E * (3 * d * I + d) * 4
    assert bench.bytes_needed(T, d, I, E, k, 4, ["eager-loop"]) == 2 * w + T * k * E * 8 + acts  # + one_hot mask
    # the eager loop's int64 [T, k, E] mask: this shape passed the check, then asked for 32.8 GB
    assert bench.bytes_needed(2_000_000, 1, 1, 256, 8, 4, ["eager-loop"]) > 32.7e9
    assert bench.bytes_needed(T, d, I, E, k, 4, ["eager-loop", "blazec-ops"]) == 3 * w + acts


CPU_DEFAULT_ROWS = ["eager-loop", "sort-grouped-mm", "sort-grouped-mm-compile", "hf-grouped-mm-compile", "blazec-loop",
                    "blazec-loop-recompute",
                    "blazec-ops", "blazec-ops-recompute", "dense-equivalent"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_cpu_default_rows_leave_out_the_gpu_launch_path_variants(tmp_path, monkeypatch) -> None:
    """On CPU the rows that differ from another only by a GPU launch path (BLAZEC_* kernel
    choices, CUDA graphs) ran that row's code under their own names; the default rows leave them
    out, and one line says which and why."""
    def build(impl, loop, x):  # each row fails at once: the row set is what is checked
        raise RuntimeError("not built")

    monkeypatch.setattr(bench, "_build", build)
    out = io.StringIO()
    path = tmp_path / "bench.json"
    rc = bench.run(_args("--device", "cpu", "--shape", "32,16,24,4,2", "--iters", "1", "--warmup", "0",
                         "--json", str(path)), stream=out)
    data = json.loads(path.read_text())
    assert rc == 1 and [r["impl"] for r in data["rows"]] == CPU_DEFAULT_ROWS  # 1: every row failed
    left = [i for i in bench.IMPLS if i not in CPU_DEFAULT_ROWS]
    assert data["meta"]["rows_left_out"] == left and len(left) == 12
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("NOTE: left out on CPU: "))
    assert line.startswith(f"NOTE: left out on CPU: {', '.join(left)}: each differs from another row only by a "
                           "GPU launch path"), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_a_gpu_launch_path_row_named_on_cpu_says_whose_code_it_runs(tmp_path, monkeypatch) -> None:
    real = bench._build
    monkeypatch.setattr(bench, "_build", lambda impl, loop, x: real("blazec-ops", loop, x))  # cheap: the note is checked
    rc, text, data = _run_small(tmp_path, "--impl", "blazec-loop-cat-dx", "--impl", "blazec-loop-cudagraphs",
                                "--impl", "sort-grouped-mm-compile-cudagraphs", "--impl", "blazec-ops")
    assert rc == 0 and "left out on CPU" not in text and data["meta"]["rows_left_out"] == []
    notes = {r["impl"]: r["note"] for r in data["rows"]}
    assert "same code as blazec-loop on CPU (its launch path exists only on GPU)" in notes["blazec-loop-cat-dx"]
    assert "same code as blazec-loop on CPU" in notes["blazec-loop-cudagraphs"]
    assert "same code as sort-grouped-mm-compile on CPU" in notes["sort-grouped-mm-compile-cudagraphs"]
    assert "same code as" not in notes["blazec-ops"]
    assert "    blazec-loop-cat-dx: " in text and "same code as blazec-loop on CPU" in text


def test_a_failed_row_exits_1_with_a_summary_under_the_table(tmp_path, monkeypatch, capsys) -> None:
    """Rows that fail are rows of the table (their notes say why), and the run exits 1 with one
    line naming them; it exited 0 even when every row failed."""
    real = bench._build

    def build(impl, loop, x):
        if impl == "blazec-ops":
            raise RuntimeError("row broke")
        return real(impl, loop, x)

    monkeypatch.setattr(bench, "_build", build)
    rc, text, data = _run_small(tmp_path, "--impl", "eager-loop", "--impl", "blazec-ops")
    assert rc == 1
    assert "| eager-loop |" in text and "failed: RuntimeError: row broke" in text
    assert data["meta"]["rows_failed"] == ["blazec-ops"] and data["rows"][0]["ms"] > 0
    assert capsys.readouterr().err.strip() == ("blazec bench: error: 1 of 2 row(s) failed: blazec-ops "
                                               "(each row's note in the table says why)")
    rc, _, data = _run_small(tmp_path, "--impl", "eager-loop")
    assert rc == 0 and data["meta"]["rows_failed"] == []


def test_every_row_failing_exits_nonzero_from_the_command_line() -> None:
    """The reviewer's case: BLAZEC_CAPTURE_DYNAMIC=2 fails the blazec-loop row (read when the
    backend is imported, so in a process of its own)."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "blazec", "bench", "--device", "cpu", "--shape", "16,8,8,2,2",
                        "--iters", "1", "--warmup", "0", "--impl", "blazec-loop"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "BLAZEC_CAPTURE_DYNAMIC": "2"})
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert "| blazec-loop |" in r.stdout and "failed: ValueError: BLAZEC_CAPTURE_DYNAMIC must be 0 or 1" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == ("blazec bench: error: 1 of 1 row(s) failed: blazec-loop (each "
                                                 "row's note in the table says why)")
