"""Triton kernels of also_fused, one module per kernel family, each with its launcher."""
