"""Fused LoRA matmul: the Pallas TPU kernel, its XLA twin, einsum mapping."""
