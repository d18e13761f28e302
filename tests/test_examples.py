"""Every example runs eager and under blaze (Inductor) with the same outputs and gradients."""

import copy

import pytest

from tests.helpers import EXAMPLE_FILES, assert_same_training, load_example


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_matches_eager(name):
    model, inputs = load_example(name).make()
    assert_same_training(copy.deepcopy(model), model, inputs, {"backend": "blaze"}, atol=2e-5, rtol=1e-4)


def test_train_tiny_curves_agree(capsys):
    eager, blaze = load_example("train_tiny.py").main(["--steps", "6", "--final-stage", "eager"])
    assert len(eager) == len(blaze) == 6
    assert eager[-1] < eager[0], "the student should learn"
    for a, b in zip(eager, blaze):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    assert "max |eager - blaze| over 6 steps" in capsys.readouterr().out


@pytest.mark.xdist_group("gloo")  # spawns gloo ranks: one such test at a time (README, "Tests")
def test_expert_parallel_example_under_torchrun():
    """``torchrun --nproc-per-node 2 examples/expert_parallel.py`` trains like one process."""
    import re
    import subprocess
    import sys

    from tests.helpers import EXAMPLES

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLES / "expert_parallel.py"), "--steps", "2"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "max |param diff|" in line]
    assert len(lines) == 3, proc.stdout  # rank 0 every step, rank 1 at the last
    for line in lines:
        ep, one = map(float, re.search(r"loss ([\d.]+) \(one process ([\d.]+)\)", line).groups())
        diff = float(re.search(r"parameters ([\d.e+-]+)", line).group(1))
        assert abs(ep - one) <= 1e-5 and diff <= 1e-5, line
