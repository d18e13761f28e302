"""``blazec dump`` on every example, its output formats, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blazec.cli import main
from tests.helpers import EXAMPLE_FILES, EXAMPLES

SECTIONS = ["Dynamo graph", "blaze pass reports", "graph after blaze passes", "forward/backward partition",
            "partitioned forward graph", "partitioned backward graph", "Inductor output code"]


def _dump(capsys, *argv):
    rc = main(["dump", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_dump_every_example_json(name, capsys):
    """Every example dumps as one JSON document. One of them under Inductor, with its output
    code; the others with ``--final-stage eager`` (the same passes and partition:
    tests/test_examples.py runs each of them under Inductor)."""
    inductor = name == "moe_loop_modulelist.py"
    stage = () if inductor else ("--final-stage", "eager")
    rc, out, err = _dump(capsys, str(EXAMPLES / name) + ":make", "--json", *stage)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["mode"] == "train" and doc["graphs"]
    for g in doc["graphs"]:
        assert "class GraphModule" in g["dynamo_graph"] and "class GraphModule" in g["blaze_graph"]
        # pre-grad reports, then the post-grad pass once per partitioned graph (forward, backward)
        assert [p["name"] for p in g["passes"]] == ["moe_dispatch", "moe_gating", "comm_overlap", "comm_overlap"]
        assert not any(p["matches"] for p in g["passes"][2:])  # no collectives in the examples
        assert len(g["passes"][0]["matches"]) == 1, g["passes"][0]  # every example form is rewritten
        (part,) = g["partitions"]
        sizes = [s["bytes"] for s in part["saved"]]
        assert sizes and all(b > 0 for b in sizes)
        assert sum(sizes) == part["total_bytes"]
        own = [s["bytes"] for s in part["saved"] if not s["is_input"] and not s["view_of"]]
        assert part["activation_bytes"] == sum(own)
        assert g["final_stage"] == ("inductor" if inductor else "eager")
        assert bool(g["output_code"]) == inductor and all(Path(p).is_file() for p in g["output_code"])


def test_dump_text_sections_and_total(capsys):
    rc, out, _ = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"))  # ':make' is the default
    assert rc == 0
    for section in SECTIONS:
        assert f"graph 0: {section}" in out, section
    assert "MATCH static_loop_modulelist" in out
    # the post-grad pass runs once per partitioned graph, and its report says which
    assert "[comm_overlap: forward graph]" in out and "[comm_overlap: backward graph]" in out
    total_line = next(l for l in out.splitlines() if "total saved:" in l)
    listed = sum(int(l.split(" B ")[0].split()[-1].replace(",", "")) for l in out.splitlines()
                 if l.startswith("  ") and (" input" in l or " activation" in l) and " B  (" in l)
    assert f"{listed:,d} B" in total_line


def test_dump_out_dir_eval_and_pass_subset(tmp_path, capsys):
    out_dir = tmp_path / "dump"
    rc, out, err = _dump(capsys, str(EXAMPLES / "moe_loop_stacked.py") + ":make", "--eval", "--out", str(out_dir),
                         "--final-stage", "eager", "--pass", "moe_dispatch")
    assert rc == 0, err
    assert "nothing is saved for backward" in out
    assert (out_dir / "dump.txt").read_text().startswith("=")
    json.loads((out_dir / "dump.json").read_text())
    files = {p.name for p in out_dir.rglob("*")}
    assert {"fx_graph_dynamo.py", "fx_graph_blaze.py", "blaze_pass_reports.txt", "partition.txt"} <= files
    assert f"wrote {len(list(p for p in out_dir.rglob('*') if p.is_file()))} file(s)" in err


def test_dump_out_reused_drops_the_previous_dumps_graph_folders(tmp_path, capsys):
    """A second dump into the same --out kept the first one's model__N folders, which this
    dump did not have; the user's own files there stay."""
    out_dir = tmp_path / "dump"
    (out_dir / "model__7").mkdir(parents=True)  # as a previous dump of a model with 8 graphs left it
    (out_dir / "model__7" / "fx_graph_dynamo.py").write_text("stale")
    (out_dir / "notes.txt").write_text("mine")
    (out_dir / "dump.json").write_text("{}")
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_stacked.py"), "--eval", "--out", str(out_dir),
                       "--final-stage", "eager", "--pass", "moe_dispatch")
    assert rc == 0, err
    assert not (out_dir / "model__7").exists() and (out_dir / "model__0").is_dir()
    assert (out_dir / "notes.txt").read_text() == "mine"


