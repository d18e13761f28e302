"""Min-norm point in the convex hull of task gradients (the MGDA sub-problem).

MGDA (Désidéri 2012; Sener & Koltun 2018) descends along the minimum-norm element of the
convex hull of the task gradients ``g_1..g_T``:

    min_alpha || sum_t alpha_t g_t ||^2   s.t.  alpha_t >= 0,  sum_t alpha_t = 1.

The objective only needs the Gram matrix ``G_ij = <g_i, g_j>``: ``f(alpha) = alpha^T G alpha``.
The solvers here take ``G`` as nested Python lists (T is small; the Gram is one T x T tensor
moved to the host once per step) and return ``alpha``.
"""

from __future__ import annotations


def min_norm_2(g11: float, g12: float, g22: float) -> float:
    """Weight of ``g_1`` in the min-norm point of the segment ``[g_2, g_1]``.

    ``|| a g_1 + (1-a) g_2 ||^2`` is a parabola in ``a`` with minimiser
    ``a* = (g22 - g12) / (g11 - 2 g12 + g22) = <g_2 - g_1, g_2> / ||g_1 - g_2||^2``,
    clipped to [0, 1]. When ``g_1 = g_2`` every ``a`` is optimal; return 1/2.
    """
    den = g11 - 2.0 * g12 + g22
    if den <= 0.0:
        return 0.5
    return min(1.0, max(0.0, (g22 - g12) / den))


def min_norm_weights(gram: list[list[float]], max_iter: int = 100, tol: float = 1e-12) -> list[float]:
    """Simplex weights minimising ``alpha^T G alpha``.

    T = 1: ``[1]``. T = 2: closed form (``min_norm_2``). T >= 3: Frank-Wolfe in its
    fully-corrective form, Wolfe's min-norm-point algorithm (Wolfe 1976), which is exact after
    finitely many steps where plain Frank-Wolfe converges sublinearly (it zig-zags when the
    optimum lies inside a face, i.e. when several tasks share the weight). With the current
    point ``x = sum_{i in S} alpha_i g_i`` on the active set ``S``:

    * major cycle (the Frank-Wolfe step): the vertex minimising the linearisation,
      ``j = argmin_i <x, g_i> = argmin_i (G alpha)_i``. Stop when the duality gap
      ``<x, x> - <x, g_j>``, which bounds ``<x, x>`` minus the optimum, is at most
      ``tol * <x, x>`` (relative to the point's own norm, so tasks whose ``||g||^2`` differ by
      orders of magnitude do not stop it early at a worse vertex) or below the rounding of the
      products, ``1e-15 * max_i G_ii``; otherwise add j to S.
    * minor cycle (the full correction): the minimiser of ``||sum mu_i g_i||`` over the affine
      hull of S, from the KKT system ``[[G_SS, 1], [1^T, 0]] [mu; -rho] = [0; 1]``. If
      ``mu > 0`` it becomes alpha. Otherwise move from alpha towards mu as far as feasibility
      allows, ``theta = min_{mu_i <= 0} alpha_i / (alpha_i - mu_i)``, drop the vertices whose
      weight reached 0 and repeat.
    """
    T = len(gram)
    if T == 0:
        raise ValueError("need at least one task gradient")
    if T == 1:
        return [1.0]
    if T == 2:
        a = min_norm_2(gram[0][0], gram[0][1], gram[1][1])
        return [a, 1.0 - a]
    scale = max(max(gram[i][i] for i in range(T)), 1e-300)
    first = min(range(T), key=lambda i: gram[i][i])
    alpha = [0.0] * T
    alpha[first] = 1.0
    S = [first]
    for _ in range(max_iter):
        Ga = [sum(gram[i][j] * alpha[j] for j in S) for i in range(T)]
        f = sum(alpha[i] * Ga[i] for i in S)
        j = min(range(T), key=Ga.__getitem__)
        if f - Ga[j] <= max(tol * f, _ROUNDING * scale) or j in S:
            break  # j in S: no improving vertex left up to rounding
        S.append(j)
        for _ in range(T + 1):  # each minor step drops >= 1 vertex, so this bounds it
            mu = _affine_min(gram, S)
            if mu is None:  # numerically degenerate corral: keep the last feasible alpha
                return _normalized(alpha)
            if all(m > 0.0 for m in mu):
                for i, m in zip(S, mu):
                    alpha[i] = m
                break
            theta = min(alpha[i] / (alpha[i] - m) for i, m in zip(S, mu) if m <= 0.0)
            for i, m in zip(S, mu):
                alpha[i] = (1.0 - theta) * alpha[i] + theta * m
            keep = [i for i, m in zip(S, mu) if alpha[i] > 1e-15]
            for i in S:
                if i not in keep:
                    alpha[i] = 0.0
            S = keep
        alpha = _normalized(alpha)
    return alpha


# Relative rounding of the products <x, g_i> = (G alpha)_i, whose terms reach max_i G_ii: a
# duality gap below this times max_i G_ii is noise.
_ROUNDING = 1e-15


def _normalized(alpha: list[float]) -> list[float]:
    tot = sum(alpha)
    return [a / tot for a in alpha]


def _affine_min(gram: list[list[float]], S: list[int]) -> list[float] | None:
    """Weights (summing to 1) of the min-norm point of the affine hull of ``{g_i : i in S}``."""
    import torch

    r = len(S)
    A = torch.zeros(r + 1, r + 1, dtype=torch.float64)
    A[:r, :r] = torch.tensor([[gram[i][j] for j in S] for i in S], dtype=torch.float64)
    A[:r, r] = 1.0
    A[r, :r] = 1.0
    b = torch.zeros(r + 1, 1, dtype=torch.float64)
    b[r] = 1.0
    sol = torch.linalg.lstsq(A, b, driver="gelsd").solution[:r, 0]
    if not torch.isfinite(sol).all() or abs(sol.sum().item() - 1.0) > 1e-8:
        return None
    return sol.tolist()
