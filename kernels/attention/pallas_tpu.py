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

This module holds the public entry, the custom_vjp and the pallas_calls; the
tile math and kernel bodies are in `pallas_tpu_tiles`, the schedules in
`block_mask`.
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
from gemma4_jax.kernels import attention as attention_names
from gemma4_jax.kernels.attention import block_mask
from gemma4_jax.kernels.attention import pallas_tpu_tiles as tiles

NUM_LANES = tiles.NUM_LANES
NUM_SUBLANES = tiles.NUM_SUBLANES
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
    if self.block_kv <= 0 or self.block_kv % NUM_LANES:
      raise ValueError(f"block_kv must be a positive multiple of {NUM_LANES},"
                       f" got {self.block_kv}")

  @classmethod
  def get_default(cls, *, group: int, head_dim: int) -> BlockSizes:
    """About 1024 tile rows and 512 keys: the MXU is fed 1024x512 logits
    per step, and window/causal skipping keeps a 512-key granularity.
    `block_q` is a multiple of 128: the logsumexp blocks are lane-major."""
    del head_dim  # 256 and 512 both fit the same tiles (see the budget).
    block_q = min(512, max(NUM_LANES, 1024 // group))
    return cls(block_q=block_q // NUM_LANES * NUM_LANES, block_kv=512)


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None, interpret=False,
              block_sizes=None):
  """Gemma 4 attention on TPU; same semantics as the float32 reference.

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
    ValueError / TypeError: naming the argument, expected and actual.
  """
  _check_args(q, k, v, sliding_window=sliding_window, softcap=softcap,
              scale=scale, block_sizes=block_sizes)
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  if mask is not None:
    mask = masks.canonical_mask(mask, batch=batch, num_heads=num_heads,
                                q_len=q_len, kv_len=kv_len)
  if segment_ids is not None:
    segment_ids = masks.canonical_segment_ids(
        segment_ids, batch=batch, q_len=q_len, kv_len=kv_len)
  block_q, block_kv, fwd_schedule, dkv_schedule = block_schedules(
      q.shape, k.shape, mask=mask, segment_ids=segment_ids, causal=causal,
      sliding_window=sliding_window, block_sizes=block_sizes)
  padded_q_len = fwd_schedule.rows * block_q
  if not interpret and fwd_schedule.rows > 1 and block_q % NUM_LANES:
    # The logsumexp is stored lane-major, [.., T]: a block of it is a whole
    # number of 128-lane tiles unless it spans all of T.
    raise ValueError(f"block_q must be a multiple of {NUM_LANES} on TPU when "
                     f"T={q_len} needs more than one query block, got "
                     f"{block_q}")
  mask_group = 0
  q_ids = kv_ids = mask_i8 = None
  if mask is not None:
    mb, mn, mt = mask.shape[:3]
    mask_group = group if mn > 1 else 1
    mask_i8 = mask.reshape(mb, mn // mask_group, mask_group, mt,
                           kv_len).astype(jnp.int8)
    # A key mask stays [.., 1, S]: its tiles are (G|1, 1, block_kv).
    mask_i8 = jnp.pad(mask_i8, ((0, 0),) * 3 + ((0, padded_q_len - q_len)
                                                if mt > 1 else (0, 0),
                                                (0, 0)))
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    q_seg = jnp.pad(q_seg, ((0, 0), (0, padded_q_len - q_len)), mode="edge")
    q_ids = jnp.broadcast_to(q_seg[:, :, None],
                             (batch, padded_q_len, NUM_LANES))
    kv_ids = jnp.broadcast_to(kv_seg[:, None, :],
                              (batch, NUM_SUBLANES, kv_len))

  static = tiles.Static(
      q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
      group=group, causal=causal, sliding_window=sliding_window,
      softcap=None if softcap is None else float(softcap),
      scale=float(head_dim ** -0.5 if scale is None else scale),
      mask_group=mask_group,
      mask_batch=0 if mask_i8 is None else mask_i8.shape[0],
      mask_heads=0 if mask_i8 is None else mask_i8.shape[1],
      mask_rows=0 if mask_i8 is None else min(mask_i8.shape[3], block_q),
      segments=segment_ids is not None,
      fwd=tiles.layout(fwd_schedule), dkv=tiles.layout(dkv_schedule),
      interpret=interpret)
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
  block_q = min(block_sizes.block_q, _round_up(q_len, BLOCK_Q_MULTIPLE))
  block_kv = min(block_sizes.block_kv, _round_up(kv_len, NUM_LANES))
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


def _check_args(q, k, v, *, sliding_window, softcap, scale, block_sizes):
  for name, x, form in (("q", q, "[B,T,N,H]"), ("k", k, "[B,S,K,H]"),
                        ("v", v, "[B,S,K,H]")):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D {form}, got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise TypeError(f"{name} must be float32 or bfloat16, got {x.dtype}")
  if k.shape != v.shape or q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"k and v must have one shape and q's dtype; got q "
                     f"{q.dtype}, k {k.shape} {k.dtype}, v {v.shape} "
                     f"{v.dtype}")
  (batch, _, num_heads, head_dim), (kv_batch, _, num_kv_heads, kv_dim) = (
      q.shape, k.shape)
  if (kv_batch, kv_dim) != (batch, head_dim):
    raise ValueError(f"k/v batch and head_dim must match q's (B={batch}, "
                     f"H={head_dim}), got B={kv_batch}, H={kv_dim}")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} must be a multiple of kv "
                     f"heads K={num_kv_heads}")
  if sliding_window is not None and (not isinstance(sliding_window, int)
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None, got "
                     f"{sliding_window!r}")
  if softcap is not None and not (isinstance(softcap, (int, float))
                                  and softcap > 0):
    raise ValueError(f"softcap must be a positive number or None, got "
                     f"{softcap!r}")
  if scale is not None and not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python number or None, got "
                    f"{type(scale).__name__}")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got "
                    f"{type(block_sizes).__name__}")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


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
  padded = _round_up(q_len, static.block_q)
  return jnp.pad(x.transpose(0, 2, 3, 1, 4),
                 ((0, 0),) * 3 + ((0, padded - q_len), (0, 0)))