def test_dump_out_without_a_previous_dump_keeps_its_folders(tmp_path, capsys):
    out_dir = tmp_path / "dump"
    (out_dir / "model__7").mkdir(parents=True)  # not blazec's: no dump.json beside it
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_stacked.py"), "--eval", "--out", str(out_dir),
                       "--final-stage", "eager", "--pass", "moe_dispatch")
    assert rc == 0, err
    assert (out_dir / "model__7").is_dir()


RAISES = """import torch
class M(torch.nn.Module):
    def forward(self, x):
        raise {exc}
def make():
    return M(), (torch.randn(4, 8),)
"""


@pytest.mark.parametrize(
    "write, spec, message",
    [
        (None, "does/not/exist.py:make", "model file not found: does/not/exist.py"),
        ("def make():\n    return 1\n", "{f}:nope", "no function 'nope' in {f} (functions found: make)"),
        ("def make():\n    raise RuntimeError('bad weights')\n", "{f}:make", "factory {f}:make raised RuntimeError: bad weights"),
        ("def make():\n    return 1, 2, 3\n", "{f}:make", "factory {f}:make returned tuple; expected (model: nn.Module"),
        ("def make():\n    return 'm', ()\n", "{f}:make", "returned a model of type str"),
        ("import torch\ndef make():\n    return torch.nn.Linear(2, 2), 5\n", "{f}:make", "returned example_inputs of type int"),
        ("def make(:\n", "{f}:make", "could not load {f}: SyntaxError"),
        ("import sys\nsys.exit(3)\n", "{f}:make", "could not load {f}: it called sys.exit(3) on import"),
        ("import sys\ndef make():\n    sys.exit(4)\n", "{f}:make", "factory {f}:make called sys.exit(4)"),
        # the model's own errors, found by its eager step before the compile: user errors naming the file
        ("import torch\ndef make():\n    return torch.nn.Linear(4, 4), (torch.randn(3, 5),)\n", "{f}:make",
         "the model in {f} failed on its example inputs (its forward and backward run eagerly, before compiling): "
         "RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x5 and 4x4)"),
        ("import torch\ndef make():\n    return torch.nn.Linear(8, 16), (torch.randn(4, 8, dtype=torch.float64),)\n",
         "{f}:make", "the model in {f} failed on its example inputs (its forward and backward run eagerly, before "
         "compiling): RuntimeError: mat1 and mat2 must have the same dtype, but got Double and Float"),
        (RAISES.format(exc="RuntimeError('user model runtime error')"), "{f}",
         "the model in {f} failed on its example inputs (its forward and backward run eagerly, before compiling) "
         "at m.py:4 in forward: RuntimeError: user model runtime error"),
        (RAISES.format(exc="KeyError('k')"), "{f}", "failed on its example inputs (its forward and backward run "
         "eagerly, before compiling) at m.py:4 in forward: KeyError: 'k'"),
        (RAISES.format(exc="ValueError('bad x')"), "{f}", "at m.py:4 in forward: ValueError: bad x"),
        ("import torch\ndef make():\n    return torch.nn.Linear(4, 4).requires_grad_(False), (torch.randn(3, 4),)\n",
         "{f}:make", "the model's output does not require grad; use --eval"),
        ("def make():\n    return 1\n", "{f}:make:extra", "invalid model spec '{f}:make:extra': more than one ':'"),
        (None, "", "empty model spec; expected path/to/file.py[:function]"),
        (None, str(Path(__file__).parent), "is a directory; give a .py file"),  # it said "not found"
    ],
)
def test_dump_bad_input_one_line_error(tmp_path, capsys, write, spec, message):
    f = tmp_path / "m.py"
    if write is not None:
        f.write_text(write)
    rc, out, err = _dump(capsys, spec.format(f=f))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("blazec dump: error: ")
    assert message.format(f=f) in err
    assert "Traceback" not in err


