"""Gemma 4 flash attention as Pallas TPU kernels: forward, dq and dk/dv.

One tile holds every query head that shares a kv head (MQA/GQA): q is laid
out `[B, K, G, T, H]` and a `(G, block_q, H)` tile is the `G * block_q` rows
of one matmul against a single K/V tile load. Softmax statistics and
accumulators are float32 VMEM scratch; the forward saves only the output and
the logsumexp, from which the backward recomputes the probabilities.

Which tiles run comes from a scalar-prefetched schedule (`block_mask`): a
query block visits only the key blocks that its causal / sliding window /
mask / segment ids leave visible, skipped tiles are neither fetched nor
computed, and FULL tiles skip the mask work. Any T and S: queries are padded
to a block multiple (the padding rows are dropped), keys use a `cdiv` grid
whose ragged last block is masked and has its out-of-range K/V rows zeroed,
since that memory may hold anything, NaN included. A query with no visible
key gets output 0, logsumexp +inf and zero gradients.

This module holds the entry point, the custom_vjp and the pallas_calls; the
kernel bodies and their tile math are in `pallas_tpu_kernel`, the schedules
in `block_mask`. Arguments are checked by `gemma4_jax.ops.attention`: the
entry point assumes valid input and checks only its own tile configuration.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from gemma4_jax import masks
from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels import attention as attention_names
from gemma4_jax.kernels.attention import block_mask
from gemma4_jax.kernels.attention import pallas_tpu_kernel as kernel

# int8 mask tiles pack 32 rows per sublane tile; bf16 16, f32 8.
BLOCK_Q_MULTIPLE = 32
# Budget ceiling under v5e's 128 MiB of VMEM, leaving room for Mosaic.
MAX_VMEM_LIMIT = 100 * 2**20
MIN_VMEM_LIMIT = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: `block_q` query positions (times the G heads sharing a kv
  head: the tile has `G * block_q` rows) against `block_kv` keys.

  VMEM per grid step, bf16, v5e defaults (R = G * block_q = 1024 rows,
  block_kv = 512; double-buffered q/o/do tiles 2 x R x H x 2 B each, K and V
  2 x 512 x H x 2 B each, lse/di R x 4 B blocks widened in VMEM to R x 128 x
  4 B each, f32 temporaries
  R x 512 x 4 B = 2 MiB each (s, p, masks; dp, ds in the backward), f32
  accumulators):
    head_dim 256: fwd 14 MiB, dq 17 MiB, dk/dv 18 MiB;
    head_dim 512: fwd 18 MiB, dq 22 MiB, dk/dv 22 MiB.
  `_vmem_limit` computes the same sum and asks for twice it, clamped to
  32-100 MiB (v5e has 128 MiB; the default scoped limit is 16 MiB).
  """
  block_q: int
  block_kv: int

  def __post_init__(self):
    if self.block_q <= 0 or self.block_q % BLOCK_Q_MULTIPLE:
      raise ValueError(f"block_q must be a positive multiple of "
                       f"{BLOCK_Q_MULTIPLE}, got {self.block_q}")
    if self.block_kv <= 0 or self.block_kv % _tpu.NUM_LANES:
      raise ValueError(f"block_kv must be a positive multiple of "
                       f"{_tpu.NUM_LANES}, got {self.block_kv}")

  @classmethod
  def get_default(cls, *, group: int, head_dim: int) -> BlockSizes:
    """About 1024 tile rows and 512 keys: the MXU is fed 1024x512 logits
    per step, and window/causal skipping keeps a 512-key granularity.
    `block_q` is a multiple of 128: the logsumexp blocks are lane-major."""
    del head_dim  # 256 and 512 both fit the same tiles (see the budget).
    block_q = min(512, max(_tpu.NUM_LANES, 1024 // group))
    return cls(block_q=block_q // _tpu.NUM_LANES * _tpu.NUM_LANES, block_kv=512)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shape of a `block_mask.Schedule` (its entries are an array)."""
  batch: int
  heads: int
  rows: int
  steps: int

  @classmethod
  def of(cls, schedule: block_mask.Schedule) -> Layout:
    return cls(schedule.batch, schedule.heads, schedule.rows, schedule.steps)


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything the kernels specialize on (hashable: a custom_vjp nondiff)."""
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  group: int
  causal: bool
  sliding_window: int | None
  softcap: float | None
  scale: float
  mask_group: int  # heads per mask tile: 0 (no mask), 1 or group
  mask_batch: int
  mask_heads: int
  mask_rows: int  # block_q, or 1 for a key mask
  segments: bool
  fwd: Layout
  dkv: Layout
  interpret: bool

  @property
  def rows(self) -> int:
    return self.group * self.block_q

  @property
  def ragged_kv(self) -> bool:
    return self.kv_len % self.block_kv != 0


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None, interpret=False,
              block_sizes=None):
  """Gemma 4 attention on TPU; same semantics as the float32 reference.

  The arguments are assumed valid (`gemma4_jax.ops.attention` checks them);
  only the tile configuration is checked here.

  Args:
    q: `[B, T, N, H]` queries, float32 or bfloat16.
    k, v: `[B, S, K, H]`, N % K == 0, q's dtype. Query i is at position
      i + S - T.
    mask: optional boolean (True = may attend) `[T,S]`, `[B,T,S]`,
      `[B,1,T,S]` or `[B,N,T,S]`; B, N and T axes of size 1 broadcast.
    segment_ids: optional `[B,T]` ints (T == S) or a `(q [B,T], kv [B,S])`
      pair.
    causal: key j visible iff j <= i + S - T.
    sliding_window: W > 0: additionally j > i + S - T - W.
    softcap: c > 0: logits become c * tanh(logits / c).
    scale: multiplies q k^T; default H ** -0.5.
    interpret: run the kernels in Pallas interpret mode (CPU).
    block_sizes: `BlockSizes`, default `BlockSizes.get_default`.

  Returns:
    `[B, T, N, H]` in q's dtype; a query with no visible key gives 0.

  Raises:
    TypeError: `block_sizes` is not a `BlockSizes`.
    ValueError: `block_q` is not a multiple of 128 on TPU while T needs
      more than one query block.
  """
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got "
                    f"{type(block_sizes).__name__}")
  batch, q_len, num_heads, _ = q.shape
  kv_len = k.shape[1]
  if mask is not None:
    mask = masks.canonical_mask(mask, batch=batch, num_heads=num_heads,
                                q_len=q_len, kv_len=kv_len)
  if segment_ids is not None:
    segment_ids = masks.canonical_segment_ids(
        segment_ids, batch=batch, q_len=q_len, kv_len=kv_len)
  block_q, block_kv, fwd_schedule, dkv_schedule = block_schedules(
      q.shape, k.shape, mask=mask, segment_ids=segment_ids, causal=causal,
      sliding_window=sliding_window, block_sizes=block_sizes)
  if not interpret and fwd_schedule.rows > 1 and block_q % _tpu.NUM_LANES:
    # The logsumexp is stored lane-major, [.., T]: a block of it is a whole
    # number of 128-lane tiles unless it spans all of T.
    raise ValueError(f"block_q must be a multiple of {_tpu.NUM_LANES} on TPU "
                     f"when T={q_len} needs more than one query block, got "
                     f"{block_q}")
  padded_q_len = fwd_schedule.rows * block_q
  mask_i8 = None if mask is None else _mask_tiles(
      mask, num_heads // k.shape[2], padded_q_len)
  q_ids, kv_ids = (None, None) if segment_ids is None else _segment_tiles(
      segment_ids, padded_q_len)
  static = _static(
      q.shape, k.shape, mask_i8, segments=segment_ids is not None,
      block_q=block_q, block_kv=block_kv, fwd=fwd_schedule, dkv=dkv_schedule,
      causal=causal, sliding_window=sliding_window, softcap=softcap,
      scale=scale, interpret=interpret)
  return _attention(q, k, v, fwd_schedule.entries, dkv_schedule.entries,
                    mask_i8, q_ids, kv_ids, static)


def block_schedules(q_shape, kv_shape, *, mask=None, segment_ids=None,
                    causal=True, sliding_window=None, block_sizes=None):
  """The tiles and visiting schedules `attention` runs with.

  Args:
    q_shape, kv_shape: `(B, T, N, H)` and `(B, S, K, H)`.
    mask, segment_ids: canonical (`masks.canonical_mask`,
      `masks.canonical_segment_ids`) or None.
    causal, sliding_window, block_sizes: as for `attention`.

  Returns:
    `(block_q, block_kv, forward schedule, dk/dv schedule)`; the forward one
    also drives dq. Static rules make constant schedules; a mask or segment
    ids add the pre-pass over them.
  """
  _, q_len, num_heads, head_dim = q_shape
  kv_len, num_kv_heads = kv_shape[1], kv_shape[2]
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(group=num_heads // num_kv_heads,
                                         head_dim=head_dim)
  block_q = min(block_sizes.block_q, _tpu.round_up(q_len, BLOCK_Q_MULTIPLE))
  block_kv = min(block_sizes.block_kv, _tpu.round_up(kv_len, _tpu.NUM_LANES))
  kinds = block_mask.static_kinds(
      q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
      causal=causal, sliding_window=sliding_window)[None, None]
  # Dynamic rules only remove tiles: the static counts bound the lists.
  fwd_steps = block_mask.max_count(kinds, axis=-1)
  dkv_steps = block_mask.max_count(kinds, axis=-2)
  dynamic = []
  if mask is not None:
    dynamic.append(block_mask.mask_kinds(
        mask, q_len=q_len, block_q=block_q, block_kv=block_kv,
        num_kv_heads=num_kv_heads))
  if segment_ids is not None:
    dynamic.append(block_mask.segment_kinds(
        *segment_ids, block_q=block_q, block_kv=block_kv))
  if dynamic:
    kinds = block_mask.combine(jnp.asarray(kinds), *dynamic)
  return (block_q, block_kv, block_mask.compact(kinds, fwd_steps),
          block_mask.compact(kinds.swapaxes(-1, -2), dkv_steps))


def _mask_tiles(mask, group: int, padded_q_len: int):
  """A canonical mask as int8 `[B|1, K|N|1, G|1, T_padded|1, S]`: the heads
  sharing a kv head side by side, as a tile holds them."""
  mb, mn, mt, kv_len = mask.shape
  mask_group = group if mn > 1 else 1
  mask_i8 = mask.reshape(mb, mn // mask_group, mask_group, mt,
                         kv_len).astype(jnp.int8)
  # A key mask stays [.., 1, S]: its tiles are (G|1, 1, block_kv).
  return mask_i8 if mt == 1 else _tpu.pad_axis(mask_i8, 3, padded_q_len)


def _segment_tiles(segment_ids, padded_q_len: int):
  """Canonical segment ids as the kernels read them: q ids `[B, T_padded,
  128]` lane-replicated, kv ids `[B, 8, S]` sublane-replicated."""
  q_seg, kv_seg = segment_ids
  batch, q_len = q_seg.shape
  q_seg = jnp.pad(q_seg, ((0, 0), (0, padded_q_len - q_len)), mode="edge")
  q_ids = jnp.broadcast_to(q_seg[:, :, None],
                           (batch, padded_q_len, _tpu.NUM_LANES))
  kv_ids = jnp.broadcast_to(kv_seg[:, None, :],
                            (batch, _tpu.NUM_SUBLANES, kv_seg.shape[1]))
  return q_ids, kv_ids


def _static(q_shape, kv_shape, mask_i8, *, segments, block_q, block_kv, fwd,
            dkv, causal, sliding_window, softcap, scale, interpret) -> Static:
  """What the kernels specialize on, for one call."""
  _, q_len, num_heads, head_dim = q_shape
  kv_len, num_kv_heads = kv_shape[1], kv_shape[2]
  no_mask = mask_i8 is None
  return Static(
      q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
      group=num_heads // num_kv_heads, causal=causal,
      sliding_window=sliding_window,
      softcap=None if softcap is None else float(softcap),
      scale=float(head_dim ** -0.5 if scale is None else scale),
      mask_group=0 if no_mask else mask_i8.shape[2],
      mask_batch=0 if no_mask else mask_i8.shape[0],
      mask_heads=0 if no_mask else mask_i8.shape[1],
      mask_rows=0 if no_mask else min(mask_i8.shape[3], block_q),
      segments=segments, fwd=Layout.of(fwd), dkv=Layout.of(dkv),
      interpret=interpret)


# The custom_vjp takes and returns Tunix's [B, T, N, H] layout and keeps its
# residuals (q, k, v, out) in it: in a model, out is also the next einsum's
# saved input, so a kernel-layout copy would be a second [B, T, N, H] per
# layer alive until the backward pass. The kernel layouts are made on the fly
# in the forward and again in the backward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, fwd_entries, dkv_entries, mask, q_ids, kv_ids,
               static):
  return _attention_fwd(q, k, v, fwd_entries, dkv_entries, mask, q_ids,
                        kv_ids, static)[0]


def _attention_fwd(q, k, v, fwd_entries, dkv_entries, mask, q_ids, kv_ids,
                   static):
  qt, kt, vt = _to_kernel_layout(q, k, v, static)
  out, lse = _forward(qt, kt, vt, fwd_entries, mask, q_ids, kv_ids, static)
  out = checkpoint_name(_rows_from_kernel(out, static), attention_names.OUTPUT)
  lse = checkpoint_name(lse, attention_names.LOGSUMEXP)
  return out, (q, k, v, fwd_entries, dkv_entries, mask, q_ids, kv_ids, out,
               lse)


def _attention_bwd(static, residuals, d_out):
  q, k, v, fwd_entries, dkv_entries, mask, q_ids, kv_ids, out, lse = residuals
  qt, kt, vt = _to_kernel_layout(q, k, v, static)
  di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
               keepdims=True)  # [B, T, N, 1]
  di = _rows_to_kernel(di, static)[..., 0]
  d_out = _rows_to_kernel(d_out, static)
  dq = _backward_dq(qt, kt, vt, d_out, lse, di, fwd_entries, mask, q_ids,
                    kv_ids, static)
  dk, dv = _backward_dkv(qt, kt, vt, d_out, lse, di, dkv_entries, mask, q_ids,
                         kv_ids, static)
  dk, dv = (x[:, :, :static.kv_len].transpose(0, 2, 1, 3) for x in (dk, dv))
  return (_rows_from_kernel(dq, static), dk, dv, None, None, None, None,
          None)


def _rows_to_kernel(x, static):
  """`[B, T, N, H]` -> `[B, K, G, T_padded, H]` (zero rows past T)."""
  batch, q_len, num_heads, width = x.shape
  x = x.reshape(batch, q_len, num_heads // static.group, static.group, width)
  return _tpu.pad_axis(x.transpose(0, 2, 3, 1, 4), 3,
                       _tpu.round_up(q_len, static.block_q))


def _rows_from_kernel(x, static):
  """`[B, K, G, T_padded, H]` -> `[B, T, N, H]`."""
  batch, num_kv_heads, group, _, width = x.shape
  x = x[:, :, :, :static.q_len].transpose(0, 3, 1, 2, 4)
  return x.reshape(batch, static.q_len, num_kv_heads * group, width)


def _to_kernel_layout(q, k, v, static):
  kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))
  if static.kv_len < static.block_kv:  # a block never exceeds its array
    kt, vt = (_tpu.pad_axis(x, 2, static.block_kv) for x in (kt, vt))
  return _rows_to_kernel(q, static), kt, vt


_attention.defvjp(_attention_fwd, _attention_bwd)


# Index maps. Every grid is (batch, kv head, row, step): the rows walk the q
# blocks (forward, dq) or the kv blocks (dk/dv), and the step's schedule
# entry names the block of the other operand. The maps are written once, in
# terms of the q and kv block at a grid point; which of the two is the row
# and which comes from the schedule is the grid's only difference.


@dataclasses.dataclass(frozen=True)
class _Specs:
  """The BlockSpecs of one grid."""
  q: pl.BlockSpec  # q, d_out, out, dq: (G, block_q, H)
  kv: pl.BlockSpec  # k, v, dk, dv: (block_kv, H)
  stats: pl.BlockSpec  # lse, di: lane-major (G, block_q)
  masks: list  # mask, q ids, kv ids: a BlockSpec, or None when absent

  def inputs(self, *, grads):
    """The in_specs of `(q, k, v, [d_out, lse, di,] mask, q_ids, kv_ids)`:
    the backward kernels (`grads`) also read d_out, lse and di."""
    d_out_lse_di = [self.q, self.stats, self.stats] if grads else []
    return [self.q, self.kv, self.kv, *d_out_lse_di, *self.masks]


def _grid_specs(static, head_dim, *, rows):
  """BlockSpecs of the grid whose rows walk `rows`: "q" (the forward and dq
  grids, `static.fwd`) or "kv" (the dk/dv grid, `static.dkv`)."""
  layout = static.fwd if rows == "q" else static.dkv

  def row_block(b, h, row, step, entries_ref):
    del b, h, step, entries_ref
    return row

  def step_block(b, h, row, step, entries_ref):
    block, _, _ = kernel.entry(layout, entries_ref, b, h, row, step)
    return block

  def mask_blocks(b, h, row, step, entries_ref):
    """(q block, kv block) of the resident mask tile: the step's own for a
    PARTIAL entry, the last PARTIAL one's otherwise (`block_mask`)."""
    _, _, mask_block = kernel.entry(layout, entries_ref, b, h, row, step)
    return (row, mask_block) if rows == "q" else (mask_block, row)

  q_block, kv_block = ((row_block, step_block) if rows == "q" else
                       (step_block, row_block))

  def q_map(b, h, row, step, entries_ref):
    return b, h, 0, q_block(b, h, row, step, entries_ref), 0

  def kv_map(b, h, row, step, entries_ref):
    return b, h, kv_block(b, h, row, step, entries_ref), 0

  def mask_map(b, h, row, step, entries_ref):
    mask_q, mask_kv = mask_blocks(b, h, row, step, entries_ref)
    return (b if static.mask_batch > 1 else 0,
            h if static.mask_heads > 1 else 0, 0,
            mask_q if static.mask_rows > 1 else 0, mask_kv)

  def q_ids_map(b, h, row, step, entries_ref):
    return b, q_block(b, h, row, step, entries_ref), 0

  def kv_ids_map(b, h, row, step, entries_ref):
    return b, 0, kv_block(b, h, row, step, entries_ref)

  g, bq, bkv = static.group, static.block_q, static.block_kv
  return _Specs(
      q=pl.BlockSpec((None, None, g, bq, head_dim), q_map),
      kv=pl.BlockSpec((None, None, bkv, head_dim), kv_map),
      stats=pl.BlockSpec((None, None, g, bq), lambda *args: q_map(*args)[:4]),
      masks=_mask_specs(static, mask_map, q_ids_map, kv_ids_map))


def _mask_specs(static, mask_map, q_ids_map, kv_ids_map):
  specs = [None, None, None]
  if static.mask_group:
    specs[0] = pl.BlockSpec(
        (None, None, static.mask_group, static.mask_rows, static.block_kv),
        mask_map)
  if static.segments:
    specs[1] = pl.BlockSpec((None, static.block_q, _tpu.NUM_LANES), q_ids_map)
    specs[2] = pl.BlockSpec((None, _tpu.NUM_SUBLANES, static.block_kv),
                            kv_ids_map)
  return specs


def _compiler_params(static, q, which):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=_vmem_limit(static, q.shape[-1], q.dtype.itemsize,
                                   which))


def _vmem_limit(static, head_dim, itemsize, which) -> int:
  """Twice the per-step VMEM sum of the BlockSizes docstring, clamped."""
  rows, bkv = static.rows, static.block_kv
  row_tiles = {"fwd": 2, "dq": 3, "dkv": 2}[which]  # q, o / q, do, dq / q, do
  stat_tiles = {"fwd": 1, "dq": 2, "dkv": 2}[which]  # lse, di
  temporaries = {"fwd": 4, "dq": 5, "dkv": 6}[which]  # s, p, dp, ds, masks
  total = 2 * row_tiles * rows * head_dim * itemsize  # double-buffered
  total += 2 * 2 * bkv * head_dim * itemsize  # K, V
  # lse, di blocks and their lane-widened copies
  total += 2 * stat_tiles * rows * _tpu.NUM_LANES * 4
  total += 2 * max(static.mask_group, 1) * static.block_q * bkv  # int8 mask
  total += temporaries * rows * bkv * 4
  scratch = {"fwd": rows * (head_dim + 2 * _tpu.NUM_LANES),
             "dq": rows * head_dim, "dkv": 2 * bkv * head_dim}[which]
  total += 4 * scratch
  return int(min(MAX_VMEM_LIMIT, max(MIN_VMEM_LIMIT, 2 * total)))


def _cost(static, q, k, which):
  """Upper bound (all scheduled steps run) for XLA's scheduler."""
  batch, num_kv_heads, _, _, head_dim = q.shape
  layout = static.dkv if which == "dkv" else static.fwd
  tiles = batch * num_kv_heads * layout.rows * layout.steps
  tile_elems = static.rows * static.block_kv
  matmuls = {"fwd": 2, "dq": 3, "dkv": 4}[which]
  itemsize = q.dtype.itemsize
  bytes_accessed = (q.size * itemsize * {"fwd": 2, "dq": 3, "dkv": 2}[which]
                    + tiles * 2 * static.block_kv * head_dim * itemsize)
  del k
  return pl.CostEstimate(
      flops=2 * matmuls * tiles * tile_elems * head_dim,
      transcendentals=tiles * tile_elems * (2 if static.softcap else 1),
      bytes_accessed=int(bytes_accessed))


# pallas_calls.

def _forward(q, k, v, entries, mask, q_ids, kv_ids, static):
  batch, num_kv_heads, group, padded_q_len, head_dim = q.shape
  specs = _grid_specs(static, head_dim, rows="q")
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, num_kv_heads, group, padded_q_len),
                                    jnp.float32)]
  out, lse = pl.pallas_call(
      functools.partial(kernel.forward_kernel, static=static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, static.fwd.rows, static.fwd.steps),
          in_specs=specs.inputs(grads=False), out_specs=[specs.q, specs.stats],
          scratch_shapes=[  # m, l (lane-replicated), acc
              pltpu.VMEM((static.rows, _tpu.NUM_LANES), jnp.float32),
              pltpu.VMEM((static.rows, _tpu.NUM_LANES), jnp.float32),
              pltpu.VMEM((static.rows, head_dim), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=_compiler_params(static, q, "fwd"),
      cost_estimate=_cost(static, q, k, "fwd"),
      name="gemma4_flash_attention_fwd",
      interpret=static.interpret,
  )(entries, q, k, v, mask, q_ids, kv_ids)
  return out, lse


def _backward_dq(q, k, v, d_out, lse, di, entries, mask, q_ids, kv_ids,
                 static):
  batch, num_kv_heads, _, _, head_dim = q.shape
  specs = _grid_specs(static, head_dim, rows="q")
  return pl.pallas_call(
      functools.partial(kernel.dq_kernel, static=static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, static.fwd.rows, static.fwd.steps),
          in_specs=specs.inputs(grads=True), out_specs=specs.q,
          scratch_shapes=[pltpu.VMEM((static.rows, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(static, q, "dq"),
      cost_estimate=_cost(static, q, k, "dq"),
      name="gemma4_flash_attention_dq",
      interpret=static.interpret,
  )(entries, q, k, v, d_out, lse, di, mask, q_ids, kv_ids)


def _backward_dkv(q, k, v, d_out, lse, di, entries, mask, q_ids, kv_ids,
                  static):
  batch, num_kv_heads, _, _, head_dim = q.shape
  specs = _grid_specs(static, head_dim, rows="kv")
  kv_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return pl.pallas_call(
      functools.partial(kernel.dkv_kernel, static=static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, static.dkv.rows, static.dkv.steps),
          in_specs=specs.inputs(grads=True), out_specs=[specs.kv, specs.kv],
          scratch_shapes=[
              pltpu.VMEM((static.block_kv, head_dim), jnp.float32),
              pltpu.VMEM((static.block_kv, head_dim), jnp.float32)]),
      out_shape=[kv_shape, kv_shape],
      compiler_params=_compiler_params(static, q, "dkv"),
      cost_estimate=_cost(static, q, k, "dkv"),
      name="gemma4_flash_attention_dkv",
      interpret=static.interpret,
  )(entries, q, k, v, d_out, lse, di, mask, q_ids, kv_ids)