def _rows_from_kernel(x, static):
  """`[B, K, G, T_padded, H]` -> `[B, T, N, H]`."""
  batch, num_kv_heads, group, _, width = x.shape
  x = x[:, :, :, :static.q_len].transpose(0, 3, 1, 2, 4)
  return x.reshape(batch, static.q_len, num_kv_heads * group, width)


def _to_kernel_layout(q, k, v, static):
  kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))
  if static.kv_len < static.block_kv:  # a block never exceeds its array
    kt, vt = (jnp.pad(x, ((0, 0), (0, 0), (0, static.block_kv -
                                           static.kv_len), (0, 0)))
              for x in (kt, vt))
  return _rows_to_kernel(q, static), kt, vt


_attention.defvjp(_attention_fwd, _attention_bwd)


# Index maps. The grid is (batch, kv head, row, step); a row is a q block
# (forward, dq) or a kv block (dk/dv), and the step's schedule entry names
# the block of the other axis.

def _row_major_specs(static, head_dim, *, with_grads):
  """BlockSpecs for the forward and dq grids (rows are q blocks)."""
  lay = static.fwd
  g, bq, bkv = static.group, static.block_q, static.block_kv

  def q_map(b, h, i, j, entries_ref):
    del j, entries_ref
    return b, h, 0, i, 0

  def kv_map(b, h, i, j, entries_ref):
    block, _, _ = tiles.entry(lay, entries_ref, b, h, i, j)
    return b, h, block, 0

  def mask_map(b, h, i, j, entries_ref):
    _, _, mask_block = tiles.entry(lay, entries_ref, b, h, i, j)
    return (b if static.mask_batch > 1 else 0,
            h if static.mask_heads > 1 else 0, 0,
            i if static.mask_rows > 1 else 0, mask_block)

  def kv_ids_map(b, h, i, j, entries_ref):
    block, _, _ = tiles.entry(lay, entries_ref, b, h, i, j)
    return b, 0, block

  q_spec = pl.BlockSpec((None, None, g, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, None, g, bq),
                          lambda *args: q_map(*args)[:4])
  specs = [q_spec, kv_spec, kv_spec]
  if with_grads:
    specs += [q_spec, row_spec, row_spec]  # d_out, lse, di
  specs += _mask_specs(static, mask_map,
                       lambda b, h, i, j, e: (b, i, 0), kv_ids_map)
  return specs, q_spec, row_spec


