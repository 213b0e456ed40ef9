"""The device mesh `generate`, `perplexity` and the fine-tuning script run on.

Tunix's Gemma 4 shardings name two axes, `('fsdp', 'tp')`. With one device
there is no mesh; with several, every device goes on `fsdp` by default:
rows of a batch are split across devices and each weight is split along its
`fsdp` dimension (Gemma 4 E2B has one KV head, so `tp` > 1 would replicate
K/V; give `shape` to choose otherwise).
"""

from __future__ import annotations

AXES = ("fsdp", "tp")


def default_mesh(shape: tuple[int, int] | None = None):
  """An Auto-axes `('fsdp', 'tp')` mesh over all devices, or None on one.

  Auto axes, like Tunix's: with jax 0.10's default Explicit axes Tunix
  0.1.7's embedding lookup fails.

  Raises:
    ValueError: `shape` does not multiply to the number of devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if shape is None:
    if len(devices) == 1:
      return None
    shape = (len(devices), 1)
  if shape[0] * shape[1] != len(devices):
    raise ValueError(f"mesh shape {shape} needs {shape[0] * shape[1]} "
                     f"devices, there are {len(devices)}")
  return jax.make_mesh(tuple(shape), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
