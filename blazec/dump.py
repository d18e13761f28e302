"""``blazec dump``: compile a user's model with blaze and show what happened to each graph.

Sections per Dynamo graph: the Dynamo graph, each pass's report, the graph after blaze's
passes, the forward/backward partition (saved tensors, bytes, total), the post-grad graphs,
and where Inductor wrote its output code. ``--out DIR`` writes the same content as files
named the way ``TORCH_COMPILE_DEBUG`` names them; ``--json`` prints one JSON document.

Before compiling, the model runs the same step once eagerly (:func:`check_eager`): an error
there, or one raised in the model file's own code under compile, is the model's
(:class:`ModelError`, a user error naming the file), not blazec's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch

from blazec import report
from blazec.cli import traceback_wanted
from blazec.config import BlazeConfig
from blazec.factory import load_factory, parse_spec

RULE = "=" * 30


class ModelError(Exception):
    """The user's model failed on its example inputs: its own code, its weights or its inputs
    (a wrong dtype, a shape, an exception it raises), not blazec. The CLI prints it as a user
    error."""


class _NoGradOutput(ValueError):
    pass


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise _NoGradOutput("the model's output does not require grad; use --eval to dump inference")
    return sum(t.float().pow(2).mean() for t in leaves)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _in_file(frame: traceback.FrameSummary, path: Path) -> bool:
    """Whether ``frame`` runs the model's code: the model file, or a module it imports (its
    layers in a file beside it, a model library such as transformers), not torch, triton,
    blazec or Python's standard library."""
    try:
        f = Path(frame.filename).resolve()
        if f == path.resolve():
            return True
    except (OSError, ValueError):  # "<eval_with_key>.5" and the like
        return False
    if not f.is_file():
        return False
    return not any(f.is_relative_to(d) for d in _not_model_dirs())


def _not_model_dirs() -> list[Path]:
    """torch's, triton's, blazec's (with its passes and kernels) and the standard library's
    directories, found without importing anything new."""
    import importlib.util
    import sysconfig

    dirs = [Path(sysconfig.get_paths()["stdlib"])]
    for name in ("torch", "triton", "blazec", "blazec.passes", "blazec.kernels"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            dirs.append(Path(spec.origin).parent)
    return [d.resolve() for d in dirs]


def _model_frame(err: BaseException, path: Path) -> str | None:
    """Where in the model file ``err`` was raised ("file.py:12 in forward"): the innermost
    frame of its traceback or, for an error Dynamo raised while it traced the model, of the
    user code it was tracing, when that frame is in ``path``; the same for the exceptions it
    was raised from (``__cause__``: Dynamo wraps the model's own). None when the error comes
    from somewhere else (blazec, torch): then it is not the model's."""
    from torch._dynamo.exc import InternalTorchDynamoError

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "inner_exception", None) is not None:  # a backend failed: blazec's or Inductor's
            return None
        frames = traceback.extract_tb(e.__traceback__)[-1:]
        if not isinstance(e, InternalTorchDynamoError):
            frames += list(getattr(e, "real_stack", None) or [])[-1:]
        for frame in frames:
            if _in_file(frame, path):
                return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        e = e.__cause__
    return None


def check_eager(model: torch.nn.Module, inputs: tuple[Any, ...], *, train: bool, where: str) -> None:
    """Run the step the dump compiles (forward, and under ``train`` the loss's backward) once
    eagerly, on copies of ``inputs``: an error there is the model's own (a wrong dtype, a shape,
    an exception its code raises), raised as :class:`ModelError` naming ``where`` (the model
    file), not as blazec's.

    It runs on a deep copy of the model and the inputs, so that whatever the step changes (a
    counter, a parameter written under no_grad, a buffer registered or reassigned on the first
    call, a cache object among the inputs) stays out of what the dump compiles; torch's, Python's
    and numpy's random states are restored after. A model that cannot be deep-copied runs itself,
    with its buffers and gradients restored after."""
    import random

    model.train(train)
    tensors = [*model.parameters(), *model.buffers(), *(x for x in torch.utils._pytree.tree_leaves(inputs)
                                                        if isinstance(x, torch.Tensor))]
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})  # whose RNG to restore besides the CPU's
    try:
        model, xs = copy.deepcopy((model, inputs))
        buffers, grads = [], []  # the copies' state is thrown away with them
    except Exception:  # noqa: BLE001 - an object that refuses copying: run the model itself
        xs = torch.utils._pytree.tree_map(
            lambda x: x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x,
            inputs)
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        grads = [(p, p.grad) for p in model.parameters()]
    py_state = random.getstate()
    np_state = _numpy_state()
    try:
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(train):
            out = model(*xs)
            if train:
                _loss(out).backward()
    except _NoGradOutput:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the model's own code raises is its error
        frame = _model_frame(e, Path(where))
        at = f" at {frame}" if frame else ""
        step = "forward and backward" if train else "forward"
        raise ModelError(f"the model in {where} failed on its example inputs (its {step} run eagerly, before "
                         f"compiling){at}: {_first_line(e)}") from e
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
                else:  # the model resized it
                    b.set_(saved)
        for p, g in grads:
            p.grad = g
        random.setstate(py_state)
        if np_state is not None:
            import numpy

            numpy.random.set_state(np_state)