def _col_major_specs(static, head_dim):
  """BlockSpecs for the dk/dv grid (rows are kv blocks)."""
  lay = static.dkv
  g, bq, bkv = static.group, static.block_q, static.block_kv

  def q_map(b, h, j, i, entries_ref):
    block, _, _ = tiles.entry(lay, entries_ref, b, h, j, i)
    return b, h, 0, block, 0

  def kv_map(b, h, j, i, entries_ref):
    del i, entries_ref
    return b, h, j, 0

  def mask_map(b, h, j, i, entries_ref):
    _, _, mask_block = tiles.entry(lay, entries_ref, b, h, j, i)
    return (b if static.mask_batch > 1 else 0,
            h if static.mask_heads > 1 else 0, 0,
            mask_block if static.mask_rows > 1 else 0, j)

  def q_ids_map(b, h, j, i, entries_ref):
    block, _, _ = tiles.entry(lay, entries_ref, b, h, j, i)
    return b, block, 0

  q_spec = pl.BlockSpec((None, None, g, bq, head_dim), q_map)
  kv_spec = pl.BlockSpec((None, None, bkv, head_dim), kv_map)
  row_spec = pl.BlockSpec((None, None, g, bq),
                          lambda *args: q_map(*args)[:4])
  specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
  specs += _mask_specs(static, mask_map, q_ids_map,
                       lambda b, h, j, i, e: (b, 0, j))
  return specs, kv_spec


def _mask_specs(static, mask_map, q_ids_map, kv_ids_map):
  specs = [None, None, None]
  if static.mask_group:
    specs[0] = pl.BlockSpec(
        (None, None, static.mask_group, static.mask_rows, static.block_kv),
        mask_map)
  if static.segments:
    specs[1] = pl.BlockSpec((None, static.block_q, NUM_LANES), q_ids_map)
    specs[2] = pl.BlockSpec((None, NUM_SUBLANES, static.block_kv),
                            kv_ids_map)
  return specs


def _compiler_params(static, head_dim, itemsize, kernel):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=_vmem_limit(static, head_dim, itemsize, kernel))


def _vmem_limit(static, head_dim, itemsize, kernel) -> int:
  """Twice the per-step VMEM sum of the BlockSizes docstring, clamped."""
  rows, bkv = static.rows, static.block_kv
  row_tiles = {"fwd": 2, "dq": 3, "dkv": 2}[kernel]  # q, o / q, do, dq / q, do
  stat_tiles = {"fwd": 1, "dq": 2, "dkv": 2}[kernel]  # lse, di
  temporaries = {"fwd": 4, "dq": 5, "dkv": 6}[kernel]  # s, p, dp, ds, masks
  total = 2 * row_tiles * rows * head_dim * itemsize  # double-buffered
  total += 2 * 2 * bkv * head_dim * itemsize  # K, V
  total += 2 * stat_tiles * rows * NUM_LANES * 4  # blocks + widened copies
  total += 2 * max(static.mask_group, 1) * static.block_q * bkv  # int8 mask
  total += temporaries * rows * bkv * 4
  scratch = {"fwd": rows * (head_dim + 2 * NUM_LANES),
             "dq": rows * head_dim, "dkv": 2 * bkv * head_dim}[kernel]
  total += 4 * scratch
  return int(min(MAX_VMEM_LIMIT, max(MIN_VMEM_LIMIT, 2 * total)))


