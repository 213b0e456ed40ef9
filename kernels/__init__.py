"""Pallas TPU kernels and their XLA twins, one module or folder per op."""
