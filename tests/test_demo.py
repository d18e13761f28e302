"""``blazec demo`` prints its side-by-side table with matching numbers."""

import io

from blazec import demo
from blazec.cli import main


def test_demo_small_eager_stage():
    buf = io.StringIO()
    res = demo.run(tokens=96, d=16, inter=24, num_experts=4, top_k=2, steps=1, final_stage="eager", stream=buf)
    text = buf.getvalue()
    for row in ("max abs error, output", "max abs error, gradients", "time per train step", "bytes saved for backward"):
        assert row in text
    assert res["rewrites"] == 1 and "MATCH static_loop_modulelist" in text
    assert res["out_err"] < 1e-5 and res["grad_err"] < 1e-5
    assert 0 < res["blaze_saved"] < res["eager_saved"]


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--top-k", "9", "--experts", "4"]) == 2
    assert "--top-k (9) cannot exceed --experts (4)" in capsys.readouterr().err


def test_demo_rejects_more_experts_than_it_can_compile(capsys):
    """--experts 100000 was still compiling after 300 s; bench refuses more than 4096 experts."""
    assert main(["demo", "--experts", "100000", "--tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blazec demo: error: --experts 100000 is more than the demo "
                                                   "takes (4096)"), err


def test_demo_sizes_beyond_the_machines_memory_are_an_error(capsys):
    """--d 100000000 failed as an internal error (the allocator's) after building the model."""
    assert main(["demo", "--d", "100000000", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blazec demo: error: --tokens 1024 --d 100000000 "), err
    assert "the demo needs at least " in err and "more than this machine's physical memory" in err
    # the default sizes pass the estimate with room
    assert demo.bytes_needed(1024, 128, 256, 8, 2) < 64 * 2**20
