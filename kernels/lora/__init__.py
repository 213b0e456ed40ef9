"""The LoRA matmul: Pallas TPU kernel, its XLA twin, adapters, einsum mapping.

`pallas_tpu.py` (entry, BlockSizes, custom_vjp, the pallas_call) and
`pallas_tpu_kernel.py` (the kernel body); `xla.py`; `adapters.py` (many
adapters as one stacked adapter, for both); `einsum.py` (qwix's LoRA
einsums on the 2-D op); `sharding.py` (the `shard_map` wrapper).
"""
