"""torch.library ops of blazec (the contract between passes and kernels)."""