def test_dump_unknown_pass_is_an_error(capsys):
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--pass", "nope")
    assert rc == 2 and "unknown pass name(s) 'nope'; known passes: moe_dispatch, moe_gating, comm_overlap" in err


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "blazec", "dump", "missing.py"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "blazec dump: error: model file not found: missing.py"


def test_dump_memory_budget_shows_the_plan(capsys):
    rc, out, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--final-stage", "eager",
                         "--memory-budget", "0.5")
    assert rc == 0, err
    assert "checkpoint plan: solver" in out and "budget: 50% of the default partition" in out
    # the partition table and the plan count the same bytes: the saved view of the input is free
    assert "view of input primals_1" in out
    table = int(out.split("B of activations")[0].rsplit("(", 1)[1].replace(",", ""))
    plan = int(out.split("saved for backward: ")[1].split(" B")[0].replace(",", ""))
    assert table == plan, (table, plan)
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--memory-budget", "2XB")
    assert rc == 2 and "memory_budget" in err and err.startswith("blazec dump: error: ")


@pytest.mark.xdist_group("gloo")  # spawns gloo ranks: one such test at a time (README, "Tests")
def test_dump_expert_parallel_shows_the_dispatch_and_the_schedule(capsys):
    rc, out, err = _dump(capsys, str(EXAMPLES / "moe_loop_stacked.py"), "--final-stage", "eager",
                         "--expert-parallel", "2", "--ep-chunks", "3")
    assert rc == 0, err
    assert out.startswith("expert parallel: rank 0 of 2 gloo ranks")
    assert "expert_parallel=rank 0/2 runs experts 0..3, 3 chunk(s)" in out
    assert all(f in out for f in ("ep_plan", "ep_exchange_counts", "ep_send", "ep_return", "ep_sum"))
    assert "schedule after the pass:" in out and "issue all_to_all_single" in out
    assert "overlaps=" in out and "moe_experts" in out.split("schedule after the pass:")[1]
    # the gating pass follows the chunks back to the router, once per layer
    assert out.count("note: router of the MoE layer at moe_loop_stacked.py:32: topk_softmax") == 1


@pytest.mark.parametrize("argv, message", [
    (["--expert-parallel", "0"], "--expert-parallel must be a number of ranks in [1, 64], got 0"),
    (["--ep-chunks", "0"], "option 'ep_chunks' must be an int in [1, 64], got 0"),
])
def test_dump_expert_parallel_bad_numbers(capsys, argv, message):
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_stacked.py"), *argv)
    assert rc == 2 and err.strip() == f"blazec dump: error: {message}", err


def test_dump_out_is_checked_before_the_compile(tmp_path, capsys):
    """--out naming an existing file is an error before the model is compiled (the dump was
    lost after the whole compile before)."""
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--out", str(f))
    assert rc == 2 and f"blazec dump: error: --out {f}: exists and is not a directory" in err
    assert f.read_text() == "x"


COMPILE_ONLY = """import torch
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)
    def forward(self, x):
        y = self.l(x)
        if torch.compiler.is_compiling():
            y = y @ torch.randn(3, 3)
        return y
def make():
    return M(), (torch.randn(4, 8),)
"""
BRANCH = """import torch
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)
    def forward(self, x):
        y = self.l(x)
        if y.sum() > 0:
            return y * 2
        return y
def make():
    return M(), (torch.randn(4, 8),)
"""


