"""BlazeConfig: the typed form of ``torch.compile(..., options={...})`` for the blaze backend.

Every option lives in one dataclass field with a validator, so an unknown key or a bad
value fails at compile time with a message that names the key and lists the valid ones.
Later features add a field here and nothing else in the plumbing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

FINAL_STAGES = ("inductor", "eager")
MOE_RECOMPUTE = ("save_preact", "recompute_gemm1")
TORCH_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)


class BlazeOptionError(ValueError):
    """A malformed ``options=`` dict or ``mode=`` for the blaze backend."""


@dataclass(frozen=True)
class BlazeConfig:
    """Options of the blaze backend. Pass them as ``torch.compile(m, backend="blaze", options={...})``.

    Attributes:
        passes: names of the blaze passes to run, in registry order. ``None`` runs every
            registered pass. See ``blazec.passes.registry.PASSES`` for the names.
        disable_passes: names of passes to skip (applied after ``passes``).
        final_stage: ``"inductor"`` (default) compiles with Inductor codegen;
            ``"eager"`` runs blaze's passes and partitioner, then executes the FX graphs
            eagerly, like ``aot_eager``. Use it for fast tests and to debug a pass apart
            from codegen.
        moe_recompute: what the backward of a rewritten MoE layer keeps.
            ``"save_preact"`` (default) saves the first expert GEMM's output and recomputes
            only the activation; ``"recompute_gemm1"`` recomputes that GEMM from ``x`` too.
        inductor_config: extra Inductor config patches, merged over blaze's own
            (for example ``{"max_autotune": True}``).
        mode: ``torch.compile``'s ``mode=``, forwarded to Inductor.
    """

    passes: tuple[str, ...] | None = None
    disable_passes: tuple[str, ...] = ()
    final_stage: str = "inductor"
    moe_recompute: str = "save_preact"
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "default"

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "mode"]

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | None = None, mode: str | None = None
    ) -> "BlazeConfig":
        """Parse and validate ``options=`` and ``mode=`` as given to ``torch.compile``."""
        if options is None:
            options = {}
        if isinstance(options, BlazeConfig):
            return options if mode is None else dataclasses.replace(options, mode=_mode(mode))
        if not isinstance(options, Mapping):
            raise BlazeOptionError(
                f"blaze options must be a dict, got {type(options).__name__}; "
                f"valid keys: {', '.join(cls.valid_keys())}"
            )
        unknown = sorted(set(options) - set(cls.valid_keys()))
        if unknown:
            raise BlazeOptionError(
                f"unknown blaze option(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(cls.valid_keys())}"
            )
        kw: dict[str, Any] = {}
        for key, value in options.items():
            kw[key] = _VALIDATORS[key](key, value)
        kw["mode"] = _mode(mode)
        cfg = cls(**kw)
        cfg.check_pass_names()
        return cfg

    def check_pass_names(self) -> None:
        from blazec.passes.registry import pass_names

        known = pass_names()
        for key in ("passes", "disable_passes"):
            names = getattr(self, key) or ()
            bad = [n for n in names if n not in known]
            if bad:
                raise BlazeOptionError(
                    f"option {key!r}: unknown pass name(s) {', '.join(map(repr, bad))}; "
                    f"known passes: {', '.join(known) or '(none)'}"
                )

    def pass_enabled(self, name: str) -> bool:
        if self.passes is not None and name not in self.passes:
            return False
        return name not in self.disable_passes

    def fingerprint(self) -> str:
        """A stable string of the options that change compiled code (for pass uuids)."""
        d = dataclasses.asdict(self)
        d["inductor_config"] = sorted((k, repr(v)) for k, v in self.inductor_config.items())
        return repr(sorted(d.items()))


def _mode(mode: Any) -> str:
    if mode is None:
        return "default"
    if mode not in TORCH_MODES:
        raise BlazeOptionError(
            f"unknown mode {mode!r} for the blaze backend; valid modes: {', '.join(TORCH_MODES)}"
        )
    return mode


def _names(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None and key == "passes":
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise BlazeOptionError(f"option {key!r} must be a list of pass names, got {value!r}")
    return tuple(value)


def _choice(choices: tuple[str, ...]):
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise BlazeOptionError(
                f"option {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value

    return check


def _inductor_config(key: str, value: Any) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    if not isinstance(value, Mapping):
        raise BlazeOptionError(f"option {key!r} must be a dict of Inductor config patches")
    bad = [k for k in value if not isinstance(k, str) or not hasattr(inductor_config, k.split(".")[0])]
    if bad:
        raise BlazeOptionError(f"option {key!r}: unknown Inductor config key(s) {bad!r}")
    return dict(value)


_VALIDATORS = {
    "passes": _names,
    "disable_passes": _names,
    "final_stage": _choice(FINAL_STAGES),
    "moe_recompute": _choice(MOE_RECOMPUTE),
    "inductor_config": _inductor_config,
}
