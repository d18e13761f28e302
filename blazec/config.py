"""BlazeConfig: the typed form of ``torch.compile(..., options={...})`` for the blaze backend.

Every option lives in one dataclass field with a validator, so an unknown key or a bad
value fails at compile time with a message that names the key and lists the valid ones.
Later features add a field here and nothing else in the plumbing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from blazec._args import as_flag, as_int

FINAL_STAGES = ("inductor", "eager")
CHECKPOINT_SOLVERS = ("auto", "ilp", "heuristic")
COMM_ORDERS = ("priority", "program")
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
            (for example ``{"max_autotune": True}``, ``{"triton.cudagraphs": False}``). Each key
            must name an Inductor setting, and its value fit the type of the setting's current
            value (an int is no bool; a float setting takes an int; a setting that is None takes
            anything). An error with ``final_stage="eager"``, which runs no Inductor.
        memory_budget: how much activation memory the forward may keep for backward; the
            checkpoint solver (``blazec.passes.checkpoint``) then picks the cheapest set of
            tensors to save and recomputes the rest. ``None`` (default) keeps PyTorch's
            min-cut partition as it is. A float in ``[0.0, 1.0]`` (or a string ``"60%"``) is a
            fraction of the activation bytes the default partition saves; an int (``2**31``)
            or a string with a unit (``"2GiB"``, ``"512MB"``, ``"1e9B"``) is absolute bytes.
            Activation bytes exclude parameters and inputs (and views of them), which are
            alive anyway. Each rewritten MoE layer's ``moe_recompute`` choice becomes a
            decision of the solver. See docs/CHECKPOINT.md.
        checkpoint_solver: ``"auto"`` (default) solves exactly (an ILP with HiGHS) when the
            graph is small enough and falls back to the Lagrangian min-cut heuristic;
            ``"ilp"`` always tries the exact solver first; ``"heuristic"`` skips it.
        checkpoint_time_limit: seconds the exact solver may take before it stops and the
            best plan found so far (with its optimality gap) is used. Default 5.
        expert_parallel: ``None`` (default), ``"world"`` or a ``torch.distributed``
            ``ProcessGroup``. With a group of W ranks, every rewritten MoE layer runs only this
            rank's E/W experts: token rows go to the owning ranks with all_to_all and come
            back the same way (see ``blazec.expert_parallel``). torch.distributed must be
            initialized before the first compiled call; E must be divisible by W (a layer
            where it is not stays single-process and is reported as a near miss).
        ep_chunks: token chunks each expert-parallel MoE layer is split into and pipelined
            over, so chunk i+1's dispatch and chunk i-1's combine overlap chunk i's experts.
            An int in [1, 64]; default 2. Setting it without ``expert_parallel`` is an error.
        comm_order: how ``comm_overlap`` orders collectives that are ready at the same point:
            ``"priority"`` (default) puts first the one whose result is needed first;
            ``"program"`` keeps the traced order. Both are deterministic, so every rank
            issues the same sequence.
        sm_free_comm: ask for copy-engine ("SM-free") collectives. On CUDA with an NCCL group
            and ``final_stage="inductor"``, turns on torch's copy-engine all_gather and
            reduce_scatter (Inductor's ``enable_low_contention_collectives``); torch has no
            copy-engine all_to_all. A one-line notice says what applies; elsewhere the ordinary
            collectives run. Default False. See docs/DISTRIBUTED.md.
        mode: ``torch.compile``'s ``mode=``, forwarded to Inductor.
    """

    passes: tuple[str, ...] | None = None
    disable_passes: tuple[str, ...] = ()
    final_stage: str = "inductor"
    moe_recompute: str = "save_preact"
    inductor_config: Mapping[str, Any] = field(default_factory=dict)
    memory_budget: int | float | None = None
    checkpoint_solver: str = "auto"
    checkpoint_time_limit: float = 5.0
    expert_parallel: Any = None  # blazec.expert_parallel.EPGroup once parsed
    ep_chunks: int = 2
    comm_order: str = "priority"
    sm_free_comm: bool = False
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
            if mode is None:
                return options
            if mode != "default" and options.final_stage == "eager":
                raise BlazeOptionError(f"mode={mode!r} is set but final_stage='eager' runs no Inductor to take it")
            return dataclasses.replace(options, mode=_mode(mode))
        if not isinstance(options, Mapping):
            raise BlazeOptionError(
                f"blaze options must be a dict, got {type(options).__name__}; "
                f"valid keys: {', '.join(cls.valid_keys())}"
            )
        not_str = [k for k in options if not isinstance(k, str)]
        if not_str:
            raise BlazeOptionError(
                f"blaze option names must be strings, got {', '.join(map(repr, not_str))}; "
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
        if "ep_chunks" in kw and kw.get("expert_parallel") is None:
            raise BlazeOptionError(
                f"ep_chunks is set but expert_parallel is not: ep_chunks={kw['ep_chunks']} splits only "
                f"expert-parallel MoE layers into chunks; set expert_parallel ('world' or a ProcessGroup; "
                f"blazec dump: --expert-parallel N with N > 1) or leave ep_chunks out"
            )
        if kw.get("inductor_config") and kw.get("final_stage") == "eager":
            raise BlazeOptionError(
                f"inductor_config is set but final_stage='eager' runs no Inductor: the patches "
                f"{', '.join(map(repr, sorted(kw['inductor_config'])))} would be ignored; drop one of the two"
            )
        if kw["mode"] != "default" and kw.get("final_stage") == "eager":
            raise BlazeOptionError(f"mode={kw['mode']!r} is set but final_stage='eager' runs no Inductor to take it")
        cfg = cls(**kw)
        cfg.check_pass_names()
        return cfg

    def check_pass_names(self) -> None:
        from blazec.passes.registry import pass_names

        known = pass_names()
        both = [n for n in (self.passes or ()) if n in self.disable_passes]
        if both:
            raise BlazeOptionError(
                f"options 'passes' and 'disable_passes' both name {', '.join(map(repr, both))}: "
                "drop it from one of the two"
            )
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


# Set by the backend itself on every Inductor compile (backend.inductor_config_patches): a
# patch of these would be overwritten, so it is refused.
_BLAZE_OWNED_INDUCTOR_KEYS = ("custom_partitioner_fn", "post_grad_custom_post_pass")


def _inductor_config(key: str, value: Any) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    if not isinstance(value, Mapping):
        raise BlazeOptionError(f"option {key!r} must be a dict of Inductor config patches")
    bad = []
    for name in value:
        try:  # the lookup Inductor's config.patch does; dotted names reach nested settings
            if not isinstance(name, str):
                raise AttributeError(name)
            inductor_config.__getattr__(name)
        except AttributeError:
            bad.append(name)
    if bad:
        raise BlazeOptionError(
            f"option {key!r}: unknown Inductor config key(s) {bad!r} (nested settings take dotted "
            f"names, e.g. 'triton.cudagraphs')"
        )
    for name, v in value.items():
        if name in _BLAZE_OWNED_INDUCTOR_KEYS:
            raise BlazeOptionError(
                f"option {key!r}: {name!r} is set by the blaze backend itself and cannot be patched"
            )
        expected = _inductor_type_error(inductor_config, name, v)
        if expected:
            raise BlazeOptionError(
                f"option {key!r}: {name!r} takes {expected}, got {v!r} ({_type_name(v)})"
            )
    return dict(value)


def _type_name(v: Any) -> str:
    """``v``'s type as a message names it: ``numpy.bool``, not a bare ``bool`` a reader takes for
    Python's."""
    t = type(v)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _inductor_type_error(inductor_config: Any, name: str, value: Any) -> str | None:
    """What type the setting takes where ``value`` does not fit its current value's type, else None.

    bool takes a bool; int an int (not a bool); float an int or a float; str a str; a container
    the same container type. A setting whose current value is None takes anything, and None is
    taken where the setting's declared type is Optional."""
    current = inductor_config.__getattr__(name)
    if current is None:
        return None
    if value is None:
        entry = getattr(inductor_config, "_config", {}).get(name)
        if type(None) in typing.get_args(getattr(entry, "value_type", None)):
            return None
    if isinstance(current, bool):
        ok, expected = isinstance(value, bool), "a bool"
    elif isinstance(current, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an int"
    elif isinstance(current, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a float"
    elif isinstance(current, (str, list, tuple, dict, set, frozenset)):
        kind = type(current) if not isinstance(current, str) else str
        ok, expected = isinstance(value, kind), f"a {kind.__name__}"
    else:
        return None
    shown = repr(current) if len(repr(current)) <= 60 else repr(current)[:57] + "..."
    return None if ok else f"{expected} (its current value is {shown})"


_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%|[a-zA-Z]+)?\s*$")
_BUDGET_HELP = (
    "give a fraction of the default partition's activation bytes as a float in [0.0, 1.0] "
    "or a string like '60%', or absolute bytes as a non-negative int or a string like "
    "'2GiB', '512MB', '1e9B'"
)


def parse_memory_budget(key: str, value: Any) -> int | float | None:
    """``memory_budget``: None, absolute bytes (int), or a fraction in [0, 1] (float)."""
    if value is None:
        return None
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        raise BlazeOptionError(f"option {key!r} must not be a bool, got {value!r}; {_BUDGET_HELP}")
    if isinstance(value, numbers.Integral):  # Python or numpy integers
        value = int(value)
    elif isinstance(value, numbers.Real):
        value = float(value)
    if isinstance(value, int):
        if value < 0:
            raise BlazeOptionError(f"option {key!r}: bytes must be >= 0, got {value}; {_BUDGET_HELP}")
        return int(value)
    if isinstance(value, float):
        if not (0.0 <= value <= 1.0):  # also rejects nan
            raise BlazeOptionError(
                f"option {key!r}: a float is a fraction and must be within [0.0, 1.0], got "
                f"{value!r}; for absolute bytes pass an int or a string like '2GiB'"
            )
        return float(value)
    if isinstance(value, str):
        m = _BUDGET_RE.match(value)
        if m is None:
            raise BlazeOptionError(f"option {key!r}: cannot parse {value!r}; {_BUDGET_HELP}")
        number, unit = m.group(1), m.group(2)
        if unit == "%":
            pct = float(number)
            if not 0.0 <= pct <= 100.0:
                raise BlazeOptionError(f"option {key!r}: a percentage must be within 0%..100%, got {value!r}")
            return pct / 100.0
        if unit is None:
            is_int = re.fullmatch(r"[0-9]+", number) is not None
            return parse_memory_budget(key, int(number) if is_int else float(number))
        scale = _BYTE_UNITS.get(unit.lower())
        if scale is None:
            raise BlazeOptionError(
                f"option {key!r}: unknown unit {unit!r} in {value!r}; units: "
                f"B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"
            )
        nbytes = float(number) * scale
        if not math.isfinite(nbytes):
            raise BlazeOptionError(f"option {key!r}: {value!r} is too large a number of bytes; {_BUDGET_HELP}")
        if (scale == 1 and nbytes != int(nbytes)) or 0 < nbytes < 1:  # "0.5B", "0.0004KB": read as 0 bytes
            raise BlazeOptionError(f"option {key!r}: {value!r} is not a whole number of bytes; {_BUDGET_HELP}")
        return int(round(nbytes))
    raise BlazeOptionError(f"option {key!r} must be a number or a string, got {type(value).__name__}; {_BUDGET_HELP}")


def _positive_seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real) \
            or not (0 < value <= 3600):
        raise BlazeOptionError(f"option {key!r} must be a number of seconds in (0, 3600], got {value!r}")
    return float(value)


def _expert_parallel(key: str, value: Any):
    if value is None:
        return None
    from blazec.expert_parallel import EPGroup, ExpertParallelError, resolve_group

    if isinstance(value, EPGroup):
        return value
    try:
        return resolve_group(value)
    except ExpertParallelError as e:
        raise BlazeOptionError(f"option {key!r}: {e}") from None


def _chunks(key: str, value: Any) -> int:
    try:  # Python and numpy ints, not bools
        n = as_int(value, key)
    except TypeError:
        n = None
    if n is None or not (1 <= n <= 64):
        raise BlazeOptionError(f"option {key!r} must be an int in [1, 64], got {value!r}")
    return n


def _bool(key: str, value: Any) -> bool:
    try:  # Python and numpy bools
        return as_flag(value, key)
    except TypeError:
        raise BlazeOptionError(f"option {key!r} must be True or False, got {value!r}") from None


_VALIDATORS = {
    "passes": _names,
    "disable_passes": _names,
    "final_stage": _choice(FINAL_STAGES),
    "moe_recompute": _choice(MOE_RECOMPUTE),
    "inductor_config": _inductor_config,
    "memory_budget": parse_memory_budget,
    "checkpoint_solver": _choice(CHECKPOINT_SOLVERS),
    "checkpoint_time_limit": _positive_seconds,
    "expert_parallel": _expert_parallel,
    "ep_chunks": _chunks,
    "comm_order": _choice(COMM_ORDERS),
    "sm_free_comm": _bool,
}
