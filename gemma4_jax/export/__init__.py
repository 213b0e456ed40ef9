"""LoRA merge and adapter export for Gemma 4, in host memory.

numpy + safetensors only on the streaming path; orbax (and with it jax) is
imported only to read a Tunix checkpoint.

  from gemma4_jax import export
  export.merge("gemma-4-e2b", "ckpts/", "merged/", alpha=32.0)
  export.export_adapter("ckpts/", "peft/", alpha=32.0)
"""

from gemma4_jax.export.adapter import Adapter, AdapterError, load_adapter
from gemma4_jax.export.base import BaseCheckpointError
from gemma4_jax.export.mapping import AdapterMappingError, LoraDelta
from gemma4_jax.export.merging import MergeError, MergeSummary, merge
from gemma4_jax.export.peft_export import export_adapter
from gemma4_jax.export.safetensors_io import CorruptFileError

__all__ = [
    "Adapter", "AdapterError", "AdapterMappingError", "BaseCheckpointError",
    "CorruptFileError", "LoraDelta", "MergeError", "MergeSummary",
    "export_adapter", "load_adapter", "merge",
]
