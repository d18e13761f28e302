"""blazec's checkpoint solver against ``torch._functorch.config.activation_memory_budget``.

For each model the joint graph is captured once (one compile with blaze and no budget), then
for each budget fraction ``f``:

- torch: ``choose_saved_values_set`` with ``activation_memory_budget = f`` (PyTorch's own
  budgeted partition: min-cut plus a knapsack over banned nodes, FLOP runtime estimates);
- blazec at torch's bytes: the solver with an absolute budget equal to what torch's plan
  saves. The claim tested in tests/passes/test_checkpoint_vs_torch.py: saved bytes <= torch's
  and estimated recompute time <= torch's;
- blazec at ``f``: the solver with ``memory_budget = f`` (a fraction of the default
  partition's activation bytes; torch's fraction is of the range between saving only the
  inputs and the default partition, which is close to the same thing).

Both plans are measured by blazec's model: saved activation bytes (views of inputs and
parameters are free; a view costs its base's storage) and roofline recompute time
(``checkpoint_model.FLOPS_PER_S``, ``BYTES_PER_S``). Torch's FLOP-only estimate ignores
memory-bound recompute, so the recompute FLOPs are shown too.

    python benchmarks/checkpoint_vs_torch.py            # markdown table on stdout
    python benchmarks/checkpoint_vs_torch.py --small    # the test sizes
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("moe_*.py"))


def load_example(name: str):
    key = f"blazec_checkpoint_example_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # Dynamo looks modules up by name when it inlines their code
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(EXAMPLES))
    return mod


# ---------------------------------------------------------------------------------------
# Models besides the examples


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP (or an MoE)."""

    def __init__(self, d: int, heads: int, ff: int, moe: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff) if moe is None else None
        self.fc2 = nn.Linear(ff, d) if moe is None else None
        self.moe = moe
        self.dropout = dropout

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b, t, d)
        x = x + F.dropout(self.proj(a), self.dropout, self.training)
        y = self.ln2(x)
        if self.moe is not None:
            y = self.moe(y)
        else:
            y = self.fc2(F.gelu(self.fc1(y)))
        return x + F.dropout(y, self.dropout, self.training)


