"""The ``blazec`` command line: ``blazec dump | demo | bench | balance-sim``.

Every user error (a missing file, a bad factory, a malformed option, a model that fails on its
own example inputs) prints one line, ``blazec <cmd>: error: ...``, and exits with status 2.
Anything else is blazec's own failure, ``blazec <cmd>: internal error (Type): ...``, also
status 2. ``blazec bench`` exits with status 1 when a row failed (the table is printed). Set
``BLAZEC_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _dump_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path/to/file.py:factory, where factory() returns (model, example_inputs); "
                                 "':factory' defaults to ':make'")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True,
                      help="compile for training: forward + backward, with the partition (default)")
    mode.add_argument("--eval", dest="train", action="store_false", help="compile for inference under no_grad")
    p.add_argument("--pass", dest="passes", action="append", metavar="NAME",
                   help="run only this blaze pass (repeatable); default: all passes")
    p.add_argument("--out", metavar="DIR", help="also write the dump as files under DIR")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--final-stage", choices=["inductor", "eager"], default="inductor",
                   help="'eager' runs the FX graphs without Inductor codegen (faster)")
    p.add_argument("--dynamic", action="store_true", default=None, help="compile with dynamic=True")
    p.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                   help="run N gloo ranks on this machine with options expert_parallel='world' and dump rank 0 "
                        "(shows the all_to_all dispatch and the communication schedule); N in [1, 64], default 1")
    p.add_argument("--ep-chunks", type=int, default=None, metavar="N",
                   help="token chunks per expert-parallel MoE layer (the ep_chunks option; default 2)")
    p.add_argument("--memory-budget", metavar="BUDGET",
                   help="activation memory budget for the checkpoint solver: a fraction (0.6, '60%%') of what the "
                        "default partition saves, or bytes ('2GiB', 123456)")


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what is written to stdout to stderr: Python's ``sys.stdout`` and file descriptor 1,
    which the expert-parallel ranks (child processes) and C code write to."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (a closed stdout): Python's redirect is all there is
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _cmd_dump(args: argparse.Namespace) -> int:
    from blazec import dump

    budget = args.memory_budget
    for number in (int, float):  # "123456" is bytes, "0.6" a fraction; "2GiB" and "60%" stay strings
        try:
            budget = number(budget)
            break
        except (TypeError, ValueError):
            continue
    # Under --json stdout carries one JSON document: what the model prints goes to stderr.
    quiet = _stdout_to_stderr() if args.json else contextlib.nullcontext()
    with quiet:
        text, files = dump.run(args.model, train=args.train, passes=args.passes, out=args.out, as_json=args.json,
                               final_stage=args.final_stage, dynamic=args.dynamic, fullgraph=args.fullgraph,
                               memory_budget=budget, expert_parallel=args.expert_parallel, ep_chunks=args.ep_chunks)
    print(text)
    if files:
        print(f"blazec dump: wrote {len(files)} file(s) under {args.out}", file=sys.stderr)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=1024, help="tokens per batch (default 1024)")
    p.add_argument("--d", type=int, default=128, help="hidden size (default 128)")
    p.add_argument("--inter", type=int, default=256, help="expert intermediate size (default 256)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--final-stage", choices=["inductor", "eager"], default="inductor",
                   help="'eager' runs the blaze graphs without Inductor codegen (default: inductor)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from blazec import demo

    demo.run(args.tokens, args.d, args.inter, args.experts, args.top_k, args.steps, args.final_stage)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blazec", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("dump", help="compile a model with blaze and print every graph, report and partition")
    _dump_args(d)
    d.set_defaults(func=_cmd_dump)
    m = sub.add_parser("demo", help="run the embedded naive MoE model eager and under blaze, side by side")
    _demo_args(m)
    m.set_defaults(func=_cmd_demo)
    from blazec import bench
    from blazec.runtime import balance_sim

    b = sub.add_parser("bench", help="one MoE layer forward+backward: baselines vs blazec (docs/BASELINES.md protocol)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    s = sub.add_parser("balance-sim", help="simulate sample load balancing across ranks (bubble fractions)")
    balance_sim.add_arguments(s)
    s.set_defaults(func=balance_sim.run)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    from blazec.config import BlazeOptionError
    from blazec.dump import ModelError
    from blazec.factory import FactoryError

    return (FactoryError, BlazeOptionError, ModelError, ValueError, FileNotFoundError)


def _backend_user_error_types() -> tuple[type[BaseException], ...]:
    from blazec.config import BlazeOptionError
    from blazec.expert_parallel import ExpertParallelError

    return (BlazeOptionError, ExpertParallelError)


def _traced_model_error(err: BaseException) -> str | None:
    """For an op of the user's model that failed while Dynamo traced it on the example inputs
    (a shape mismatch, a wrong dtype), the op's own error; None for anything else."""
    from torch._dynamo.exc import TorchRuntimeError

    from blazec.dump import traced_op_error

    if not isinstance(err, TorchRuntimeError):
        return None
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        op_error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    else:  # torch 2.13 keeps the op's error in the message: "... got RuntimeError('...')"
        op_error = traced_op_error(str(err))
    if op_error is None:
        return None
    return f"the model failed on its example inputs while Dynamo traced it: {op_error}"


def traceback_wanted() -> bool:
    """``BLAZEC_TRACEBACK``: ``1`` shows the full traceback, ``0`` or unset the one-line error."""
    value = os.environ.get("BLAZEC_TRACEBACK", "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"BLAZEC_TRACEBACK must be 0 or 1 (default 0), got {value!r}")
    return value == "1"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        want_traceback = traceback_wanted()
    except ValueError as e:
        print(f"blazec {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"blazec {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line
        if want_traceback:
            raise
        inner = getattr(e, "inner_exception", None)  # Dynamo wraps backend errors
        err = inner if inner is not None else e
        # Inside the backend only blazec's own user-facing errors are the user's: a plain
        # ValueError raised there (an op's argument check on a rewritten graph, say) is a bug.
        user = _backend_user_error_types() if inner is not None else _user_error_types()
        kind = "error" if isinstance(err, user) else f"internal error ({type(err).__name__})"
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        traced = _traced_model_error(err)
        if traced is not None:
            kind, msg = "error", traced
        hint = "" if kind == "error" else " (set BLAZEC_TRACEBACK=1 for the traceback)"
        if type(err).__name__ == "GuardOnDataDependentSymNode":  # torch's tracer, not a blazec bug
            hint = ""
            kind, msg = "error", (
                f"torch could not trace a data-dependent size of this model ({msg}); a known torch limitation "
                "under the capture settings blazec turns on (README, BLAZEC_CAPTURE_DYNAMIC): "
                "BLAZEC_CAPTURE_DYNAMIC=0 compiles the model, without the MoE rewrite")
        print(f"blazec {args.command}: {kind}: {msg}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