def _cost(static, q, k, kernel):
  """Upper bound (all scheduled steps run) for XLA's scheduler."""
  batch, num_kv_heads, _, _, head_dim = q.shape
  layout = static.dkv if kernel == "dkv" else static.fwd
  tiles = batch * num_kv_heads * layout.rows * layout.steps
  tile_elems = static.rows * static.block_kv
  matmuls = {"fwd": 2, "dq": 3, "dkv": 4}[kernel]
  itemsize = q.dtype.itemsize
  bytes_accessed = (q.size * itemsize * {"fwd": 2, "dq": 3, "dkv": 2}[kernel]
                    + tiles * 2 * static.block_kv * head_dim * itemsize)
  del k
  return pl.CostEstimate(
      flops=2 * matmuls * tiles * tile_elems * head_dim,
      transcendentals=tiles * tile_elems * (2 if static.softcap else 1),
      bytes_accessed=int(bytes_accessed))


# pallas_calls.

def _forward(q, k, v, entries, mask, q_ids, kv_ids, static):
  batch, num_kv_heads, group, padded_q_len, head_dim = q.shape
  in_specs, q_spec, row_spec = _row_major_specs(static, head_dim,
                                                with_grads=False)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, num_kv_heads, group, padded_q_len),
                                    jnp.float32)]
  out, lse = pl.pallas_call(
      functools.partial(tiles.forward_kernel, static=static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, static.fwd.rows, static.fwd.steps),
          in_specs=in_specs, out_specs=[q_spec, row_spec],
          scratch_shapes=[pltpu.VMEM((static.rows, NUM_LANES), jnp.float32),
                          pltpu.VMEM((static.rows, NUM_LANES), jnp.float32),
                          pltpu.VMEM((static.rows, head_dim), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=_compiler_params(static, head_dim, q.dtype.itemsize,
                                       "fwd"),
      cost_estimate=_cost(static, q, k, "fwd"),
      name="gemma4_flash_attention_fwd",
      interpret=static.interpret,
  )(entries, q, k, v, mask, q_ids, kv_ids)
  return out, lse


def _backward_dq(q, k, v, d_out, lse, di, entries, mask, q_ids, kv_ids,
                 static):
  batch, num_kv_heads, _, _, head_dim = q.shape
  in_specs, q_spec, _ = _row_major_specs(static, head_dim, with_grads=True)
  return pl.pallas_call(
      functools.partial(tiles.dq_kernel, static=static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, static.fwd.rows, static.fwd.steps),
          in_specs=in_specs, out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((static.rows, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(static, head_dim, q.dtype.itemsize,
                                       "dq"),
      cost_estimate=_cost(static, q, k, "dq"),
      name="gemma4_flash_attention_dq",
      interpret=static.interpret,
  )(entries, q, k, v, d_out, lse, di, mask, q_ids, kv_ids)


def _backward_dkv(q, k, v, d_out, lse, di, entries, mask, q_ids, kv_ids,
                  static):
  batch, num_kv_heads, _, _, head_dim = q.shape
  in_specs, kv_spec = _col_major_specs(static, head_dim)
  kv_shape = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return pl.pallas_call(
      functools.partial(tiles.dkv_kernel, static=static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, static.dkv.rows, static.dkv.steps),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[
              pltpu.VMEM((static.block_kv, head_dim), jnp.float32),
              pltpu.VMEM((static.block_kv, head_dim), jnp.float32)]),
      out_shape=[kv_shape, kv_shape],
      compiler_params=_compiler_params(static, head_dim, q.dtype.itemsize,
                                       "dkv"),
      cost_estimate=_cost(static, q, k, "dkv"),
      name="gemma4_flash_attention_dkv",
      interpret=static.interpret,
  )(entries, q, k, v, d_out, lse, di, mask, q_ids, kv_ids)
