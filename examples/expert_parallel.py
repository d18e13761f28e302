"""Expert-parallel training of the naive MoE block, checked against one process.

    torchrun --nproc-per-node 2 examples/expert_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 4 examples/expert_parallel.py --steps 5
    torchrun --nproc-per-node 8 examples/expert_parallel.py --backend nccl   # one GPU per rank

The model is written for one device (a loop over a ModuleList of experts). With
``options={"expert_parallel": "world"}``, blaze rewrites the loop so that rank r runs only
experts [r*E/W, (r+1)*E/W): token rows travel to the owning ranks with all_to_all and come back
the same way. Each rank trains on its own batch. ``blazec.expert_parallel.sync_grads`` then
all-reduces the data-parallel gradients (router, norm); each expert's gradient already sums
every rank's tokens, so it is left alone.

Every rank also trains a single-process copy on the global batch (all ranks' batches) and
prints the largest difference in loss and in the parameters this rank owns.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import blazec  # noqa: F401 - registers the "blaze" backend
from blazec.demo_model import NaiveMoEBlock
from blazec.expert_parallel import sync_grads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--chunks", type=int, default=2, help="the ep_chunks option")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--final-stage", choices=["inductor", "eager"], default="eager")
    args = p.parse_args()
    for flag, v, lo in (("--steps", args.steps, 1), ("--tokens", args.tokens, 1), ("--experts", args.experts, 2),
                        ("--chunks", args.chunks, 1)):
        if v < lo:
            p.error(f"{flag} must be >= {lo}, got {v}")  # --experts: the model routes to its top 2
    if "RANK" not in os.environ:
        print("run me under torchrun, e.g. torchrun --nproc-per-node 2 examples/expert_parallel.py", file=sys.stderr)
        return 2
    if args.backend == "nccl":
        if not torch.cuda.is_available():
            print("--backend nccl needs CUDA GPUs; use --backend gloo on CPU", file=sys.stderr)
            return 2
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(args.backend)
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


def train(args) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if args.backend == "nccl" else torch.device("cpu")
    if args.experts % world:
        if rank == 0:
            print(f"--experts {args.experts} must be divisible by the world size {world}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = NaiveMoEBlock(d=64, inter=128, num_experts=args.experts).to(device)
    ref = NaiveMoEBlock(d=64, inter=128, num_experts=args.experts).to(device)
    ref.load_state_dict(model.state_dict())
    n_local = args.experts // world
    local = range(rank * n_local, (rank + 1) * n_local)
    remote = {id(q) for e, m in enumerate(model.experts) if e not in local for q in m.parameters()}

    compiled = torch.compile(model, backend="blaze", options={
        "expert_parallel": "world", "ep_chunks": args.chunks, "final_stage": args.final_stage})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # remote experts get no gradient: SGD skips them
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    if rank == 0:
        print(f"{world} ranks, {args.experts} experts ({n_local} per rank), {args.tokens} tokens per rank, "
              f"{args.chunks} chunk(s), backend {args.backend}")

    for step in range(args.steps):
        gen = torch.Generator().manual_seed(step)
        batches = [torch.randn(1, args.tokens, 64, generator=gen).to(device) for _ in range(world)]
        targets = [torch.randn(1, args.tokens, 64, generator=gen).to(device) for _ in range(world)]

        # expert parallel: this rank's batch; loss scaled so the sum over ranks is the global mean
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(compiled(batches[rank]), targets[rank])
        loss.backward()
        sync_grads(model, average=True)  # the gradient of the loss averaged over ranks
        opt.step()
        global_loss = loss.detach() / world
        dist.all_reduce(global_loss)

        # one process on the global batch
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = sum(torch.nn.functional.mse_loss(ref(x), t) for x, t in zip(batches, targets)) / world
        ref_loss.backward()
        ref_opt.step()

        names = dict(ref.named_parameters())
        diff = max((q - names[n]).abs().max().item() for n, q in model.named_parameters() if id(q) not in remote)
        msg = (f"step {step}: loss {global_loss.item():.6f} (one process {ref_loss.item():.6f}), "
               f"max |param diff| on rank {rank}'s parameters {diff:.2e}")
        for r in range(world):  # print in rank order
            if r == rank and (rank == 0 or step == args.steps - 1):
                print(f"[rank {rank}] {msg}", flush=True)
            dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
