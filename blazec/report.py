"""Reports: what each blaze pass matched, what it left alone and why, and what was saved for backward.

A pass returns a :class:`PassReport`. The backend gathers the reports of one compiled graph
into a :class:`GraphRecord` (Dynamo graph, pass reports, rewritten graph, partition, output
code path). Records go to the ``blazec`` logger (``TORCH_LOGS="+blazec"``) and to any active
:func:`capture` block, which is how ``blazec dump`` and ``blazec demo`` read them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

log = logging.getLogger("blazec")


@dataclass
class Match:
    """One rewritten site."""

    form: str  # e.g. "static_loop_modulelist"
    where: str  # module path or node name of the site
    details: dict[str, Any] = field(default_factory=dict)  # E, k, d, I, activation, ...

    def line(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.details.items())
        return f"MATCH {self.form} at {self.where}" + (f" ({extra})" if extra else "")


@dataclass
class NearMiss:
    """A site that looked like a pattern but was left unchanged, with the reason."""

    form: str
    where: str
    reason: str

    def line(self) -> str:
        return f"NEAR MISS {self.form} at {self.where}: {self.reason}"


@dataclass
class PassReport:
    name: str
    matches: list[Match] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # set when the pass was disabled, with why
    graph: str = ""  # for a pass run on each partitioned graph: "forward", "backward" or "inference"

    @property
    def changed(self) -> bool:
        return bool(self.matches)

    def lines(self) -> list[str]:
        label = f"{self.name}: {self.graph} graph" if self.graph else self.name
        if self.skipped:
            return [f"[{label}] skipped: {self.skipped}"]
        head = f"[{label}] {len(self.matches)} rewrite(s), {len(self.near_misses)} near miss(es)"
        body = [m.line() for m in self.matches] + [n.line() for n in self.near_misses]
        return [head] + ["  " + b for b in body] + [f"  note: {n}" for n in self.notes]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SavedTensor:
    """One tensor the forward graph saves for backward."""

    name: str
    shape: list[str]  # each dim as a string, symbolic dims as their sympy expression
    dtype: str
    bytes: int  # evaluated at the size hints
    bytes_expr: str  # the sympy expression, e.g. "4*s0*2048"
    is_input: bool  # a graph input (parameter or user input) kept alive, not a new buffer
    estimated: bool = False  # a dim is data-dependent (unbacked): bytes use a fallback hint
    view_of: str = ""  # a view of this input, constant or saved tensor: no storage of its own
    keeps: str = ""  # a view whose base is not saved: ``bytes`` are the base's, which it keeps alive


@dataclass
class PartitionReport:
    partitioner: str
    saved: list[SavedTensor] = field(default_factory=list)
    saved_symints: int = 0
    num_fwd_nodes: int = 0
    num_bwd_nodes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.saved)

    @property
    def activation_bytes(self) -> int:
        """Saved bytes that are new buffers (excluding inputs and parameters kept alive, and
        views of them or of another saved tensor)."""
        return sum(s.bytes for s in self.saved if not s.is_input and not s.view_of)

    def lines(self) -> list[str]:
        out = [
            f"partitioner: {self.partitioner}; forward {self.num_fwd_nodes} nodes, "
            f"backward {self.num_bwd_nodes} nodes"
        ]
        w = max([len(s.name) for s in self.saved] + [4])
        for s in self.saved:
            kind = "input" if s.is_input else f"view of {s.view_of}" if s.view_of else \
                f"view keeping all of {s.keeps}" if s.keeps else "activation"
            est = ", data-dependent size: bytes at a fallback hint" if s.estimated else ""
            out.append(
                f"  {s.name:<{w}}  {s.dtype:<9} [{', '.join(s.shape)}]  {s.bytes:>12,d} B"
                f"  ({s.bytes_expr}{est})  {kind}"
            )
        out.append(
            f"  total saved: {len(self.saved)} tensor(s), {self.total_bytes:,d} B "
            f"({self.activation_bytes:,d} B of activations, "
            f"{self.total_bytes - self.activation_bytes:,d} B of inputs/parameters and views)"
            + (f", plus {self.saved_symints} symbolic size(s)" if self.saved_symints else "")
        )
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["activation_bytes"] = self.activation_bytes
        return d


@dataclass
class GraphRecord:
    """Everything blaze did to one Dynamo graph."""

    index: int
    dynamo_graph: str = ""
    pass_reports: list[PassReport] = field(default_factory=list)
    blaze_graph: str = ""
    partitions: list[PartitionReport] = field(default_factory=list)
    post_grad_graphs: list[str] = field(default_factory=list)
    fwd_graphs: list[str] = field(default_factory=list)  # partitioned forward graphs
    bwd_graphs: list[str] = field(default_factory=list)  # partitioned backward graphs
    output_code: list[str] = field(default_factory=list)  # paths Inductor wrote
    final_stage: str = "inductor"

    @property
    def num_rewrites(self) -> int:
        return sum(len(r.matches) for r in self.pass_reports)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "final_stage": self.final_stage,
            "dynamo_graph": self.dynamo_graph,
            "passes": [r.to_json() for r in self.pass_reports],
            "blaze_graph": self.blaze_graph,
            "partitions": [p.to_json() for p in self.partitions],
            "forward_graphs": self.fwd_graphs,
            "backward_graphs": self.bwd_graphs,
            "post_grad_graphs": self.post_grad_graphs,
            "output_code": self.output_code,
        }


# ---------------------------------------------------------------------------------------
# Capture: the backend appends records here; dump/demo/tests read them.

_local = threading.local()
_counter = iter(range(1 << 62))


def _stack() -> list[list[GraphRecord]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def capture() -> Iterator[list[GraphRecord]]:
    """Collect a :class:`GraphRecord` for every graph blaze compiles inside the block."""
    records: list[GraphRecord] = []
    _stack().append(records)
    try:
        yield records
    finally:
        _stack().pop()


def new_record(final_stage: str) -> GraphRecord:
    """A record for the next graph; numbered from 0 within the innermost capture block."""
    stack = _stack()
    index = len(stack[-1]) if stack else next(_counter)
    rec = GraphRecord(index=index, final_stage=final_stage)
    for records in _stack():
        records.append(rec)
    return rec


# The record of the graph being compiled right now, so hooks called deep inside Inductor
# (partitioner, post-grad pass) can attach to it. Compilation of one Dynamo graph is
# synchronous on one thread, so a thread-local "current" is exact.
def set_current(rec: GraphRecord | None) -> None:
    _local.current = rec


def current() -> GraphRecord | None:
    return getattr(_local, "current", None)


def log_pass_report(report: PassReport) -> None:
    """Summary at INFO (``TORCH_LOGS="blazec"``), every match and near miss at DEBUG (``"+blazec"``)."""
    lines = report.lines()
    log.info("%s", lines[0])
    for line in lines[1:]:
        log.debug("%s", line)
