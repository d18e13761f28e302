"""scripts/path_smoke.py, the GPU script's crash guard for the timed launch paths: its usage
errors, and its layer on CPU (the reference ops: the plumbing, not the kernels)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "path_smoke.py"


def _module():
    spec = importlib.util.spec_from_file_location("path_smoke", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_usage_and_paths(capsys) -> None:
    mod = _module()
    from blazec.kernels._common import AUTO_PATHS

    assert set(mod.PATHS) <= set(AUTO_PATHS)  # names BLAZEC_AUTO_EXCLUDE accepts
    assert mod.main([]) == 2 and mod.main(["wdie"]) == 2
    assert "one of wide, tma" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert mod.main(["tma"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("stacked", [True, False])
def test_layer_runs_and_repeats(monkeypatch, stacked) -> None:
    mod = _module()
    for var in ("BLAZEC_GEMM1", "BLAZEC_ROWS", "BLAZEC_DX"):
        monkeypatch.setenv(var, "auto")  # run() sets them; monkeypatch restores them
    a = mod.run(mod.DEFAULT, stacked, device="cpu")
    b = mod.run({**mod.DEFAULT, **mod.PATHS["cat"]}, stacked, device="cpu")
    assert len(a) == (6 if stacked else 3 + 3 * 8)
    assert all(torch.equal(s, t) for s, t in zip(a, b))  # the same inputs each run
    assert all(t.abs().sum() > 0 for t in a)


def test_a_nan_is_a_disagreement(monkeypatch, capsys) -> None:
    """A path whose results hold NaN must not pass (max() would drop a NaN difference)."""
    mod = _module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls: list[dict] = []

    def run(env, stacked, device="cuda"):
        calls.append(env)
        nan = env.get("BLAZEC_GEMM1") == "tma"
        return [torch.tensor([float("nan") if nan else 1.0, 2.0])]

    monkeypatch.setattr(mod, "run", run)
    assert mod.main(["tma"]) == 1 and "DISAGREES" in capsys.readouterr().out
    assert mod.main(["cat"]) == 0 and "agrees" in capsys.readouterr().out
