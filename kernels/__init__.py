"""Triton kernels of blazec, installed as ``blazec.kernels``; one file per kernel family."""
