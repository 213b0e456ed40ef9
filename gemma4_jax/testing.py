"""Helpers for tests and benchmarks: tolerances, TPU lowering, meshes.

Tolerances follow DESIGN.md: pass iff max|out - ref| <= atol + rtol * |ref|
elementwise; gradients get twice the output tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# dtype -> (atol, rtol) for outputs.
TOLERANCES = {
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
}
# Online-softmax kernels reorder float32 sums: DESIGN.md allows 2e-5.
ONLINE_SOFTMAX_F32_ATOL = 2e-5


def tolerance(dtype, *, grad: bool = False,
              online_softmax: bool = False) -> tuple[float, float]:
  atol, rtol = TOLERANCES[jnp.dtype(dtype)]
  if online_softmax and jnp.dtype(dtype) == jnp.float32:
    atol = ONLINE_SOFTMAX_F32_ATOL
  factor = 2.0 if grad else 1.0
  return atol * factor, rtol * factor


def assert_close(actual, reference, *, dtype=None, grad: bool = False,
                 online_softmax: bool = False, name: str = "output"):
  """Asserts elementwise |actual - reference| <= atol + rtol * |reference|.

  `dtype` picks the tolerance (default: actual's dtype); both are compared in
  float64 so the check itself adds no error.
  """
  actual64 = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  ref64 = np.asarray(jnp.asarray(reference, jnp.float32), np.float64)
  if actual64.shape != ref64.shape:
    raise AssertionError(f"{name}: shape {actual64.shape} != reference "
                         f"{ref64.shape}")
  atol, rtol = tolerance(dtype if dtype is not None else
                         jnp.asarray(actual).dtype, grad=grad,
                         online_softmax=online_softmax)
  if not np.all(np.isfinite(actual64)):
    raise AssertionError(f"{name}: {np.sum(~np.isfinite(actual64))} "
                         "non-finite values")
  excess = np.abs(actual64 - ref64) - (atol + rtol * np.abs(ref64))
  if np.any(excess > 0):
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    raise AssertionError(
        f"{name}: {np.sum(excess > 0)} of {excess.size} elements outside "
        f"atol={atol:g} rtol={rtol:g}; worst at {worst}: {actual64[worst]!r} "
        f"vs reference {ref64[worst]!r} (max |diff| "
        f"{np.max(np.abs(actual64 - ref64)):.3g})")


def lower_for_tpu(fn, *args, **kwargs) -> jax.export.Exported:
  """Exports `jax.jit(fn)(*args)` for TPU on any machine.

  Catches block-shape and Mosaic lowering errors of Pallas kernels. It does
  not prove the kernel fits VMEM or is fast. Arguments may be
  `jax.ShapeDtypeStruct`s, so E2B-sized shapes cost no memory.
  """
  return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args, **kwargs)


def simulated_mesh(shape=(2, 2), axis_names=("fsdp", "tp")) -> jax.sharding.Mesh:
  """A `('fsdp','tp')` mesh over CPU devices, like Tunix's (Auto axes: with
  jax 0.10's default Explicit axes Tunix 0.1.7's embedding lookup fails).

  Needs `XLA_FLAGS=--xla_force_host_platform_device_count=N` set before JAX
  initializes its backend (tests/conftest.py does so for N=4).
  """
  needed = int(np.prod(shape))
  devices = jax.devices()
  if len(devices) < needed:
    raise RuntimeError(
        f"a {shape} mesh needs {needed} devices, JAX sees {len(devices)}; set "
        "XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{needed} before importing jax")
  return jax.make_mesh(shape, axis_names, devices=devices[:needed],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
