"""Fused LoRA matmul on TPU: padding, tiling and the `custom_vjp`.

The raw kernel is `kernel.fused_matmul`; this module makes any shape fit it
and differentiates it with `W` frozen:

- forward: `y = x @ W + scale * (x @ A) @ B` (one fused kernel whose only
  output is `y`, so a dead `y` costs nothing); the backward pass recomputes
  `x @ A` `[M, R]` in float32 (an XLA dot reading `x` once) rather than
  keeping it;
- `dx = dy @ W^T + scale * (dy @ B^T) @ A^T`: the same fused kernel with
  `W` read transposed in its stored layout; it also returns `dy @ B^T`;
- `dA = scale * x^T @ (dy @ B^T)` and `dB = scale * (x @ A)^T @ dy`: XLA
  matmuls. Both are `R`-wide products contracting over the M rows; their
  cost is reading `x` and `dy` once, which an XLA dot already does at the
  memory roofline, and fusing them into the `dx` kernel would need a
  `[K, R]` or `[R, N]` float32 accumulator resident across all row blocks.
- `W`'s cotangent is zero: the base weight is frozen (no `dW` is computed).

Dimensions: `M` any (partial row blocks); `K` and `N` are used whole when
smaller than their tiles, tiled when they are multiples of 128 (all Gemma 4
shapes), and otherwise zero-padded to a multiple of 128 (a copy of `W`).
The rank (times the number of adapters) is zero-padded to a multiple of 128
lanes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gemma4_jax.kernels.lora import common
from gemma4_jax.kernels.lora import kernel

BlockSizes = kernel.BlockSizes


def lora_matmul(x, w, a, b, *, scale: float, adapter_ids=None, w_scale=None,
                block_sizes: BlockSizes | None = None,
                interpret: bool = False):
  """`x @ w + scale * (x @ a) @ b` with the fused kernel.

  Args:
    x: `[M, K]`, float32 or bfloat16.
    w: `[K, N]`, x's dtype, or int8 with `w_scale`.
    a, b: `[K, r]`, `[r, N]`; or `[n, K, r]`, `[n, r, N]` with
      `adapter_ids [M]`.
    scale: `alpha / rank`.
    adapter_ids: optional `[M]` ints.
    w_scale: `[N]` float32 per-output-channel scales of an int8 `w`.
    block_sizes: tiles (default `BlockSizes.get_default()`).
    interpret: run the Pallas kernels in interpret mode.

  Returns:
    `[M, N]` in x's dtype. Arguments are assumed validated
    (`gemma4_jax.ops.lora_matmul` checks them).
  """
  a_cat, b_cat, rank = _stack(a, b, adapter_ids)
  if w_scale is not None:
    w_scale = w_scale.reshape(1, 1, -1)
  out = grouped_lora_matmul(x, w[None], a_cat, b_cat, scale=scale, rank=rank,
                            adapter_ids=adapter_ids, w_scale=w_scale,
                            block_sizes=block_sizes, interpret=interpret)
  return out[0]


def _stack(a, b, adapter_ids):
  if adapter_ids is None:
    return a, b, a.shape[-1]
  return common.stack_adapters(a, b)


def grouped_lora_matmul(x, w, a_cat, b_cat, *, scale: float, rank: int,
                        adapter_ids=None, w_scale=None, out_groups: int = 1,
                        block_sizes: BlockSizes | None = None,
                        interpret: bool = False):
  """The fused op on a grouped weight, for einsums like `BTD,NDH->BTNH`.

  Args:
    x: `[M, K]`.
    w: `[G, K, Nw]` (`G` weight groups side by side along the output; the
      logical weight is `[K, G*Nw]`); float, or int8 with `w_scale`
      `[G, 1, Nw]` float32.
    a_cat: `[K, R]`; b_cat: `[R, G*Nw]`; with `adapter_ids [M]`, column c
      belongs to adapter `c // rank`.
    scale, rank: as above.
    out_groups: `Co`; the output is `[Co, M, G*Nw/Co]` (output column
      `co*(N/Co) + j` at `[co, :, j]`), e.g. the `C` of `CBSKH`.
    block_sizes, interpret: as above.

  Returns:
    `[Co, M, G*Nw/Co]` in x's dtype.

  Raises:
    ValueError: a grouped layout (`G > 1` or `Co > 1`) whose group widths
      have no common tile (not multiples of 128, or unequal and small).
  """
  block_sizes = block_sizes or BlockSizes.get_default()
  m, k = x.shape
  groups, _, n_per_w = w.shape
  n = groups * n_per_w
  if n % out_groups:
    raise ValueError(f"out_groups={out_groups} does not divide N={n}")
  # Pad K (and, for a single group, N) to a multiple of 128 when no tile
  # divides it; a grouped layout must already be tileable.
  k_pad = k if kernel.pick_tile((k,), block_sizes.tk) and kernel.pick_tile(
      (k,), block_sizes.tn) else common.round_up(k, common.NUM_LANES)
  n_segments = (n_per_w, n // out_groups)
  tileable_n = (kernel.pick_tile(n_segments, block_sizes.tn) and
                kernel.pick_tile(n_segments, block_sizes.tk))
  if not tileable_n and (groups > 1 or out_groups > 1):
    raise ValueError(f"grouped layout G={groups}, Nw={n_per_w}, "
                     f"Co={out_groups} has no common tile; use G = Co = 1")
  n_pad = n if tileable_n else common.round_up(n, common.NUM_LANES)
  r_pad = common.round_up(max(a_cat.shape[1], 1), common.NUM_LANES)

  # Only a single group is ever padded along N, so w's last axis is padded
  # to its share `n_pad // groups` (padding it to n_pad would copy W G times
  # over: 96 MiB for the 8 x 512 query heads).
  x = common.pad_axis(x, 1, k_pad)
  w = common.pad_axis(common.pad_axis(w, 1, k_pad), 2, n_pad // groups)
  if w_scale is not None:
    w_scale = common.pad_axis(w_scale.astype(jnp.float32), 2,
                              n_pad // groups)
  a_cat = common.pad_axis(common.pad_axis(a_cat, 0, k_pad), 1, r_pad)
  b_cat = common.pad_axis(common.pad_axis(b_cat, 0, r_pad), 1, n_pad)
  ids = None if adapter_ids is None else adapter_ids.astype(
      jnp.int32).reshape(m, 1)
  n_segments = (n_pad // groups, n_pad // out_groups)
  config = _Config(
      scale=float(scale), rank=rank, out_groups=out_groups,
      tm=m if m <= block_sizes.tm else block_sizes.tm,
      tk=kernel.pick_tile((k_pad,), block_sizes.tk),
      tn=kernel.pick_tile(n_segments, block_sizes.tn),
      tk_bwd=kernel.pick_tile(n_segments, block_sizes.tk),
      tn_bwd=kernel.pick_tile((k_pad,), block_sizes.tn),
      interpret=interpret)
  out = _fused(x, jax.lax.stop_gradient(w), w_scale, a_cat, b_cat, ids,
               config)
  return out[:, :, :n // out_groups]


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  rank: int
  out_groups: int
  tm: int
  tk: int
  tn: int
  tk_bwd: int
  tn_bwd: int
  interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused(x, w, w_scale, a, b, ids, config):
  return _forward(x, w, w_scale, a, b, ids, config)


def _forward(x, w, w_scale, a, b, ids, config):
  return kernel.fused_matmul(
      x[None], w, a, b, scale=config.scale, rank=config.rank,
      adapter_ids=ids, w_scale=w_scale, out_groups=config.out_groups,
      tm=config.tm, tk=config.tk, tn=config.tn, interpret=config.interpret)


def _fused_fwd(x, w, w_scale, a, b, ids, config):
  # The kernel's only output is `y`, so when `y` is dead (a loss linear in
  # it) the whole call is DCE'd, as XLA drops a dead `x @ W`: a second
  # `down` output would keep an [M, N] `y` alive in HBM. `x @ A` is
  # recomputed in the backward pass instead of saved: one more read of `x`
  # against a saved [M, R] float32 residual per LoRA site.
  out = _forward(x, w, w_scale, a, b, ids, config)
  return out, (x, w, w_scale, a, b, ids)


def _fused_bwd(config, residuals, dy):
  x, w, w_scale, a, b, ids = residuals
  dx, g = kernel.fused_matmul(
      dy, w, b.T, a.T, scale=config.scale, rank=config.rank,
      adapter_ids=ids, w_scale=w_scale, transpose_w=True,
      tm=config.tm, tk=config.tk_bwd, tn=config.tn_bwd, save_down=True,
      interpret=config.interpret)
  # In float32 (on TPU, DEFAULT precision is one bf16 MXU pass anyway; on
  # CPU, XLA has no bf16 x bf16 -> f32 dot).
  x32 = x.astype(jnp.float32)
  down = jnp.dot(x32, a.astype(jnp.float32))  # [M, R], unscaled
  if ids is not None:
    column_adapter = jnp.arange(down.shape[1]) // config.rank
    down = jnp.where(column_adapter == ids, down, 0.0)
  d_a = config.scale * jax.lax.dot_general(
      x32, g, (((0,), (0,)), ((), ())))  # [K, R]
  d_b = config.scale * jnp.einsum(
      "mr,cmn->rcn", down, dy.astype(jnp.float32)).reshape(b.shape)  # [R, N]
  return dx[0], None, None, d_a.astype(a.dtype), d_b.astype(b.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)