@pytest.mark.parametrize("write, argv, message", [
    (COMPILE_ONLY, [], "failed under torch.compile at m.py:9 in forward: RuntimeError: a and b must have same "
                       "reduction dim, but got [4, 8] X [3, 3]."),
    (BRANCH, ["--fullgraph"], "failed under torch.compile at m.py:8 in forward: Unsupported: Data-dependent "
                              "branching (--fullgraph allows no graph break)"),
])
def test_dump_model_errors_under_compile_are_user_errors(tmp_path, capsys, write, argv, message):
    """The model's own code failing only under compile (its eager step passed) is the model's
    error, named by its file and line, not an internal error of blazec."""
    f = tmp_path / "m.py"
    f.write_text(write)
    rc, _, err = _dump(capsys, str(f), "--final-stage", "eager", *argv)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"blazec dump: error: the model in {f} ") and message in err, err


def test_dump_a_blazec_failure_is_still_an_internal_error(capsys, monkeypatch):
    """A failure inside blazec (here: a pass that raises) is not blamed on the model."""
    import blazec.backend

    def boom(*args, **kwargs):
        raise RuntimeError("blazec bug")

    monkeypatch.setattr(blazec.backend, "passes_for", boom)
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--final-stage", "eager")
    assert rc == 2 and err.startswith("blazec dump: internal error (RuntimeError): blazec bug"), err


@pytest.mark.parametrize("value, raises", [("1", True), ("0", False), ("yes", None)])
def test_traceback_setting_is_0_or_1(capsys, monkeypatch, value, raises):
    """BLAZEC_TRACEBACK=1 re-raises; any value but 0 or 1 is an error (``yes`` was ignored)."""
    monkeypatch.setenv("BLAZEC_TRACEBACK", value)
    argv = ["dump", str(EXAMPLES / "no_such_file.py")]
    if raises:
        with pytest.raises(Exception, match="no_such_file"):
            main(argv)
        return
    rc = main(argv)
    err = capsys.readouterr().err
    expected = "model file not found" if raises is False else "BLAZEC_TRACEBACK must be 0 or 1 (default 0), got 'yes'"
    assert rc == 2 and expected in err, err


def test_dump_a_value_error_inside_the_backend_is_an_internal_error(capsys, monkeypatch):
    """Inside the backend only blazec's own user-facing errors (bad options, expert-parallel
    setup) are the user's; a plain ValueError there (an op's check on a rewritten graph) was
    printed as the user's error, with no traceback hint."""
    import blazec.backend

    def boom(*args, **kwargs):
        raise ValueError("partition bookkeeping went wrong")

    monkeypatch.setattr(blazec.backend, "partition_joint", boom)
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--final-stage", "eager")
    assert rc == 2 and err.startswith("blazec dump: internal error (ValueError): partition bookkeeping"), err


TRANSPOSED_MATMUL = """import torch, torch.nn as nn, torch.nn.functional as F
class M(nn.Module):
    def __init__(self, d=16, inter=24, E=4, k=2):
        super().__init__()
        self.gate = nn.Linear(d, E, bias=False)
        self.W = nn.Parameter(torch.randn(E, d, inter) * 0.1)
        self.W2 = nn.Parameter(torch.randn(E, inter, d) * 0.1)
        self.E, self.k = E, k
    def forward(self, x):
        w, ids = self.gate(x).softmax(-1).topk(self.k, -1)
        out = torch.zeros_like(x)
        mask = F.one_hot(ids, self.E).permute(2, 1, 0)
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            h = F.relu(self.W[e].t().matmul(x[tok].t()).t())
            out.index_add_(0, tok, self.W2[e].t().matmul(h.t()).t() * w[tok, slot, None])
        return out
def make():
    torch.manual_seed(0)
    return M(), (torch.randn(32, 16),)
"""


