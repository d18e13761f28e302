"""The ``blaze`` torch.compile backend.

Data flow for one Dynamo graph::

    Dynamo FX graph --pre-grad passes (registry)--> rewritten graph
      --final_stage="inductor"--> compile_fx(config_patches={custom_partitioner_fn,
                                                             post_grad_custom_post_pass, ...})
      --final_stage="eager"----> aot_autograd(partition_fn=same partitioner,
                                              fw/bw compilers that run post-grad passes
                                              and then execute the FX graphs as they are)

The entry point ``[project.entry-points.torch_dynamo_backends] blaze`` points at
:func:`blaze`, so ``torch.compile(model, backend="blaze")`` works after ``pip install`` with
no import. Importing this module turns on Dynamo's capture of data-dependent output shapes
(``torch.where(mask)``, ``nonzero``, ``.item()``) so that naive expert loops are captured in
one graph even without ``fullgraph=True``; set ``BLAZEC_CAPTURE_DYNAMIC=0`` to opt out.
Because the module is imported inside ``torch.compile()`` (before tracing) this takes effect
for the first compile.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn

from blazec import report as _report
from blazec.config import BlazeConfig
from blazec.passes._fx import backed_values, copy_graph_module, fill_example_values, graph_node_names
from blazec.passes.registry import PassContext, passes_for
from blazec.partition import partition_joint

log = logging.getLogger("blazec")


def capture_dynamic(value: str) -> bool:
    """Whether BLAZEC_CAPTURE_DYNAMIC's ``value`` turns Dynamo's capture of data-dependent
    shapes and scalars on ("1", the default) or leaves it alone ("0"); anything else is an error."""
    value = value.strip()
    if value not in ("0", "1"):
        raise ValueError(f"BLAZEC_CAPTURE_DYNAMIC must be 0 or 1 (default 1), got {value!r}")
    return value == "1"


if capture_dynamic(os.environ.get("BLAZEC_CAPTURE_DYNAMIC", "1")):
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """Hash of every source file that can change what blaze emits (for Inductor's caches), and
    of the versions of torch and of scipy (whose HiGHS solves the checkpoint plans)."""
    root = Path(__file__).resolve().parent
    import blazec.kernels
    import blazec.passes

    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:
        scipy_version = "none"
    dirs = [root, Path(blazec.passes.__file__).parent, Path(blazec.kernels.__file__).parent]
    h = hashlib.sha256(f"{torch.__version__}|scipy {scipy_version}".encode())
    for d in dirs:
        for f in sorted(d.rglob("*.py")):
            h.update(str(f.relative_to(d)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _uuid(kind: str, config: BlazeConfig) -> str:
    return hashlib.sha256(f"{kind}|{_source_hash()}|{config.fingerprint()}".encode()).hexdigest()


def _readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=True)


def _want_text() -> bool:
    """Graph text is only rendered when someone reads it (a capture block or debug logging)."""
    return bool(_report._stack()) or log.isEnabledFor(logging.DEBUG)


# ---------------------------------------------------------------------------------------
# Pre-grad passes


def run_pre_grad_passes(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BlazeConfig
) -> tuple[torch.fx.GraphModule, list[_report.PassReport]]:
    """Run every enabled pre-grad pass in registry order.

    Each pass works on a copy of the graph (sharing parameters with ``gm``). A pass that
    raises leaves the graph as it was: the failure becomes a near miss with the error, and
    compilation goes on with the unmodified graph, because a missed rewrite is acceptable
    and a broken compile is not.
    """
    reports = []
    for spec in passes_for("pre_grad"):
        if not config.pass_enabled(spec.name):
            reports.append(_report.PassReport(spec.name, skipped="disabled by options"))
            continue
        work = copy_graph_module(gm)
        names = graph_node_names(work)
        ctx = PassContext(config=config, example_inputs=list(example_inputs), stage="pre_grad")
        try:
            rep = spec.load()(work, ctx)
        except Exception as e:  # noqa: BLE001 - any pass bug must not break the user's compile
            log.warning("blaze pass %s failed and was skipped: %s: %s", spec.name, type(e).__name__, e)
            rep = _report.PassReport(spec.name)
            rep.near_misses.append(
                _report.NearMiss("*", "graph", f"pass raised {type(e).__name__}: {e}; graph left unchanged")
            )
        else:
            if rep.changed:
                work.graph.lint()
                fill_example_values(work, names)  # read by later passes, and by AOTAutograd's cache check
                work.recompile()
                gm = work
        _report.log_pass_report(rep)
        reports.append(rep)
    return gm, reports


# ---------------------------------------------------------------------------------------
# Inductor hooks. One object per hook per compile; each holds the record it reports to, so
# that the lazily compiled backward still reports to the right graph.


class BlazePartitioner(CustomPartitionerFn):
    """``custom_partitioner_fn``: splits the joint graph and records what is saved for backward."""

    def __init__(self, config: BlazeConfig, record: _report.GraphRecord | None):
        self.config = config
        self.record = record

    def __call__(self, gm, joint_inputs, **kwargs):
        fw, bw, rep = partition_joint(gm, joint_inputs, self.config, **kwargs)
        if self.record is not None:
            self.record.partitions.append(rep)
            if _want_text():
                self.record.fwd_graphs.append(_readable(fw))
                self.record.bwd_graphs.append(_readable(bw))
        for line in rep.lines():
            log.debug("%s", line)
        return fw, bw

    # Torch's AOTAutograd cache key pickles Inductor's config, this object in it (the post-grad
    # pass is keyed by its uuid() instead). Pickled, the object is its uuid: with the record
    # (whose index counts the process's compiles) a warm compile hit only the entry of the
    # compile with the same number. Copies share the object, record included.
    def __getstate__(self) -> dict[str, str]:
        return {"uuid": self.uuid()}

    def __setstate__(self, state: dict[str, str]) -> None:  # a stand-in that keeps the key; never called
        self.config, self.record, self.unpickled_uuid = None, None, state["uuid"]

    def __copy__(self) -> "BlazePartitioner":
        return self

    def __deepcopy__(self, memo: dict) -> "BlazePartitioner":
        return self

    def uuid(self) -> str:
        if self.config is None:  # unpickled
            return self.unpickled_uuid
        # A budgeted plan is solved at the compile's size hints, which Inductor's and
        # AOTAutograd's cache keys leave out (they hash the symbols, not their values): a plan
        # cached at batch 8 was handed to a compile at batch 512 and saved 58x the budget.
        hints = _size_hints() if self.config.memory_budget is not None else ""
        return _uuid("partitioner", self.config) + hints


def _size_hints() -> str:
    """The current compile's backed symbolic sizes and their values, as text ("" without any)."""
    ctx = torch._guards.TracingContext.try_get()
    env = getattr(getattr(ctx, "fake_mode", None), "shape_env", None)
    if env is None:
        return ""
    return "|" + ",".join(f"{k}={v}" for k, v in sorted((str(k), str(v)) for k, v in backed_values(env).items()))


def partitioned_graph_kind(graph: torch.fx.Graph) -> str:
    """Which of AOTAutograd's graphs this is, from its inputs' names: a backward graph takes
    ``tangents_*``, a training forward ``primals_*``, an inference graph neither."""
    names = [n.name for n in graph.find_nodes(op="placeholder")]
    if any(n.startswith("tangents") for n in names):
        return "backward"
    return "forward" if any(n.startswith("primals") for n in names) else "inference"


class BlazePostGradPass(CustomGraphPass):
    """``post_grad_custom_post_pass``: runs the registry's post-grad passes on each graph."""

    def __init__(self, config: BlazeConfig, record: _report.GraphRecord | None):
        self.config = config
        self.record = record

    def __call__(self, graph: torch.fx.Graph) -> None:
        # Inductor compiles this graph next; output code written now belongs to our record.
        _report.set_current(self.record)
        gm = graph.owning_module
        for spec in passes_for("post_grad"):
            if not self.config.pass_enabled(spec.name):
                continue
            ctx = PassContext(config=self.config, stage="post_grad")
            rep = spec.load()(gm, ctx)
            rep.graph = partitioned_graph_kind(graph)
            _report.log_pass_report(rep)
            if self.record is not None:
                self.record.pass_reports.append(rep)
        if self.record is not None and _want_text() and gm is not None:
            self.record.post_grad_graphs.append(_readable(gm))

    def uuid(self) -> str:
        return _uuid("post_grad", self.config)


def inductor_config_patches(config: BlazeConfig, record: _report.GraphRecord | None) -> dict[str, Any]:
    from torch._inductor import list_mode_options

    patches: dict[str, Any] = dict(list_mode_options(config.mode))
    patches.update(config.inductor_config)
    patches["custom_partitioner_fn"] = BlazePartitioner(config, record)
    patches["post_grad_custom_post_pass"] = BlazePostGradPass(config, record)
    return patches


# ---------------------------------------------------------------------------------------
# The backend


def pre_grad_stage(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BlazeConfig
) -> tuple[torch.fx.GraphModule, _report.GraphRecord, dict[str, Any]]:
    """The backend's first stage: a new record, the pre-grad passes, and the Inductor patches
    the SM-free collectives need. Returns the graph to compile, its record and those patches."""
    record = _report.new_record(config.final_stage)
    if _want_text():
        record.dynamo_graph = _readable(gm)
    log.debug("blaze: compiling graph %d (%d nodes)", record.index, len(gm.graph.nodes))

    gm, reports = run_pre_grad_passes(gm, example_inputs, config)
    record.pass_reports.extend(reports)
    sm_free_patches: dict[str, Any] = {}
    if config.sm_free_comm:
        from blazec.expert_parallel import sm_free_notice

        sm_free_patches, notice = sm_free_notice(config.expert_parallel, config.final_stage)
        record.pass_reports.append(_report.PassReport("sm_free_comm", notes=[notice]))
    if _want_text():
        record.blaze_graph = _readable(gm)
        log.debug("graph after blaze passes:\n%s", record.blaze_graph)
    return gm, record, sm_free_patches


def blaze(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Any = None, mode: str | None = None, **kwargs: Any):
    """torch.compile backend: ``torch.compile(model, backend="blaze", options={...})``.

    See :class:`blazec.config.BlazeConfig` for the options.
    """
    config = BlazeConfig.from_options(options, mode)
    gm, record, sm_free_patches = pre_grad_stage(gm, example_inputs, config)
    return compile_stage(gm, example_inputs, config, record, sm_free_patches)


def compile_stage(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: BlazeConfig,
                  record: _report.GraphRecord, sm_free_patches: dict[str, Any]):
    """The backend's second stage, on what :func:`pre_grad_stage` returned: AOTAutograd with
    blaze's partitioner and post-grad passes, then Inductor (or no codegen: ``final_stage``)."""
    if config.final_stage == "eager":
        return _compile_eager(gm, example_inputs, config, record)

    from torch._inductor.compile_fx import compile_fx

    from torch._dynamo.utils import counters

    _report.set_current(record)
    hits = counters["aot_autograd"]["autograd_cache_hit"], counters["inductor"]["fxgraph_cache_hit"]
    try:
        patches = inductor_config_patches(config, record)
        patches.update(sm_free_patches)
        return compile_fx(gm, example_inputs, config_patches=patches)
    finally:
        _report.set_current(None)
        # a cache hit skips the partitioner and the post-grad passes: their reports are missing,
        # not empty (blazec dump turns the caches off)
        why = None
        if counters["aot_autograd"]["autograd_cache_hit"] > hits[0]:
            why, skipped = "AOTAutograd's cache served this graph's forward and backward", "partitioner and post-grad passes"
        elif counters["inductor"]["fxgraph_cache_hit"] > hits[1]:
            why, skipped = "Inductor's FX graph cache served this graph's forward", "post-grad passes"
        if why is not None:
            why += (", so their reports are missing; what runs is what a cold compile with the same options and "
                    "sizes produced")
            record.pass_reports.append(_report.PassReport(skipped, skipped=why))
            log.info("blaze: graph %d: %s", record.index, why)


def _compile_eager(gm, example_inputs, config: BlazeConfig, record: _report.GraphRecord):
    """Like ``aot_eager``, with blaze's partitioner and post-grad passes, and no codegen."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    post = BlazePostGradPass(config, record)

    def run_graph(fx_gm: torch.fx.GraphModule, _inputs):
        post(fx_gm.graph)
        fx_gm.recompile()
        return make_boxed_func(fx_gm.forward)

    partitioner = BlazePartitioner(config, record)
    backend = aot_autograd(
        fw_compiler=run_graph,
        bw_compiler=run_graph,
        inference_compiler=run_graph,
        partition_fn=partitioner,
        keep_inference_input_mutations=True,
    )
    return backend(gm, example_inputs)
