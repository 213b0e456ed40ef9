"""`gemma4-jax doctor`: what this machine will run, and why."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import jax

from gemma4_jax import implementations
from gemma4_jax import ops
from gemma4_jax import patches
from gemma4_jax import testing
from gemma4_jax.patches import tpu_compiler

PACKAGES = ("gemma4-jax", "jax", "jaxlib", "flax", "google-tunix", "qwix",
            "orbax-checkpoint", "safetensors", "transformers", "peft", "torch")


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def main() -> int:
  print(f"python {platform.python_version()} on {platform.platform()}")
  print(f"jax backend: {jax.default_backend()}; devices: "
        f"{', '.join(str(d) for d in jax.devices())}")
  print("\npackages:")
  for name in PACKAGES:
    print(f"  {name:18} {_version(name)}")
  print("\nops (implementation used by default, by the platform lowered "
        "for):")
  for op, available in ops.AVAILABLE.items():
    chosen = implementations.describe(
        implementations.resolve(op, None, available),
        tpu_default=ops.TPU_DEFAULT[op])
    print(f"  {op:24} {chosen:32} (has: {', '.join(available)})")
  missing = testing.libtpu_missing()
  print("\ncompiling for TPU from this machine (gemma4-jax fit, the TPU "
        "tests): " + ("available (libtpu)" if missing is None else missing))
  args = os.environ.get(tpu_compiler.ENV)
  print(f"\n{tpu_compiler.ENV}: {args or '(unset)'}; " + (
      f"names {tpu_compiler.FLAG}, so apply() leaves it"
      if tpu_compiler.user_set() else
      f"patches.apply() adds --{tpu_compiler.FLAG}=true (identical layers "
      "compiled once; see gemma4_jax.patches.tpu_compiler)"))
  print("\npatches:")
  print(patches.status())
  return 0
