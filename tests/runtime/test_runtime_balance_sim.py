"""balance-sim: length specs, the simulation and its command line."""

from __future__ import annotations

import argparse
import runpy
import sys

import pytest
import torch

from blazec.runtime.balance import CostModel
from blazec.runtime.balance_sim import add_arguments, main, run, sample_lengths, simulate


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("spec", ["zipf:1.2", "uniform", "uniform:3:9", "lognormal:4:1", "fixed:7"])
def test_sample_lengths_in_range(spec):
    L = sample_lengths(spec, 500, 64, _gen())
    assert L.shape == (500,) and L.min() >= 1 and L.max() <= 64
    assert torch.equal(L, L.round())


def test_zipf_is_heavy_headed_and_file_spec(tmp_path):
    L = sample_lengths("zipf:1.2", 20000, 4096, _gen())
    assert (L == 1).float().mean() > 0.15 and L.max() > 1000
    f = tmp_path / "lens.txt"
    f.write_text("5\n9\n\n")
    assert set(sample_lengths(f"file:{f}", 100, 9, _gen()).tolist()) == {5.0, 9.0}
    # a length above max_len was clipped to it without a word; one past int64 failed in torch
    with pytest.raises(ValueError, match=r"holds a length of 9, above max_len \(8; --max-len"):
        sample_lengths(f"file:{f}", 100, 8, _gen())
    f.write_text("5\n99999999999999999999999\n")
    with pytest.raises(ValueError, match="holds a length of 99999999999999999999999, above max_len"):
        sample_lengths(f"file:{f}", 100, 8, _gen())


@pytest.mark.parametrize(
    "spec, match",
    [
        ("zipf", "zipf takes 1 argument"),
        ("zipf:a", "must be numbers"),
        ("zipf:-1", "exponent must be > 0"),
        ("uniform:5", "uniform takes 0 or 2"),
        ("uniform:9:3", "LO <= HI"),
        ("fixed:100", "N <= max_len"),
        ("gauss:1", "unknown distribution 'gauss'"),
        ("file:/nonexistent/lens", "cannot read lengths file"),
    ],
)
def test_bad_length_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        sample_lengths(spec, 10, 64, _gen())


def test_simulation_orders_methods_and_token_baseline():
    # 32 samples per rank at max length 1024: the longest sample costs less than an average
    # rank share, so good balancing can remove nearly all of the bubble.
    res = simulate(64, 32, "zipf:1.2", 1024, CostModel.transformer(), steps=3, seed=1)
    b = res.bubbles
    assert set(b) == {"random", "sorted_rr", "lpt", "kk", "kk (tokens)"}
    assert b["kk"] <= b["lpt"] + 1e-12 or b["kk"] < 0.01
    assert b["kk"] < b["sorted_rr"] < b["random"]
    assert b["kk"] < b["kk (tokens)"], "balancing by token count ignores the L^2 cost"
    assert res.reduction("kk") > 0.9
    assert "kk (tokens)" not in simulate(8, 4, "uniform", 64, CostModel.tokens(), steps=1).bubbles


def _run(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(argv))


def test_cli_prints_table(capsys):
    rc = _run(["--ranks", "16", "--per-rank", "8", "--steps", "2", "--no-progress", "--max-len", "512"])
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("| random |", "| sorted_rr |", "| lpt |", "| kk |", "| kk (tokens) |"):
        assert row in out
    assert "16 ranks x 8 samples" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--lengths", "zipf:x"], "bad lengths spec 'zipf:x'"),
        (["--cost", "a=1,b"], "bad cost spec"),
        (["--ranks", "0"], "--ranks must be >= 1, got 0"),
        (["--per-rank", "-1"], "--per-rank must be >= 1, got -1"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--methods", "kk,best"], "unknown method"),
        (["--max-len", "0"], "--max-len must be >= 1, got 0"),
        (["--ranks", "1000000000", "--per-rank", "1000000000"],
         "--ranks x --per-rank = 1,000,000,000,000,000,000 samples per step need at least "),
    ],
)
def test_cli_errors_are_one_line(argv, match, capsys):
    assert _run(["--no-progress", "--steps", "1"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blazec balance-sim: error: ") and match in err and "\n" not in err, err


def test_repeated_methods_are_an_error(capsys):
    """--methods kk,kk summed both runs into one row: 159.7% for kk's 79.9%."""
    from blazec.cli import main as blazec_main

    assert blazec_main(["balance-sim", "--methods", "kk,kk", "--steps", "1", "--no-progress"]) == 2
    assert "--methods lists kk more than once" in capsys.readouterr().err


def test_blazec_balance_sim_errors_have_the_commands_prefix(capsys):
    """README: every command's error is "blazec <command>: error: ..."; it was "balance-sim: error:"."""
    from blazec.cli import main as blazec_main

    assert blazec_main(["balance-sim", "--ranks", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err == "blazec balance-sim: error: --ranks must be >= 1, got 0\n"


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # imported above
def test_module_entry_point(monkeypatch, capsys):
    # In-process runpy instead of a subprocess: same __main__ path, without importing torch again.
    argv = ["balance_sim", "--ranks", "4", "--per-rank", "4", "--steps", "1", "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("blazec.runtime.balance_sim", run_name="__main__")
    assert exit_info.value.code == 0
    assert "| kk |" in capsys.readouterr().out
    assert main(["--ranks", "2", "--per-rank", "2", "--steps", "1", "--no-progress", "--cost", "tokens"]) == 0


@pytest.mark.parametrize(
    "argv, match",
    [
        # zipf draws from --max-len categories: 2e7 was torch's "number of categories cannot
        # exceed 2^24", 1e11 an allocation error, 2e9 ran out of memory.
        (["--max-len", "20000000"], "--max-len must be <= 2**24 = 16,777,216 with zipf lengths"),
        (["--max-len", "100000000000"], "--max-len must be <= 2**24"),
        (["--lengths", "uniform", "--max-len", str(2**53 + 1)], "--max-len must be <= 2**53"),
        (["--lengths", "lognormal:nan:1"], "bad lengths spec 'lognormal:nan:1': MU must be a finite number, got nan"),
        (["--lengths", "lognormal:1:inf"], "SIGMA must be a finite number, got inf"),
        (["--lengths", "zipf:inf"], "bad lengths spec 'zipf:inf': S must be a finite number, got inf"),
        (["--methods", ""], "--methods is empty; give a comma-separated list from kk, lpt"),
        (["--methods", "kk,foo"], "unknown method(s) foo; choose from"),
    ],
)
def test_cli_max_len_spec_and_methods_errors(argv, match, capsys):
    assert _run(["--no-progress", "--steps", "1", "--ranks", "2", "--per-rank", "2"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blazec balance-sim: error: ") and match in err and "\n" not in err, err


def test_sample_lengths_checks_max_len_and_parameters():
    with pytest.raises(ValueError, match="max_len must be <= 2\\*\\*24 = 16,777,216 with zipf lengths"):
        sample_lengths("zipf:1.2", 1, 2**24 + 1, _gen())
    with pytest.raises(ValueError, match="MU must be a finite number, got nan"):
        sample_lengths("lognormal:nan:1", 1, 64, _gen())
    assert sample_lengths("uniform", 3, 2**40, _gen()).max() <= 2**40
