"""The XLA LoRA matmul against the float32 reference (`lora_cases`)."""

import lora_cases

from gemma4_jax.kernels.lora import xla


class TestLoraXla(lora_cases.LoraMatmulCases):
  lora_matmul = staticmethod(xla.lora_matmul)