def _numpy_state():
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


def _compile_error(err: Exception, where: str, fullgraph: bool) -> ModelError | None:
    """A compile failure raised in the model file's own code (after its eager step passed: code
    that fails only under Dynamo, or a graph break under --fullgraph) as a :class:`ModelError`;
    None for anything else (blazec's or torch's)."""
    from torch._dynamo.exc import TorchRuntimeError, Unsupported

    frame = _model_frame(err, Path(where))
    if frame is None:
        return None
    what = _first_line(err)
    if isinstance(err, TorchRuntimeError):  # an op of the model failed on Dynamo's fake tensors: that op's error
        cause = err.__cause__
        what = (_first_line(cause) if cause is not None and str(cause).strip()
                else traced_op_error(str(err)) or what)
    hint = " (--fullgraph allows no graph break)" if fullgraph and isinstance(err, Unsupported) else ""
    return ModelError(f"the model in {where} failed under torch.compile at {frame}: {what}{hint}")


@contextlib.contextmanager
def _record_output_code() -> Iterator[None]:
    """Note every file Inductor writes its output code to, on the record being compiled."""
    from torch._inductor.codecache import PyCodeCache

    original = PyCodeCache.write.__func__

    def write(cls, *args, **kwargs):
        key, path = original(cls, *args, **kwargs)
        rec = report.current()
        if rec is not None and path not in rec.output_code:
            rec.output_code.append(path)
        return key, path

    with mock.patch.object(PyCodeCache, "write", classmethod(write)):
        yield


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


