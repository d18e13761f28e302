"""Shared ``__main__`` helper for the examples: run eager and blaze, print the differences."""

import copy

import torch


def compare(factory, options=None):
    model, inputs = factory()
    ref_model = copy.deepcopy(model)
    ref = ref_model(*inputs)
    ref.float().pow(2).mean().backward()

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="blaze", options=options or {})
    out = compiled(*inputs)
    out.float().pow(2).mean().backward()

    grad_err = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), ref_model.parameters())
        if p.grad is not None
    )
    name = factory.__module__
    if name == "__main__":  # run as a script: name it by its file
        import os
        import sys

        name = os.path.basename(sys.modules["__main__"].__file__ or name)
    print(f"{name}: output max abs err {(out - ref).abs().max().item():.3e}, "
          f"max grad err {grad_err:.3e}")
