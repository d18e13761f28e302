"""Per-sample cost model for load balancing: ``a*L + b*L^2 + c (+ sum_k w_k * f_k)``.

The balancer only needs costs that are proportional to the compute time of a sample, so the
model is deliberately small: a linear term for the per-token work (projections, MLPs,
embedding lookups), a quadratic term for attention, a per-sample constant, and optional extra
features such as the number of unique ids a sample looks up. ``calibrate`` fits the
coefficients from measured per-batch times by (non-negative) least squares.
"""

from __future__ import annotations

import collections.abc
import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from blazec._args import as_flag, as_int

_MAX_FIT_COLUMNS = 12  # the exact NNLS below enumerates 2**columns supports


def _as_float64(x: Sequence[float] | torch.Tensor, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be a 1-D sequence of numbers: {e}") from None
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        bad = int(torch.nonzero(~torch.isfinite(t) | (t < 0))[0, 0])
        raise ValueError(f"{what} must be finite and >= 0, got {what}[{bad}] = {t[bad].item()}")
    return t


def _check_coefficient(name: str, v: object) -> float:
    """A coefficient as a float: real numbers (Python or numpy) that are finite and >= 0."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"cost coefficient {name} must be a real number, got {v!r} ({type(v).__name__})")
    f = float(v)
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"cost coefficient {name} must be a finite number >= 0, got {v!r}")
    return f


def _check_d_model(d_model: object) -> int:
    d = as_int(d_model, "d_model")
    if d < 1:
        raise ValueError(f"d_model must be >= 1, got {d}")
    return d


@dataclass
class CostModel:
    """Cost of one sample of length ``L``: ``a*L + b*L**2 + c + sum_k extra[k] * f_k``.

    Units are arbitrary (only ratios between samples matter for balancing); presets are
    normalised so that ``a = 1`` means "one token of dense work".

    Attributes:
        a: cost per token (linear layers, MLPs, lookups).
        b: cost per token pair (attention scores and the attention-weighted sum).
        c: fixed cost per sample.
        extra: weight of each extra per-sample feature, by name, e.g. ``{"unique_ids": 0.5}``.
            Values for the features are passed to ``__call__`` as keyword arguments.
    """

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.extra, collections.abc.Mapping):
            raise TypeError(f"extra must be a mapping of feature name to weight, got {self.extra!r}")
        self.a, self.b, self.c = (_check_coefficient(k, getattr(self, k)) for k in "abc")
        self.extra = {str(k): _check_coefficient(str(k), v) for k, v in self.extra.items()}

    # Presets -----------------------------------------------------------------------------

    @classmethod
    def tokens(cls) -> "CostModel":
        """Cost = token count. What length-bucketing samplers balance."""
        return cls(a=1.0)

    @classmethod
    def transformer(cls, d_model: int = 1024) -> "CostModel":
        """A decoder/encoder layer with self-attention over the sample's L tokens.

        Forward FLOPs per layer are ``24*L*d^2`` (QKV, output projection, 4x MLP) plus
        ``4*L^2*d`` (scores and weighted sum). Dividing by ``24*d^2`` gives ``a = 1`` and
        ``b = 1/(6*d)``; the backward is a constant multiple and does not change the ratio.
        """
        d_model = _check_d_model(d_model)
        return cls(a=1.0, b=1.0 / (6.0 * d_model))

    @classmethod
    def recsys(cls, d_model: int = 256, per_sample: float = 64.0, unique_ids: float = 0.0) -> "CostModel":
        """A sequence recommender: attention over the user history of length L (small
        ``d_model``, so a larger quadratic share), a dense per-sample part worth
        ``per_sample`` tokens, and optionally a cost per unique id looked up (pass
        ``unique_ids=`` to ``__call__`` when its weight is non-zero). Rough defaults: calibrate
        on your model.
        """
        d_model = _check_d_model(d_model)
        extra = {"unique_ids": unique_ids} if _check_coefficient("unique_ids", unique_ids) else {}
        return cls(a=1.0, b=1.0 / (6.0 * d_model), c=per_sample, extra=extra)

    @classmethod
    def from_spec(cls, spec: str) -> "CostModel":
        """Parse ``tokens``, ``transformer[:D]``, ``recsys[:D]`` or ``a=..,b=..,c=..,name=..``.

        Names other than a, b and c in the key=value form are extra-feature weights.
        """
        if not isinstance(spec, str):
            raise TypeError(f"cost spec must be a string such as 'transformer' or 'a=1,b=1.6e-4', got {spec!r} ({type(spec).__name__})")
        s = spec.strip()
        head, _, arg = s.partition(":")
        if head in ("tokens", "transformer", "recsys"):
            if head == "tokens":
                if arg:
                    raise ValueError(f"bad cost spec {spec!r}: 'tokens' takes no argument")
                return cls.tokens()
            d = 1024 if head == "transformer" else 256
            if arg:
                try:
                    d = int(arg)
                except ValueError:
                    raise ValueError(f"bad cost spec {spec!r}: d_model must be an int, got {arg!r}") from None
                if d < 1:
                    raise ValueError(f"bad cost spec {spec!r}: d_model must be >= 1, got {d}")
            return cls.transformer(d) if head == "transformer" else cls.recsys(d)
        if "=" not in s:
            raise ValueError(
                f"bad cost spec {spec!r}: expected tokens, transformer[:D], recsys[:D] "
                "or key=value pairs such as a=1,b=1.6e-4,c=0"
            )
        coef: dict[str, float] = {}
        for part in s.split(","):
            k, eq, v = part.partition("=")
            k = k.strip()
            if not eq or not k:
                raise ValueError(f"bad cost spec {spec!r}: {part!r} is not key=value")
            if k in coef:
                raise ValueError(f"bad cost spec {spec!r}: {k} given twice")
            try:
                coef[k] = float(v)
            except ValueError:
                raise ValueError(f"bad cost spec {spec!r}: {k}={v!r} is not a number") from None
        a, b, c = coef.pop("a", 0.0), coef.pop("b", 0.0), coef.pop("c", 0.0)
        try:
            return cls(a=a, b=b, c=c, extra=coef)
        except ValueError as e:
            raise ValueError(f"bad cost spec {spec!r}: {e}") from None

    # Evaluation ---------------------------------------------------------------------------

    def __call__(self, lengths: Sequence[float] | torch.Tensor, **features: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Per-sample costs (float64, CPU) for the given lengths and extra features."""
        L = _as_float64(lengths, "lengths")
        cost = self.a * L + self.b * L * L + self.c
        unknown = sorted(set(features) - set(self.extra))
        if unknown:
            raise ValueError(f"unknown cost feature(s) {unknown}; this model has {sorted(self.extra)}")
        for name, w in self.extra.items():
            if w == 0.0:
                continue
            if name not in features:
                raise ValueError(f"cost model needs feature {name!r} (weight {w}); pass {name}=...")
            f = _as_float64(features[name], name)
            if f.shape != L.shape:
                raise ValueError(f"feature {name!r} has {f.numel()} values, lengths has {L.numel()}")
            cost = cost + w * f
        if not torch.isfinite(cost).all():
            i = int(torch.nonzero(~torch.isfinite(cost))[0, 0])
            raise ValueError(
                f"the cost of sample {i} overflows float64 (lengths[{i}] = {L[i].item()}, model {self}): "
                "rescale the lengths or the coefficients"
            )
        return cost

    def __str__(self) -> str:
        terms = [f"{self.a:.4g}*L", f"{self.b:.4g}*L^2", f"{self.c:.4g}"]
        terms += [f"{w:.4g}*{k}" for k, w in self.extra.items()]
        return " + ".join(terms)


# calibrate's own columns: a feature of one of these names would overwrite them
_RESERVED_FEATURES = ("a", "b", "c", "__overhead__")


def calibrate(
    batch_lengths: Sequence[Sequence[float]],
    times: Sequence[float],
    *,
    batch_features: Mapping[str, Sequence[Sequence[float]]] | None = None,
    quadratic: bool = True,
    fit_overhead: bool = True,
    nonnegative: bool = True,
) -> CostModel:
    """Fit a, b, c (and extra-feature weights) to measured per-batch times.

    Batch j with sample lengths ``L_ij`` took ``t_j``. The model is linear in the coefficients,

        t_j = a * sum_i L_ij + b * sum_i L_ij^2 + c * n_j + sum_k w_k * sum_i f_kij + o,

    where ``o`` is a per-batch overhead (launches, optimizer work). ``o`` is the same on every
    rank at every step, so it cannot unbalance them; it is fitted (``fit_overhead``) only so
    that it does not leak into ``c``, and then dropped. The least-squares problem
    ``min ||X w - t||^2`` is solved on columns scaled to unit norm (sum L^2 is ~10^4 times
    sum L). With ``nonnegative`` the solve is NNLS: the optimum restricted to its support is
    the unconstrained least-squares solution on that support, so enumerating supports and
    keeping the best feasible one is exact (fine for the few columns here).

    Args:
        batch_lengths: for each measured batch, the lengths of its samples.
        times: measured time of each batch (any unit; the costs come out in that unit).
        batch_features: per extra feature, per batch, per sample values.
        quadratic: fit b (set False for models without attention; b is then 0).
        fit_overhead: fit and discard a per-batch intercept.
        nonnegative: constrain all coefficients to be >= 0 (needed for partitioning).

    ``batch_lengths`` may be any iterable of batches (a generator too); the flags take bools.
    """
    quadratic, fit_overhead = as_flag(quadratic, "quadratic"), as_flag(fit_overhead, "fit_overhead")
    nonnegative = as_flag(nonnegative, "nonnegative")
    if isinstance(batch_lengths, (str, bytes, torch.Tensor)) or not isinstance(batch_lengths, collections.abc.Iterable):
        raise TypeError(
            f"batch_lengths must be a sequence of batches, each a sequence of sample lengths, got {type(batch_lengths).__name__}"
        )
    batch_lengths = list(batch_lengths)
    t = _as_float64(times, "times")
    if len(batch_lengths) != t.numel():
        raise ValueError(f"got {len(batch_lengths)} batches but {t.numel()} times")
    if batch_features is None:
        batch_features = {}
    if not isinstance(batch_features, collections.abc.Mapping):
        raise TypeError(
            "batch_features must map each feature name to its values (per batch, per sample), "
            f"got {type(batch_features).__name__}"
        )
    feats = dict(batch_features)
    for k, per_batch in feats.items():
        if not isinstance(k, str):
            raise TypeError(f"batch_features: feature names must be strings, got {k!r}")
        if k in _RESERVED_FEATURES:
            raise ValueError(
                f"batch_features: the feature name {k!r} is reserved (the model's own coefficients "
                f"are {', '.join(repr(r) for r in _RESERVED_FEATURES)}); rename the feature"
            )
        if isinstance(per_batch, (str, bytes)) or not isinstance(per_batch, collections.abc.Sequence | torch.Tensor):
            raise TypeError(
                f"batch_features[{k!r}] must be a sequence with one entry per batch (each the batch's "
                f"per-sample values), got {type(per_batch).__name__}"
            )
    cols: list[tuple[str, list[float]]] = [("a", []), ("c", [])]
    if quadratic:
        cols.insert(1, ("b", []))
    cols += [(k, []) for k in feats]
    if fit_overhead:
        cols.append(("__overhead__", []))
    for j, lengths in enumerate(batch_lengths):
        L = _as_float64(lengths, f"batch_lengths[{j}]")
        row = {"a": L.sum().item(), "b": (L * L).sum().item(), "c": float(L.numel()), "__overhead__": 1.0}
        for k, per_batch in feats.items():
            if len(per_batch) != t.numel():
                raise ValueError(f"batch_features[{k!r}] has {len(per_batch)} batches, expected {t.numel()}")
            f = _as_float64(per_batch[j], f"batch_features[{k!r}][{j}]")
            if f.numel() != L.numel():
                raise ValueError(f"batch_features[{k!r}][{j}] has {f.numel()} values, batch {j} has {L.numel()} samples")
            row[k] = f.sum().item()
        for name, col in cols:
            col.append(row[name])
    if len(cols) > _MAX_FIT_COLUMNS:
        raise ValueError(f"too many coefficients to fit ({len(cols)} > {_MAX_FIT_COLUMNS})")
    if t.numel() < len(cols):
        raise ValueError(f"need at least {len(cols)} measured batches to fit {len(cols)} coefficients, got {t.numel()}")
    X = torch.tensor([col for _, col in cols], dtype=torch.float64).T
    scale = X.norm(dim=0)
    scale[scale == 0] = 1.0
    Xs = X / scale
    if torch.linalg.matrix_rank(Xs).item() < len(cols):
        names = [n.replace("__overhead__", "overhead") for n, _ in cols]
        raise ValueError(
            f"cannot separate the coefficients {names} from these batches (the design matrix is "
            "rank deficient): vary batch sizes and lengths, or pass quadratic=False / fit_overhead=False"
        )
    w = _nnls(Xs, t) if nonnegative else torch.linalg.lstsq(Xs, t.unsqueeze(1)).solution.squeeze(1)
    w = w / scale
    fitted = {name: w[i].item() for i, (name, _) in enumerate(cols)}
    fitted.pop("__overhead__", None)
    a, b, c = fitted.pop("a"), fitted.pop("b", 0.0), fitted.pop("c")
    if not nonnegative and min([a, b, c, *fitted.values()]) < 0:
        raise ValueError(
            f"the unconstrained fit has negative coefficients (a={a:.4g}, b={b:.4g}, c={c:.4g}); "
            "costs must be >= 0, use nonnegative=True"
        )
    return CostModel(a=a, b=b, c=c, extra=fitted)


def _nnls(X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact non-negative least squares by support enumeration (few columns only)."""
    p = X.shape[1]
    best, best_res = torch.zeros(p, dtype=X.dtype), float((t * t).sum())
    for r in range(1, p + 1):
        for support in itertools.combinations(range(p), r):
            idx = list(support)
            sol = torch.linalg.lstsq(X[:, idx], t.unsqueeze(1)).solution.squeeze(1)
            if (sol < 0).any():
                continue
            res = float(((X[:, idx] @ sol - t) ** 2).sum())
            if res < best_res - 1e-12 * max(1.0, best_res):
                best = torch.zeros(p, dtype=X.dtype)
                best[idx] = sol
                best_res = res
    return best
