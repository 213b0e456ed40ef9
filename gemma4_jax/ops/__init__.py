"""Public functional ops; each picks an implementation for the platform.

One module per op (`attention`, `ple`, `lora`, `loss`), each shaped alike:
its implementations in one table (`IMPLEMENTATIONS`, `TPU_DEFAULT`), its
arguments checked once at the public function, the kernels behind it
assuming valid input (ARCHITECTURE.md).

`implementation=None` picks the op's TPU default when the computation is
lowered for TPU (ahead-of-time compiles and `jax.export` from a CPU host
included) and the XLA version elsewhere; the env var
`GEMMA4_JAX_IMPLEMENTATION` overrides the default. `"pallas_tpu"`, `"xla"`
and `"reference"` force one; a forced Pallas kernel lowered for a platform
other than TPU raises unless `interpret=True` (see `implementations`).
"""

from gemma4_jax.ops import attention as _attention
from gemma4_jax.ops import lora as _lora
from gemma4_jax.ops import loss as _loss
from gemma4_jax.ops import ple as _ple
from gemma4_jax.ops.attention import ATTENTION_LOGSUMEXP
from gemma4_jax.ops.attention import ATTENTION_OUTPUT
from gemma4_jax.ops.attention import attention
from gemma4_jax.ops.lora import lora_einsum
from gemma4_jax.ops.lora import lora_einsum_plan
from gemma4_jax.ops.lora import lora_matmul
from gemma4_jax.ops.loss import softcapped_cross_entropy
from gemma4_jax.ops.ple import combine_per_layer_inputs
from gemma4_jax.ops.ple import per_layer_inputs
from gemma4_jax.ops.ple import ple_lookup

# op name -> the module that holds its implementations table.
_MODULES = {
    "attention": _attention,
    "ple_lookup": _ple,
    "per_layer_inputs": _ple,
    "lora_matmul": _lora,
    "softcapped_cross_entropy": _loss,
}
# op name -> implementations it has.
AVAILABLE = {op: module.IMPLEMENTATIONS for op, module in _MODULES.items()}
# op name -> what `implementation=None` runs when lowered for TPU (the XLA
# version elsewhere); each op module says why.
TPU_DEFAULT = {op: module.TPU_DEFAULT for op, module in _MODULES.items()}
