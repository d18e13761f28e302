"""Train the same naive MoE model eager and with blaze, and print both loss curves.

A tiny regression task: a fixed random "teacher" MoE block produces targets, and two copies
of one student (same initial weights) learn it with AdamW, one eager and one compiled with
``torch.compile(backend="blaze")``. The curves should agree to float rounding.

    python examples/train_tiny.py [--steps 30] [--final-stage eager|inductor]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_loop_modulelist import LoopMoE  # noqa: E402


def train(model, batches, steps, desc):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in tqdm(range(steps), desc=desc, unit="step"):
        x, y = batches[step % len(batches)]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def make(seed=0):
    """Factory for ``blazec dump``: the student model and one input batch."""
    torch.manual_seed(seed)
    return LoopMoE(d=32, inter=48, num_experts=8, top_k=2), (torch.randn(4, 16, 32),)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--final-stage", choices=["inductor", "eager"], default="inductor")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    torch.manual_seed(0)
    teacher = LoopMoE(d=32, inter=48, num_experts=8, top_k=2).requires_grad_(False)
    batches = []
    for _ in range(8):
        x = torch.randn(4, 16, 32)
        batches.append((x, teacher(x)))
    student, _ = make(seed=1)

    eager = train(copy.deepcopy(student), batches, args.steps, "eager")
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(student), backend="blaze", options={"final_stage": args.final_stage})
    blaze = train(compiled, batches, args.steps, "blaze")

    print(f"\n{'step':>4}  {'eager loss':>12}  {'blaze loss':>12}  {'abs diff':>9}")
    shown = sorted(set(range(0, args.steps, max(1, args.steps // 10))) | {args.steps - 1})  # the last step once
    for i in shown:
        print(f"{i:>4}  {eager[i]:>12.6f}  {blaze[i]:>12.6f}  {abs(eager[i] - blaze[i]):>9.2e}")
    print(f"max |eager - blaze| over {args.steps} steps: {max(abs(a - b) for a, b in zip(eager, blaze)):.2e}")
    return eager, blaze


if __name__ == "__main__":
    main()
