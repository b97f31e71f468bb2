"""Triton kernels, one file per op: kernels, host wrappers, torch.library registration."""