class TinyTransformer(nn.Module):
    def __init__(self, d=64, heads=4, ff=256, layers=2, dropout=0.0, moe_factory=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(d, heads, ff, moe_factory(i) if moe_factory else None, dropout) for i in range(layers)
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


def make_transformer(batch=4, seq=32, d=64, heads=4, ff=256, layers=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return TinyTransformer(d, heads, ff, layers, dropout), (torch.randn(batch, seq, d),)


def make_moe_transformer(batch=4, seq=16, d=32, heads=4, inters=(48, 96), num_experts=4, top_k=2, seed=0):
    """A transformer whose MLPs are naive MoE loops (examples/moe_loop_modulelist.py) of
    different widths, so that the solver's per-layer choice matters."""
    LoopMoE = load_example("moe_loop_modulelist").LoopMoE
    torch.manual_seed(seed)
    model = TinyTransformer(d, heads, 4 * d, len(inters), 0.0,
                            moe_factory=lambda i: LoopMoE(d, inters[i], num_experts, top_k))
    return model, (torch.randn(batch, seq, d),)


def model_factories(small: bool = True):
    """name -> () -> (model, inputs): every example MoE model, a small transformer and an
    MoE transformer. ``small=False`` uses bigger sizes (same graphs, bigger numbers)."""
    out = {}
    for name in EXAMPLE_NAMES:
        mod = load_example(name)
        if small:
            out[name] = mod.make
        else:
            out[name] = (lambda mod: lambda: mod.make(batch=8, seq=128, d=256)
                         if "inter" not in mod.make.__code__.co_varnames
                         else mod.make(batch=8, seq=128, d=256, inter=512))(mod)
    if small:
        out["tiny_transformer"] = make_transformer
        out["moe_transformer"] = make_moe_transformer
    else:
        out["tiny_transformer"] = lambda: make_transformer(batch=8, seq=256, d=256, ff=1024, layers=4)
        out["moe_transformer"] = lambda: make_moe_transformer(batch=8, seq=128, d=256, inters=(512, 1024))
    return out


# ---------------------------------------------------------------------------------------
# The comparison


def capture_joint(model, inputs):
    """Compile with blaze (no budget), run forward + backward, return the captured graphs."""
    from blazec.passes import checkpoint as ck

    torch._dynamo.reset()
    with ck.capture() as caps:
        compiled = torch.compile(model, backend="blaze", options={"final_stage": "eager"})
        out = compiled(*inputs)
        out.float().pow(2).mean().backward()
    return caps


@dataclass
class Row:
    model: str
    fraction: float
    default_bytes: int
    torch_bytes: int
    torch_us: float
    torch_flops: int
    blaze_bytes: int  # at torch's bytes
    blaze_us: float
    blaze_flops: int
    blaze_solver: str
    blaze_moe: str
    frac_bytes: int  # at the fraction
    frac_us: float
    frac_solver: str
    torch_violations: list[str]

    @property
    def speedup(self) -> float:
        return self.torch_us / self.blaze_us if self.blaze_us > 0 else float("inf") if self.torch_us > 0 else 1.0


def _flops(problem, plan) -> int:
    from blazec.passes.checkpoint_model import FWD

    total = 0
    for i in plan.recomputed:
        v = problem.vertices[i]
        if v.kind == FWD:
            total += problem.eval_expr(v.flops_expr)
    for k in plan.z:
        total += problem.eval_expr(problem.layers[k].gemm1_flops_expr)
    return total


def compare_captured(name: str, cap, fractions, *, time_limit: float = 5.0) -> list[Row]:
    from blazec.passes.checkpoint import resolve_budget
    from blazec.passes.checkpoint_solve import solve

    pr = cap.problem
    rows = []
    for f in fractions:
        tp = cap.torch_plan(f)
        budget = [tp.bytes_at[0]] + [None] * (len(pr.points) - 1)
        ours = solve(pr, budget, time_limit=time_limit)
        fb, _ = resolve_budget(pr, cap.default, float(f))
        at_f = solve(pr, fb, time_limit=time_limit)
        moe = ",".join("R" if layer.index in ours.plan.z else "S" for layer in pr.layers) or "-"
        rows.append(Row(
            model=name, fraction=f, default_bytes=cap.default.bytes_at[0],
            torch_bytes=tp.bytes_at[0], torch_us=tp.cost * 1e6, torch_flops=_flops(pr, tp),
            blaze_bytes=ours.plan.bytes_at[0], blaze_us=ours.plan.cost * 1e6, blaze_flops=_flops(pr, ours.plan),
            blaze_solver=f"{ours.solver}/{ours.status}", blaze_moe=moe,
            frac_bytes=at_f.plan.bytes_at[0], frac_us=at_f.plan.cost * 1e6,
            frac_solver=f"{at_f.solver}/{at_f.status}", torch_violations=tp.violations,
        ))
    return rows


def run(fractions=(0.8, 0.5, 0.2, 0.0), small: bool = True, names=None) -> list[Row]:
    rows: list[Row] = []
    for name, factory in model_factories(small).items():
        if names and name not in names:
            continue
        model, inputs = factory()
        caps = capture_joint(model, inputs)
        for gi, cap in enumerate(caps):
            label = name if len(caps) == 1 else f"{name}[{gi}]"
            rows += compare_captured(label, cap, fractions)
    return rows


def _num(n: float) -> str:
    return f"{n:,.0f}"


def table(rows: list[Row]) -> str:
    head = (
        "| model | f | default B | torch B | torch recompute us | torch MFLOP | blazec B (<= torch B) "
        "| blazec recompute us | blazec MFLOP | MoE (S=save, R=recompute) | solver | blazec @ f: B | us |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.fraction:g} | {_num(r.default_bytes)} | {_num(r.torch_bytes)} | {r.torch_us:.4g} "
            f"| {r.torch_flops / 1e6:.3g} | {_num(r.blaze_bytes)} | {r.blaze_us:.4g} | {r.blaze_flops / 1e6:.3g} "
            f"| {r.blaze_moe} | {r.blaze_solver} | {_num(r.frac_bytes)} | {r.frac_us:.4g} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the test sizes (fast)")
    ap.add_argument("--fractions", default="0.8,0.5,0.2,0.0")
    ap.add_argument("--models", default="", help="comma-separated subset")
    args = ap.parse_args(argv)
    fr = [float(x) for x in args.fractions.split(",")]
    t0 = time.time()
    rows = run(fr, small=args.small, names=[m for m in args.models.split(",") if m])
    print(f"machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}, {time.time() - t0:.0f} s")
    print(table(rows))
    bad = [r for r in rows if r.blaze_bytes > r.torch_bytes or r.blaze_us > r.torch_us * (1 + 1e-6) + 1e-9]
    if bad:
        print(f"blazec worse than torch on {len(bad)} row(s)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