def test_dump_a_data_dependent_size_torch_cannot_trace_says_what_to_do(tmp_path, capsys):
    """README's known torch limitation (AOTAutograd's GuardOnDataDependentSymNode on this
    spelling) was printed as blazec's internal error; it now names the limitation and the
    setting that compiles the model."""
    f = tmp_path / "m.py"
    f.write_text(TRANSPOSED_MATMUL)
    rc, _, err = _dump(capsys, str(f), "--final-stage", "eager")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("blazec dump: error: torch could not trace a data-dependent size"), err
    assert "BLAZEC_CAPTURE_DYNAMIC=0 compiles the model" in last
    assert "BLAZEC_TRACEBACK" not in last  # the hint is for internal errors


def test_a_rank_error_whose_detail_is_on_the_next_line_keeps_it():
    """An expert-parallel rank's "BackendCompilerFailed: backend='blaze' raised:" has its cause
    on the next line; the one-line error stopped at "raised:"."""
    from blazec.dump import _last_error_line

    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
          "torch._dynamo.exc.BackendCompilerFailed: backend='blaze' raised:\n"
          "GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u3, 1)\n\n"
          "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n")
    assert _last_error_line(tb) == ("torch._dynamo.exc.BackendCompilerFailed: backend='blaze' raised: "
                                    "GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u3, 1)")
    assert _last_error_line("ValueError: bad\n") == "ValueError: bad"


def test_dump_eager_check_leaves_the_model_and_rng_as_they_were():
    from blazec.dump import check_eager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    x = torch.randn(6, 4)
    x0 = x.clone()
    stats = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    check_eager(model, (x,), train=True, where="m.py")
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(x, x0)


def test_dump_eval_with_a_memory_budget_is_an_error(capsys):
    """--eval has no backward, so no partition to budget: the budget was silently ignored."""
    rc, out, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--eval", "--memory-budget", "0.5")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("blazec dump: error: --memory-budget ") and "--eval" in err


def test_dump_out_that_cannot_be_created_is_an_error_before_the_compile(tmp_path, capsys):
    """--out under a file (or /proc) failed after the whole compile, with an OSError that did not
    name --out."""
    f = tmp_path / "afile"
    f.write_text("x")
    bad = f / "sub"
    spec = tmp_path / "m.py"
    spec.write_text("raise SystemExit('the factory must not load')\n")
    rc, _, err = _dump(capsys, str(spec), "--out", str(bad))
    assert rc == 2 and err.startswith(f"blazec dump: error: --out {bad}: cannot create a directory there"), err
    assert err.count("\n") == 1


