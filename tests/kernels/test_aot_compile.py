"""Compile every kernel variant for sm_90 without a GPU (opt-in: a few minutes on 2 cores).

    BLAZEC_AOT=1 pytest tests/kernels/test_aot_compile.py

Runs ``tests/kernels/aot_compile.py`` in a fresh process without TRITON_INTERPRET (this
session's kernels are interpreted), see that file for what it checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BLAZEC_AOT") != "1", reason="opt-in: set BLAZEC_AOT=1")
def test_compile_every_variant_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "tests.kernels.aot_compile", "--arch", "90"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
