"""Fused LoRA matmul on TPU: a frozen matmul fused with a low-rank product.

`lora_matmul` computes `x @ W + scale * (x @ A) @ B` in one pass over `x`
and differentiates it with `W` frozen:

- forward: one fused kernel whose only output is `y`, so a dead `y` costs
  nothing; the backward pass recomputes `x @ A` `[M, R]` in float32 (an XLA
  dot reading `x` once) rather than keeping it;
- `dx = dy @ W^T + scale * (dy @ B^T) @ A^T`: the same fused kernel with
  `W` read transposed in its stored layout; it also returns `dy @ B^T`;
- `dA = scale * x^T @ (dy @ B^T)` and `dB = scale * (x @ A)^T @ dy`: XLA
  matmuls. Both are `R`-wide products contracting over the M rows; their
  cost is reading `x` and `dy` once, which an XLA dot already does at the
  memory roofline, and fusing them into the `dx` kernel would need a
  `[K, R]` or `[R, N]` float32 accumulator resident across all row blocks.
- `W`'s cotangent is zero: the base weight is frozen (no `dW` is computed).

The fused kernel (`fused_matmul`; its body is
`pallas_tpu_kernel.lora_matmul_kernel`) loads each `x` tile once and
multiplies it by the `W` tile and the `A` tile; the rank-R product `x @ A`
accumulates in float32 VMEM scratch and is multiplied by `B` in the epilogue
of each output tile. `x @ A` is computed only for the first output column
block of each row block (its `A` block index is pinned afterwards so it is
not fetched again) and reused for the others, so the low-rank FLOPs are paid
once per row block. Its layouts (all reshapes of the caller's arrays):

- `x` is `[Cx, M, Kc/Cx]`: the contraction axis split into `Cx` groups (the
  `C` of a `CBSKH` output gradient), usually `Cx = 1`.
- `w` is `[G, Kc, No/G]` (or `[G, No, Kc/G]` with `transpose_w`): `G`
  independent weight groups along the output (or contraction) axis, e.g.
  the heads of a `NDH` einsum weight, so no transpose of `W` is needed.
- `out` is `[Co, M, No/Co]` (the `C` of a `CBSKH` output).
- `w_scale` (int8 `w` only): float32 per-channel scales of `W`'s last axis
  (`[G, 1, No/G]`, or `[G, 1, Kc/G]` with `transpose_w`); the tile is
  dequantized in VMEM before the MXU.
- `adapter_ids` `[M, 1]` int32 (optional): column `c` of `A`/`B` belongs to
  adapter `c // rank`; row `m` keeps only its adapter's columns of `x @ A`.
  Rows with an id outside `[0, R // rank)` get no low-rank term.

Dimensions: `M` any (the last row block may be partial: rows never mix);
`K` and `N` are used whole when smaller than their tiles, tiled when they
are multiples of 128 (all Gemma 4 shapes), and otherwise zero-padded to a
multiple of 128 (a copy of `W`). The rank (times the number of adapters) is
zero-padded to a multiple of 128 lanes. Arguments are assumed valid
(`gemma4_jax.ops.lora_matmul` checks them).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.lora import adapters
from gemma4_jax.kernels.lora import pallas_tpu_kernel

NUM_LANES = _tpu.NUM_LANES
# The dtypes of `x` the kernel takes (`ops.lora.kernel_takes`).
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# v5e's default scoped VMEM is 16 MiB; the default tiles need ~9 MiB in bf16
# and ~15 MiB in f32 (double-buffered inputs and output, f32 accumulators),
# so the limit is raised deliberately for f32 inputs and larger ranks.
VMEM_LIMIT_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the fused kernel: rows `tm`, contraction `tk`, output `tn`.

  Multiples of 128 fill v5e's 128x128 MXU; a dimension smaller than its
  tile is taken whole.
  """
  tm: int = 512
  tk: int = 512
  tn: int = 1024

  def __post_init__(self):
    _tpu.check_block_sizes(self, tm=NUM_LANES, tk=NUM_LANES, tn=NUM_LANES)

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


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
  if adapter_ids is None:
    a_cat, b_cat, rank = a, b, a.shape[-1]
  else:
    a_cat, b_cat, rank = adapters.stack_adapters(a, b)
  if w_scale is not None:
    w_scale = w_scale.reshape(1, 1, -1)
  out = grouped_lora_matmul(x, w[None], a_cat, b_cat, scale=scale, rank=rank,
                            adapter_ids=adapter_ids, w_scale=w_scale,
                            block_sizes=block_sizes, interpret=interpret)
  return out[0]


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
  k_pad, n_pad = _padded_sizes(k, groups, n_per_w, out_groups, block_sizes)
  r_pad = _tpu.round_up(max(a_cat.shape[1], 1), NUM_LANES)
  # Only a single group is ever padded along N, so w's last axis is padded
  # to its share `n_pad // groups` (padding it to n_pad would copy W G times
  # over: 96 MiB for the 8 x 512 query heads).
  x = _tpu.pad_axis(x, 1, k_pad)
  w = _tpu.pad_axis(_tpu.pad_axis(w, 1, k_pad), 2, n_pad // groups)
  if w_scale is not None:
    w_scale = _tpu.pad_axis(w_scale.astype(jnp.float32), 2, n_pad // groups)
  a_cat = _tpu.pad_axis(_tpu.pad_axis(a_cat, 0, k_pad), 1, r_pad)
  b_cat = _tpu.pad_axis(_tpu.pad_axis(b_cat, 0, r_pad), 1, n_pad)
  ids = None if adapter_ids is None else adapter_ids.astype(
      jnp.int32).reshape(m, 1)
  n_segments = (n_pad // groups, n_pad // out_groups)
  config = _Config(
      scale=float(scale), rank=rank, out_groups=out_groups,
      tm=m if m <= block_sizes.tm else block_sizes.tm,
      tk=pick_tile((k_pad,), block_sizes.tk),
      tn=pick_tile(n_segments, block_sizes.tn),
      tk_bwd=pick_tile(n_segments, block_sizes.tk),
      tn_bwd=pick_tile((k_pad,), block_sizes.tn),
      interpret=interpret)
  out = _fused(x, jax.lax.stop_gradient(w), w_scale, a_cat, b_cat, ids,
               config)
  return out[:, :, :groups * n_per_w // out_groups]


def _padded_sizes(k, groups, n_per_w, out_groups, block_sizes):
  """`(K, N)` padded to a multiple of 128 where no tile divides them.

  K is tiled by `tk` forward and `tn` in the `dx` kernel, N the other way
  round. A grouped layout must already be tileable.
  """
  n = groups * n_per_w
  if n % out_groups:
    raise ValueError(f"out_groups={out_groups} does not divide N={n}")
  tileable_k = (pick_tile((k,), block_sizes.tk) and
                pick_tile((k,), block_sizes.tn))
  n_segments = (n_per_w, n // out_groups)
  tileable_n = (pick_tile(n_segments, block_sizes.tn) and
                pick_tile(n_segments, block_sizes.tk))
  if not tileable_n and (groups > 1 or out_groups > 1):
    raise ValueError(f"grouped layout G={groups}, Nw={n_per_w}, "
                     f"Co={out_groups} has no common tile; use G = Co = 1")
  return (k if tileable_k else _tpu.round_up(k, NUM_LANES),
          n if tileable_n else _tpu.round_up(n, NUM_LANES))


def pick_tile(segments: tuple[int, ...], default: int) -> int | None:
  """The largest tile that divides every segment length, or None.

  A tile equal to the segments' common length is always allowed when it is
  at most `default` (a block may span a whole axis); otherwise the tile is a
  multiple of 128 lanes no larger than `default`.
  """
  common = functools.reduce(math.gcd, segments, 0)
  if common <= default and all(s == common for s in segments):
    return common
  tile = default - default % NUM_LANES
  while tile >= NUM_LANES:
    if common % tile == 0:
      return tile
    tile -= NUM_LANES
  return None


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
  return fused_matmul(
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
  dx, g = fused_matmul(
      dy, w, b.T, a.T, scale=config.scale, rank=config.rank,
      adapter_ids=ids, w_scale=w_scale, transpose_w=True,
      tm=config.tm, tk=config.tk_bwd, tn=config.tn_bwd, save_down=True,
      interpret=config.interpret)
  # In float32 (on TPU, DEFAULT precision is one bf16 MXU pass anyway; on
  # CPU, XLA has no bf16 x bf16 -> f32 dot).
  x32 = x.astype(jnp.float32)
  down = jnp.dot(x32, a.astype(jnp.float32))  # [M, R], unscaled
  if ids is not None:
    down = adapters.own_adapter_columns(down, ids, config.rank)
  d_a = config.scale * jax.lax.dot_general(
      x32, g, (((0,), (0,)), ((), ())))  # [K, R]
  d_b = config.scale * jnp.einsum(
      "mr,cmn->rcn", down, dy.astype(jnp.float32)).reshape(b.shape)  # [R, N]
  return dx[0], None, None, d_a.astype(a.dtype), d_b.astype(b.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_matmul(x, w, a, b, *, scale: float, rank: int, adapter_ids=None,
                 w_scale=None, transpose_w: bool = False,
                 out_groups: int = 1, tm: int, tk: int, tn: int,
                 save_down: bool = False, interpret: bool = False):
  """Runs the fused kernel (see the module docstring for layouts).

  Args:
    x: `[Cx, M, Kc/Cx]`, float.
    w: `[G, Kc, No/G]`, or `[G, No, Kc/G]` with `transpose_w`; float, or
      int8 with `w_scale`.
    a: `[Kc, R]`; b: `[R, No]`; R a multiple of 128.
    scale: multiplies `x @ A` before `@ B`.
    rank: columns per adapter (for `adapter_ids`).
    adapter_ids: optional `[M, 1]` int32.
    w_scale: float32 per-channel scales for an int8 `w` (module docstring).
    transpose_w: contract with `w`'s last axis instead of its middle one.
    out_groups: `Co`; the output is `[Co, M, No/Co]`.
    tm, tk, tn: tiles; `tk` divides `Kc/Cx` (and `Kc/G` when transposed),
      `tn` divides `No/Co` (and `No/G` when not transposed).
    save_down: also return `mask(x @ A)` `[M, R]` float32 (unscaled).
    interpret: run in interpret mode.

  Returns:
    `out` `[Co, M, No/Co]` in x's dtype, and `down` if `save_down`.
  """
  m = x.shape[1]
  kc, r_pad = a.shape
  no = b.shape[1]
  _check_tiles(x, w, kc, no, transpose_w=transpose_w, out_groups=out_groups,
               tk=tk, tn=tn)
  in_specs, args = _in_specs(adapter_ids, x, w, w_scale, a, b,
                             transpose_w=transpose_w, tm=tm, tk=tk, tn=tn)
  out_shape, out_specs = _out_specs(m, no, r_pad, x.dtype,
                                    out_groups=out_groups, tm=tm, tn=tn,
                                    save_down=save_down)
  kernel = functools.partial(
      pallas_tpu_kernel.lora_matmul_kernel, scale=scale, rank=rank,
      num_k=kc // tk, has_ids=adapter_ids is not None,
      has_w_scale=w_scale is not None, transpose_w=transpose_w,
      save_down=save_down)
  outputs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(pl.cdiv(m, tm), no // tn, kc // tk),
          in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32),
                          pltpu.VMEM((tm, r_pad), jnp.float32)]),
      # The column axis reuses x @ A from its first block: sequential.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=VMEM_LIMIT_BYTES),
      cost_estimate=cost_estimate(
          m=m, kc=kc, no=no, r_pad=r_pad, tm=tm, tn=tn, x_dtype=x.dtype,
          w_dtype=w.dtype, lora_dtype=a.dtype, save_down=save_down),
      interpret=interpret,
      name="lora_matmul_dx" if transpose_w else "lora_matmul_fwd",
  )(*args)
  return tuple(outputs) if save_down else outputs[0]


def _check_tiles(x, w, kc, no, *, transpose_w, out_groups, tk, tn):
  """Each tile divides every segment of the axis it tiles."""
  groups = w.shape[0]
  for name, size, tile in (
      ("Kc/Cx", x.shape[2], tk),
      ("Kc/G", kc // groups if transpose_w else kc, tk),
      ("No/Co", no // out_groups, tn),
      ("No/G", no if transpose_w else no // groups, tn)):
    if size % tile:
      raise ValueError(f"fused_matmul: tile {tile} does not divide {name}="
                       f"{size}")


def _in_specs(adapter_ids, x, w, w_scale, a, b, *, transpose_w, tm, tk, tn):
  """The inputs' blocks on the grid `(row i, output column j, contraction
  k)`, and the inputs in the kernel's order."""
  kc, r_pad = a.shape
  groups, num_k = w.shape[0], kc // tk

  def x_map(i, j, k):
    group, block = _split(k, x.shape[2] // tk)
    return group, i, block

  # w's block (group, block along its last axis, block along its middle).
  if transpose_w:  # w [G, No, Kc/G]: its groups split the contraction
    w_block, ws_block = (None, tn, tk), (None, 1, tk)
    def w_blocks(j, k):
      group, block = _split(k, kc // groups // tk)
      return group, block, j
  else:  # w [G, Kc, No/G]: its groups split the output
    w_block, ws_block = (None, tk, tn), (None, 1, tn)
    def w_blocks(j, k):
      group, block = _split(j, b.shape[1] // groups // tn)
      return group, block, k

  def w_map(i, j, k):
    group, block, middle = w_blocks(j, k)
    return group, middle, block

  def ws_map(i, j, k):
    group, block, _ = w_blocks(j, k)
    return group, 0, block

  def a_map(i, j, k):
    # After the first column block, x @ A is done: keep the last A block
    # resident instead of fetching A again.
    return jnp.where(j == 0, k, num_k - 1), 0

  in_specs, args = [], []
  if adapter_ids is not None:
    in_specs.append(pl.BlockSpec((tm, 1), lambda i, j, k: (i, 0)))
    args.append(adapter_ids)
  in_specs += [pl.BlockSpec((None, tm, tk), x_map),
               pl.BlockSpec(w_block, w_map)]
  args += [x, w]
  if w_scale is not None:
    in_specs.append(pl.BlockSpec(ws_block, ws_map))
    args.append(w_scale)
  in_specs += [pl.BlockSpec((tk, r_pad), a_map),
               pl.BlockSpec((r_pad, tn), lambda i, j, k: (0, j))]
  args += [a, b]
  return in_specs, args


def _out_specs(m, no, r_pad, dtype, *, out_groups, tm, tn, save_down):
  """The outputs' shapes and blocks: `out`, and `down` if `save_down`."""
  no_per_out = no // out_groups

  def out_map(i, j, k):
    group, block = _split(j, no_per_out // tn)
    return group, i, block

  out_shape = [jax.ShapeDtypeStruct((out_groups, m, no_per_out), dtype)]
  out_specs = [pl.BlockSpec((None, tm, tn), out_map)]
  if save_down:
    out_shape.append(jax.ShapeDtypeStruct((m, r_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((tm, r_pad), lambda i, j, k: (i, 0)))
  return out_shape, out_specs


def _split(index, blocks_per_group: int):
  """A block index -> (group, block in group); non-negative, so lax.div."""
  if blocks_per_group == 1:
    return index, 0
  return (jax.lax.div(index, blocks_per_group),
          jax.lax.rem(index, blocks_per_group))


def cost_estimate(*, m, kc, no, r_pad, tm, tn, x_dtype, w_dtype, lora_dtype,
                  save_down) -> pl.CostEstimate:
  """FLOPs and HBM bytes of one `fused_matmul` call with these tiles.

  `x` is read once per output column block, `W` and `B` once per row block,
  `A` once per row block; the output (and `down`) written once.
  """
  row_blocks, col_blocks = pl.cdiv(m, tm), pl.cdiv(no, tn)
  item = lambda dtype: jnp.dtype(dtype).itemsize
  flops = 2 * m * kc * no + 2 * m * kc * r_pad + 2 * m * r_pad * no
  bytes_accessed = (
      m * kc * item(x_dtype) * col_blocks
      + kc * no * item(w_dtype) * row_blocks
      + (kc + no) * r_pad * item(lora_dtype) * row_blocks
      + m * no * item(x_dtype)
      + (m * r_pad * 4 if save_down else 0))
  return pl.CostEstimate(flops=flops, transcendentals=0,
                         bytes_accessed=bytes_accessed)