def test_dump_out_created_for_a_failed_dump_is_removed(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(RAISES.format(exc="RuntimeError('no')"))
    out = tmp_path / "new" / "dump"
    rc, _, err = _dump(capsys, str(f), "--out", str(out))
    assert rc == 2 and "RuntimeError: no" in err
    assert not (tmp_path / "new").exists()


def test_dump_a_compile_error_in_a_module_the_model_imports_is_the_models(tmp_path, capsys, monkeypatch):
    """The model's layers may live in another file (a model library, a module beside it): an
    error raised in their code is still the model's, not an internal error."""
    (tmp_path / "layers_for_blazec_test.py").write_text(BRANCH.split("def make")[0].replace("class M", "class Block"))
    (tmp_path / "model.py").write_text(
        "import torch\nfrom layers_for_blazec_test import Block\n"
        "def make():\n    return Block(), (torch.randn(4, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = _dump(capsys, str(tmp_path / "model.py"), "--fullgraph")
    assert rc == 2 and "blazec dump: error: the model in" in err, err
    assert "at layers_for_blazec_test.py:" in err and "Unsupported: Data-dependent" in err, err


def test_dump_eager_check_leaves_no_side_effect_of_the_model():
    """The eager step runs on a copy: a counter, a parameter written under no_grad and Python's
    random state were left changed for the compile to see."""
    import random

    from blazec.dump import check_eager

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(4, 4), 0

        def forward(self, x):
            self.calls += 1
            with torch.no_grad():
                self.lin.weight.mul_(2.0)
            return self.lin(x) * random.random()

    model, x = M(), torch.randn(3, 4)
    w0, state = model.lin.weight.detach().clone(), random.getstate()
    check_eager(model, (x,), train=True, where="m.py")
    assert model.calls == 0 and torch.equal(model.lin.weight, w0) and model.lin.weight.grad is None
    assert random.getstate() == state


def test_dump_eager_check_restores_a_model_that_cannot_be_copied():
    """A model that refuses deep copying runs itself: its buffers and gradients are put back."""
    from blazec.dump import check_eager

    class M(torch.nn.Sequential):
        def __deepcopy__(self, memo):
            raise TypeError("not copyable")

    torch.manual_seed(0)
    model, x = M(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)), torch.randn(6, 4)
    stats = [b.clone() for b in model.buffers()]
    check_eager(model, (x,), train=True, where="m.py")
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))
    assert all(p.grad is None for p in model.parameters())


def test_json_stays_one_document_when_the_model_prints(tmp_path, capsys):
    """What the model prints went to stdout ahead of the JSON document, which then did not parse."""
    import json

    f = tmp_path / "talky.py"
    f.write_text("import torch\n\n"
                 "class M(torch.nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__()\n"
                 "        self.lin = torch.nn.Linear(4, 4)\n\n"
                 "    def forward(self, x):\n"
                 "        print('hello from forward')\n"
                 "        return self.lin(x).sin()\n\n"
                 "def make():\n"
                 "    return M(), (torch.randn(3, 4),)\n")
    rc, out, err = _dump(capsys, str(f), "--final-stage", "eager", "--json")
    assert rc == 0, err
    json.loads(out)
    assert "hello from forward" in err


@pytest.mark.slow  # left out of the default run (README, "Tests")
@pytest.mark.xdist_group("gloo")  # spawns gloo ranks: one such test at a time (README, "Tests")
def test_json_stays_one_document_when_expert_parallel_ranks_print(tmp_path):
    """The ranks are processes of their own, which wrote what the model printed to the shared
    stdout ahead of the JSON document (the redirect was Python's, in the parent only)."""
    import subprocess
    import sys

    f = tmp_path / "talky_moe.py"
    f.write_text(f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\n"
                 "print('hello from import')\n"
                 "from moe_loop_modulelist import make as _make\n\n"
                 "def make():\n"
                 "    print('hello from make')\n"
                 "    return _make()\n")
    r = subprocess.run([sys.executable, "-m", "blazec", "dump", str(f), "--final-stage", "eager", "--json",
                        "--expert-parallel", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["graphs"], doc
    assert r.stderr.count("hello from make") >= 2  # the ranks' prints, on stderr


def test_empty_out_is_an_error(capsys):
    rc, _, err = _dump(capsys, str(EXAMPLES / "moe_loop_modulelist.py"), "--out", "")
    assert rc == 2 and "--out needs a directory" in err


def test_every_node_the_rewrite_inserts_points_at_the_replaced_code(capsys):
    """GShard's stacked ids and weights, inserted before the op's own nodes, had no source
    location: the dump printed them under "No stacktrace found for following nodes"."""
    rc, out, err = _dump(capsys, str(EXAMPLES / "moe_gshard_top2.py"), "--final-stage", "eager", "--pass", "moe_dispatch")
    assert rc == 0, err
    blaze = out.split("graph after blaze passes")[1].split("forward/backward partition")[0]
    assert "torch.ops.blazec.moe_route" in blaze and "torch.stack(" in blaze
    assert "No stacktrace found" not in blaze
