"""The pass registry: the one place where a blaze pass is declared.

A pass is a plain function ``fn(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport``.
``stage`` says where the backend runs it:

- ``"pre_grad"``: on the Dynamo graph, before AOTAutograd (torch-level ops; the MoE rewrite).
- ``"post_grad"``: on each partitioned forward/backward graph, inside Inductor's
  ``post_grad_custom_post_pass`` hook (aten-level ops; communication scheduling).

Passes run in registration order within a stage. To add one, write ``passes/<name>.py`` with
the function and append a :class:`PassSpec` to :data:`PASSES` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from blazec.report import PassReport

STAGES = ("pre_grad", "post_grad")


@dataclass
class PassContext:
    """What a pass may read besides the graph."""

    config: Any  # blazec.config.BlazeConfig
    example_inputs: list[Any] = field(default_factory=list)
    stage: str = "pre_grad"


@dataclass(frozen=True)
class PassSpec:
    name: str
    stage: str
    module: str  # import path of the module defining the pass, relative to blazec.passes
    function: str
    doc: str

    def load(self) -> Callable[[torch.fx.GraphModule, PassContext], PassReport]:
        mod = importlib.import_module(f"blazec.passes.{self.module}")
        return getattr(mod, self.function)

    def source_file(self) -> str:
        return importlib.import_module(f"blazec.passes.{self.module}").__file__


PASSES: list[PassSpec] = [
    PassSpec(
        "moe_dispatch",
        "pre_grad",
        "moe_dispatch",
        "moe_dispatch_pass",
        "find naive MoE expert dispatch (loops, one-hot capacity, sort+gather, per-pair "
        "weight gather, dense gates) and rewrite it into blaze ops",
    ),
    PassSpec(
        "moe_gating",
        "pre_grad",
        "moe_gating",
        "moe_gating_pass",
        "name the router variant feeding each rewritten MoE layer (reports only; gating stays in torch ops)",
    ),
    PassSpec(
        "comm_overlap",
        "post_grad",
        "comm_overlap",
        "comm_overlap_pass",
        "issue each functional collective right after its inputs (ties: the one needed first) and "
        "wait on it right before its first use",
    ),
]


def pass_names() -> list[str]:
    return [p.name for p in PASSES]


def passes_for(stage: str) -> list[PassSpec]:
    assert stage in STAGES, stage
    return [p for p in PASSES if p.stage == stage]
