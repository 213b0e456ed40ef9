"""Raw Pallas TPU kernel: a frozen matmul fused with a low-rank product.

`fused_matmul` computes `out = x @ W + scale * mask(x @ A) @ B` (or, with
`transpose_w`, `x @ W^T + ...`) in one pass over `x`: each `x` tile is loaded
once and multiplied by the `W` tile and the `A` tile; the rank-R product
`x @ A` accumulates in float32 VMEM scratch and is multiplied by `B` in the
epilogue of each output tile. `x @ A` is computed only for the first output
column block of each row block (its `A` block index is pinned afterwards so
it is not fetched again) and reused for the others, so the low-rank FLOPs
are paid once per row block.

The same kernel serves the forward pass (`x [M,K] @ W [K,N]`) and the input
gradient of the backward pass (`dy [M,N] @ W^T`, `A := B^T`, `B := A^T`) with
`W` read in its stored layout. Layouts (all reshapes of the caller's arrays):

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

Any `M` (the last row block may be partial: rows never mix); `Kc` and `No`
must be divisible by the tiles (the public wrappers pad).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

NUM_LANES = 128
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
    for name in ("tm", "tk", "tn"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < NUM_LANES or value % NUM_LANES:
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of "
                         f"{NUM_LANES}, got {value!r}")

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def pick_tile(segments: tuple[int, ...], default: int) -> int | None:
  """The largest tile that divides every segment length, or None.

  A tile equal to the segments' common length is always allowed when it is
  at most `default` (a block may span a whole axis); otherwise the tile is a
  multiple of 128 lanes no larger than `default`.
  """
  common = 0
  for s in segments:
    common = _gcd(common, s)
  if common <= default and all(s == common for s in segments):
    return common
  tile = default - default % NUM_LANES
  while tile >= NUM_LANES:
    if common % tile == 0:
      return tile
    tile -= NUM_LANES
  return None


def _gcd(a, b):
  while b:
    a, b = b, a % b
  return a


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
  x_groups, m, kc_per_x = x.shape
  groups = w.shape[0]
  kc, r_pad = a.shape
  no = b.shape[1]
  kc_per_w = kc // groups if transpose_w else kc
  no_per_w = no if transpose_w else no // groups
  no_per_out = no // out_groups
  for name, size, tile in (("Kc/Cx", kc_per_x, tk), ("Kc/G", kc_per_w, tk),
                           ("No/Co", no_per_out, tn), ("No/G", no_per_w, tn)):
    if size % tile:
      raise ValueError(f"fused_matmul: tile {tile} does not divide {name}="
                       f"{size}")
  num_k, num_n = kc // tk, no // tn
  kx, kw, nw, nout = kc_per_x // tk, kc_per_w // tk, no_per_w // tn, (
      no_per_out // tn)
  grid = (pl.cdiv(m, tm), num_n, num_k)

  def x_map(i, j, k):
    group, block = _split(k, kx)
    return group, i, block

  if transpose_w:
    w_block = (None, tn, tk)
    def w_map(i, j, k):
      group, block = _split(k, kw)
      return group, j, block
    ws_block = (None, 1, tk)
    def ws_map(i, j, k):
      group, block = _split(k, kw)
      return group, 0, block
  else:
    w_block = (None, tk, tn)
    def w_map(i, j, k):
      group, block = _split(j, nw)
      return group, k, block
    ws_block = (None, 1, tn)
    def ws_map(i, j, k):
      group, block = _split(j, nw)
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

  out_shape = [jax.ShapeDtypeStruct((out_groups, m, no_per_out), x.dtype)]
  def out_map(i, j, k):
    group, block = _split(j, nout)
    return group, i, block
  out_specs = [pl.BlockSpec((None, tm, tn), out_map)]
  if save_down:
    out_shape.append(jax.ShapeDtypeStruct((m, r_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((tm, r_pad), lambda i, j, k: (i, 0)))

  kernel = functools.partial(
      _fused_kernel, scale=scale, rank=rank, num_k=num_k,
      has_ids=adapter_ids is not None, has_w_scale=w_scale is not None,
      transpose_w=transpose_w, save_down=save_down)
  outputs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=in_specs,
          out_specs=out_specs,
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
  )(*args)
  return tuple(outputs) if save_down else outputs[0]


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


def _fused_kernel(*refs, scale, rank, num_k, has_ids, has_w_scale,
                  transpose_w, save_down):
  refs = list(refs)
  ids_ref = refs.pop(0) if has_ids else None
  x_ref, w_ref = refs.pop(0), refs.pop(0)
  ws_ref = refs.pop(0) if has_w_scale else None
  a_ref, b_ref, out_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  down_out_ref = refs.pop(0) if save_down else None
  acc_ref, down_ref = refs
  j, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _init_acc():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((j == 0) & (k == 0))
  def _init_down():
    down_ref[...] = jnp.zeros_like(down_ref)

  x = x_ref[...]
  w = w_ref[...]
  if has_w_scale:  # int8 weight: dequantize the tile for the MXU
    w = (w.astype(jnp.float32) * ws_ref[...]).astype(x.dtype)
  if transpose_w:
    base = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
  else:
    base = jnp.dot(x, w, preferred_element_type=jnp.float32)
  acc_ref[...] += base

  @pl.when(j == 0)
  def _down():
    down_ref[...] += jnp.dot(x, a_ref[...].astype(x.dtype),
                             preferred_element_type=jnp.float32)

  @pl.when(k == num_k - 1)
  def _epilogue():
    down = down_ref[...]
    if has_ids:
      column_adapter = jax.lax.div(
          jax.lax.broadcasted_iota(jnp.int32, down.shape, 1), rank)
      down = jnp.where(column_adapter == ids_ref[...], down, 0.0)
    if save_down:
      down_out_ref[...] = down
    # Kept in float32: the rank-R intermediate is not rounded to x's dtype.
    delta = jnp.dot(down * scale, b_ref[...].astype(jnp.float32),
                    preferred_element_type=jnp.float32)
    out_ref[...] = (acc_ref[...] + delta).astype(out_ref.dtype)