def compile_and_capture(
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    *,
    train: bool = True,
    options: dict[str, Any] | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
) -> list[report.GraphRecord]:
    """Compile ``model`` with blaze, run one step, and return the records of every graph."""
    torch._dynamo.reset()
    model.train(train)
    # Caches would skip the passes (and so their reports) on a hit: a dump always recompiles.
    patches = [
        torch._inductor.config.patch(fx_graph_cache=False),
        mock.patch.object(torch._functorch.config, "enable_autograd_cache", False),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(_record_output_code())
        if not traceback_wanted():
            # an op of the model that fails on its inputs while Dynamo traces it: torch logs the
            # fake-tensor traceback at ERROR; the CLI prints the error in one line instead
            stack.enter_context(_quiet("torch._subclasses.fake_tensor"))
        records = stack.enter_context(report.capture())
        compiled = torch.compile(model, backend="blaze", options=options or {}, dynamic=dynamic, fullgraph=fullgraph)
        if train:
            _loss(compiled(*inputs)).backward()
        else:
            with torch.no_grad():
                compiled(*inputs)
    return records


def format_records(records: list[report.GraphRecord], *, train: bool) -> str:
    lines: list[str] = []
    if not records:
        lines.append("blaze compiled no graph (Dynamo found nothing to compile)")
    for rec in records:
        g = f"graph {rec.index}"
        lines += [f"{RULE} {g}: Dynamo graph {RULE}", rec.dynamo_graph.rstrip(), ""]
        lines.append(f"{RULE} {g}: blaze pass reports {RULE}")
        for rep in rec.pass_reports:
            lines += rep.lines()
        lines += ["", f"{RULE} {g}: graph after blaze passes {RULE}", rec.blaze_graph.rstrip(), ""]
        lines.append(f"{RULE} {g}: forward/backward partition {RULE}")
        if rec.partitions:
            for part in rec.partitions:
                lines += part.lines()
        elif train:
            lines.append("no partition: this graph needs no backward (no input requires grad)")
        else:
            lines.append("no partition: --eval compiles an inference graph, nothing is saved for backward")
        lines.append("")
        for name, graphs in (("partitioned forward graph", rec.fwd_graphs), ("partitioned backward graph", rec.bwd_graphs)):
            for text in graphs:
                lines += [f"{RULE} {g}: {name} {RULE}", text.rstrip(), ""]
        lines.append(f"{RULE} {g}: Inductor output code {RULE}")
        if rec.final_stage == "eager":
            lines.append("final_stage='eager': no Inductor codegen, the FX graphs run as they are")
        elif rec.output_code:
            lines += [f"written to: {p}" for p in rec.output_code]
        else:
            lines.append("no output code was written for this graph")
        lines.append("")
    return "\n".join(lines)


def to_json(records: list[report.GraphRecord], spec: str, train: bool) -> dict[str, Any]:
    return {"model": spec, "mode": "train" if train else "eval", "torch": torch.__version__,
            "graphs": [r.to_json() for r in records]}


def write_dir(out: Path, records: list[report.GraphRecord], text: str, doc: dict[str, Any]) -> list[Path]:
    """Write the dump as files: ``OUT/model__{i}/...`` like ``torch_compile_debug``'s folders."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "dump.json").is_file():  # a previous dump's graph folders: a graph it had and this one lacks stays stale
        for old in out.iterdir():
            if old.is_dir() and re.fullmatch(r"model__\d+", old.name):
                shutil.rmtree(old)
    written = []

    def put(path: Path, content: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if content.endswith("\n") else content + "\n")
        written.append(path)

    put(out / "dump.txt", text)
    put(out / "dump.json", json.dumps(doc, indent=2))
    for rec in records:
        d = out / f"model__{rec.index}"
        put(d / "fx_graph_dynamo.py", rec.dynamo_graph)
        put(d / "blaze_pass_reports.txt", "\n".join(l for r in rec.pass_reports for l in r.lines()))
        put(d / "fx_graph_blaze.py", rec.blaze_graph)
        put(d / "partition.txt", "\n".join(l for p in rec.partitions for l in p.lines()) or "no partition")
        for i, t in enumerate(rec.fwd_graphs):
            put(d / f"model__{rec.index}_forward_{i}" / "fx_graph_readable.py", t)
        for i, t in enumerate(rec.bwd_graphs):
            put(d / f"model__{rec.index}_backward_{i}" / "fx_graph_readable.py", t)
        for i, t in enumerate(rec.post_grad_graphs):
            put(d / f"post_grad_{i}" / "fx_graph_transformed.py", t)
        for i, p in enumerate(rec.output_code):
            dst = d / f"output_code_{i}.py"
            shutil.copyfile(p, dst)
            written.append(dst)
    return written


def run(spec: str, *, train: bool = True, passes: list[str] | None = None, out: str | None = None,
        as_json: bool = False, final_stage: str = "inductor", dynamic: bool | None = None,
        fullgraph: bool = False, memory_budget: Any = None, expert_parallel: int = 1,
        ep_chunks: int | None = None) -> tuple[str, list[Path]]:
    """Everything ``blazec dump`` does; returns what it prints and the files it wrote.

    ``expert_parallel=N > 1`` runs N gloo ranks on this machine (every rank runs the factory's
    inputs) and dumps rank 0, so the expert-parallel rewrite and its communication schedule show.
    """
    options: dict[str, Any] = {"final_stage": final_stage}
    if memory_budget is not None:
        options["memory_budget"] = memory_budget
    if passes is not None:
        options["passes"] = passes
    if ep_chunks is not None:
        options["ep_chunks"] = ep_chunks
    check = dict(options)
    if isinstance(expert_parallel, int) and expert_parallel > 1:  # the ranks add expert_parallel="world"
        from blazec.expert_parallel import EPGroup

        check["expert_parallel"] = EPGroup("world", 0, expert_parallel, "gloo")  # stands in for it here
    BlazeConfig.from_options(check)  # a bad --pass or --ep-chunks fails here, before the model is loaded
    if memory_budget is not None and not train:
        raise ValueError("--memory-budget budgets the activations saved for backward, and --eval compiles an "
                         "inference graph with no backward: nothing to budget; drop --memory-budget or --eval")
    if out is not None and not str(out).strip():
        raise ValueError("--out needs a directory, got an empty path")
    if not isinstance(expert_parallel, int) or not 1 <= expert_parallel <= 64:
        raise ValueError(f"--expert-parallel must be a number of ranks in [1, 64], got {expert_parallel!r}")
    created = _prepare_out(out) if out else None  # before the compile, not after
    try:
        model, inputs = load_factory(spec)
        where = str(parse_spec(spec)[0])
        check_eager(model, inputs, train=train, where=where)
        if sys.stderr.isatty():  # the compile takes seconds to minutes; a pipe or a test gets only the result
            step = "one training step" if train else "one inference call"
            on = f" on {expert_parallel} gloo ranks" if expert_parallel > 1 else ""
            print(f"blazec dump: compiling {spec} with blaze and running {step}{on}...", file=sys.stderr, flush=True)
        try:
            if expert_parallel > 1:
                records = _capture_rank0(spec, expert_parallel, dict(train=train, options=options, dynamic=dynamic,
                                                                        fullgraph=fullgraph))
            else:
                records = compile_and_capture(model, inputs, train=train, options=options, dynamic=dynamic,
                                              fullgraph=fullgraph)
        except Exception as e:
            model_error = _compile_error(e, where, fullgraph)
            if model_error is None:
                raise
            raise model_error from e
        text = format_records(records, train=train)
        if expert_parallel > 1:
            text = (f"expert parallel: rank 0 of {expert_parallel} gloo ranks on this machine; every rank ran the "
                    f"factory's inputs\n\n") + text
        doc = to_json(records, spec, train)
        files = write_dir(Path(out), records, text, doc) if out else []
    except BaseException:
        if created is not None:
            _remove_empty(Path(out), created)
        raise
    return (json.dumps(doc, indent=2) if as_json else text), files


def _prepare_out(out: str) -> Path | None:
    """Create --out's directory and check that a file can be written in it, before the compile
    (seconds to minutes) rather than after; returns the outermost directory this created (None:
    it existed), which :func:`_remove_empty` removes again if the dump fails."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        if missing:
            _remove_empty(path, missing[-1])
        raise ValueError(f"--out {out}: cannot create a directory there or write to it "
                         f"({e.strerror or type(e).__name__})") from None
    return missing[-1] if missing else None


def _remove_empty(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents up to ``top`` that are (still) empty directories."""
    for p in (path, *path.parents):
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def _rank_main(rank: int, world: int, spec: str, kwargs: dict[str, Any], result: str) -> None:
    import pickle

    model, inputs = load_factory(spec)
    kwargs = dict(kwargs, options=dict(kwargs["options"], expert_parallel="world"))
    records = compile_and_capture(model, inputs, **kwargs)
    if rank == 0:
        with open(result, "wb") as f:
            pickle.dump(records, f)


def _capture_rank0(spec: str, world: int, kwargs: dict[str, Any]) -> list[report.GraphRecord]:
    """Run :func:`compile_and_capture` expert-parallel on ``world`` local gloo ranks; rank 0's records."""
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    from blazec.local_ranks import spawn_gloo

    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "records.pkl")
        try:
            spawn_gloo(_rank_main, world, spec, kwargs, result, threads=max(1, torch.get_num_threads() // world))
        except mp.ProcessRaisedException as e:
            # the model's own failure is the user's error; anything else is blazec's or torch's
            kind = ValueError if traced_op_error(str(e)) is not None else RuntimeError
            raise kind(f"an expert-parallel rank failed: {_last_error_line(str(e))}") from None
        with open(result, "rb") as f:
            return pickle.load(f)


def traced_op_error(message: str) -> str | None:
    """From Dynamo's "failed to run FX node with fake tensors ... got RuntimeError('...')", the
    op's error as "RuntimeError: ..."; None when the message has none."""
    m = re.search(r"got (\w+)\((['\"])(.*?)\2\)", message, re.S)
    return f"{m.group(1)}: {m.group(3)}" if m else None


def _last_error_line(remote_traceback: str) -> str:
    """The exception line of a rank's traceback ("Type: message"), not Dynamo's trailing hints;
    for an op of the model that failed while Dynamo traced it, that op's error."""
    op_error = traced_op_error(remote_traceback)
    if op_error is not None:
        return f"the model failed on its example inputs while Dynamo traced it: {op_error}"
    lines = [l.strip() for l in remote_traceback.strip().splitlines() if l.strip()]
    errors = [i for i, l in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception|Failed|Interrupt|Exit)\b.*:", l)]
    if not errors:
        return lines[-1] if lines else "no message"
    i = errors[-1]
    if lines[i].endswith(":") and i + 1 < len(lines):  # "BackendCompilerFailed: ... raised:" and its cause
        return f"{lines[i]} {lines[i + 1]}"
    return lines[i]
