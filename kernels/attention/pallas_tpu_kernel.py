"""Kernel bodies of the Pallas TPU attention (`pallas_tpu`) and their tile math.

A tile is the `G * block_q` rows of every query head sharing one kv head
against `block_kv` keys. The kernels run a tile as PARTIAL (build the mask:
positions, bounds, segment ids, the dynamic mask tile) or FULL (no mask
work), as the scalar-prefetched schedule says, and idle on EMPTY steps.
Everything static comes in `static` (`pallas_tpu.Static`).
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from gemma4_jax.kernels import _tpu
from gemma4_jax.kernels.attention import block_mask

DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NN_DIM_NUMBERS = (((1,), (0,)), ((), ()))  # x @ y
NT_DIM_NUMBERS = (((1,), (1,)), ((), ()))  # x @ y.T


def entry(layout, entries_ref, b, h, row, step):
  """`(block, kind, mask_block)` of a schedule entry (`block_mask.unpack`)."""
  index = block_mask.entry_index(layout, b, h, row, step)
  return block_mask.unpack(entries_ref[index])


# The math shared by the three kernels.

def _lanes(x, width):
  """A `(rows, 128)` lane-replicated column, widened or cut to `width`."""
  if width <= _tpu.NUM_LANES:
    return x[:, :width]
  return jnp.tile(x, (1, width // _tpu.NUM_LANES))


def _row_block(column, static):
  """`(G * block_q, 128)` lane-replicated -> lane-major `(G, block_q)`."""
  rows = [_tpu.column_to_row(column[g * static.block_q:
                                     (g + 1) * static.block_q])
          for g in range(static.group)]
  return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def _column(row_ref, static):
  """Lane-major `(G, block_q)` -> `(G * block_q, 128)` lane-replicated."""
  columns = [_tpu.row_to_column(row_ref[g:g + 1, :], _tpu.NUM_LANES)
             for g in range(static.group)]
  return columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=0)


def _visible(static, q_block, kv_block, mask_ref, q_ids_ref, kv_ids_ref):
  """Boolean `(1 or G, block_q, block_kv)` visibility of a PARTIAL tile."""
  shape = (static.block_q, static.block_kv)
  q_pos = (lax.broadcasted_iota(jnp.int32, shape, 0) + q_block * static.block_q
           + (static.kv_len - static.q_len))
  k_pos = lax.broadcasted_iota(jnp.int32, shape, 1) + kv_block * static.block_kv
  visible = k_pos < static.kv_len
  if static.causal:
    visible &= k_pos <= q_pos
  if static.sliding_window is not None:
    visible &= k_pos > q_pos - static.sliding_window
  if q_ids_ref is not None:
    q_ids = jnp.tile(q_ids_ref[...], (1, static.block_kv // _tpu.NUM_LANES))
    visible &= q_ids == kv_ids_ref[:1, :]
  visible = visible[None]
  if mask_ref is not None:
    # Widened first: v5e's VPU compares 32-bit lanes.
    visible = visible & (mask_ref[...].astype(jnp.int32) != 0)
  return visible


def _where_visible(static, visible, x, fill):
  x = x.reshape(static.group, static.block_q, static.block_kv)
  return jnp.where(visible, x, fill).reshape(static.rows, static.block_kv)


def _load_kv(static, k_ref, v_ref, kv_block, masked):
  """K/V tiles; rows past S of the ragged last tile are zeroed (they are
  undefined memory, and 0 * NaN in p @ v would spread NaN)."""
  k, v = k_ref[...], v_ref[...]
  if masked and static.ragged_kv:
    row = lax.broadcasted_iota(jnp.int32, k.shape, 0)
    valid = row < static.kv_len - kv_block * static.block_kv
    # Selected in float32 (v5e has no bf16 VPU); one tile, not per row block.
    k, v = (jnp.where(valid, x.astype(jnp.float32), 0.0).astype(x.dtype)
            for x in (k, v))
  return k, v


def _dot(x, y, dimension_numbers=NN_DIM_NUMBERS):
  """float32-accumulated matmul; float32 operands at full precision (the
  TPU default would round them to one bf16 pass)."""
  precision = (lax.Precision.HIGHEST if x.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  return lax.dot_general(x, y, dimension_numbers, precision=precision,
                         preferred_element_type=jnp.float32)


def _logits(static, q, k):
  """Scaled, softcapped `q k^T` in float32, and tanh for the gradient."""
  s = _dot(q, k, NT_DIM_NUMBERS)
  if static.scale != 1.0:
    s = s * static.scale
  if static.softcap is None:
    return s, None
  t = jnp.tanh(s / static.softcap)
  return t * static.softcap, t


def _probs_and_dlogits(static, q, k, v, d_out, lse, di, visible):
  """Recomputed probabilities and d(loss)/d(scaled logits) of one tile."""
  s, t = _logits(static, q, k)
  p = jnp.exp(s - _lanes(lse, static.block_kv))
  if visible is not None:
    p = _where_visible(static, visible, p, 0.0)
  dp = _dot(d_out, v, NT_DIM_NUMBERS)
  ds = p * (dp - _lanes(di, static.block_kv))
  if t is not None:
    ds = ds * (1.0 - t * t)  # d(c tanh(x / c)) / dx
  return p, ds


def _run_by_kind(kind, step):
  """Runs `step(masked)` for PARTIAL and FULL tiles; EMPTY ones idle."""
  pl.when(kind == block_mask.PARTIAL)(lambda: step(True))
  pl.when(kind == block_mask.FULL)(lambda: step(False))


# Kernel bodies.

def forward_kernel(entries_ref, q_ref, k_ref, v_ref, mask_ref, q_ids_ref,
                   kv_ids_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *,
                   static):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  kv_block, kind, _ = entry(static.fwd, entries_ref, b, h, i, j)
  rows, head_dim = static.rows, acc_ref.shape[-1]

  @pl.when(j == 0)
  def init():
    m_ref[...] = jnp.full_like(m_ref, DEFAULT_MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def step(masked):
    q = q_ref[...].reshape(rows, head_dim)
    k, v = _load_kv(static, k_ref, v_ref, kv_block, masked)
    s, _ = _logits(static, q, k)
    visible = None
    if masked:
      visible = _visible(static, i, kv_block, mask_ref, q_ids_ref, kv_ids_ref)
      s = _where_visible(static, visible, s, DEFAULT_MASK_VALUE)
    m_prev, l_prev = m_ref[...], l_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    p = jnp.exp(s - _lanes(m_next, static.block_kv))
    if masked:  # a row masked so far has m = mask value, and exp(0) = 1
      p = _where_visible(static, visible, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    m_ref[...] = m_next
    pv = _dot(p.astype(v.dtype), v)
    acc_ref[...] = _lanes(alpha, head_dim) * acc_ref[...] + pv

  _run_by_kind(kind, step)

  @pl.when(j == static.fwd.steps - 1)
  def finish():
    l = l_ref[...]
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    inv = jnp.where(seen, 1.0 / safe_l, 0.0)
    out = acc_ref[...] * _lanes(inv, head_dim)
    o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
    lse = jnp.where(seen, m_ref[...] + jnp.log(safe_l), jnp.inf)
    lse_ref[...] = _row_block(lse, static)


def dq_kernel(entries_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
              mask_ref, q_ids_ref, kv_ids_ref, dq_ref, acc_ref, *, static):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  kv_block, kind, _ = entry(static.fwd, entries_ref, b, h, i, j)
  rows, head_dim = static.rows, acc_ref.shape[-1]

  @pl.when(j == 0)
  def init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def step(masked):
    k, v = _load_kv(static, k_ref, v_ref, kv_block, masked)
    visible = (_visible(static, i, kv_block, mask_ref, q_ids_ref, kv_ids_ref)
               if masked else None)
    _, ds = _probs_and_dlogits(
        static, q_ref[...].reshape(rows, head_dim), k, v,
        do_ref[...].reshape(rows, head_dim), _column(lse_ref, static),
        _column(di_ref, static), visible)
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  _run_by_kind(kind, step)

  @pl.when(j == static.fwd.steps - 1)
  def finish():
    dq = acc_ref[...] * static.scale
    dq_ref[...] = dq.reshape(dq_ref.shape).astype(dq_ref.dtype)


def dkv_kernel(entries_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               mask_ref, q_ids_ref, kv_ids_ref, dk_ref, dv_ref, dk_acc_ref,
               dv_acc_ref, *, static):
  b, h, j, i = (pl.program_id(axis) for axis in range(4))
  q_block, kind, _ = entry(static.dkv, entries_ref, b, h, j, i)
  rows, head_dim = static.rows, dk_acc_ref.shape[-1]

  @pl.when(i == 0)
  def init():
    dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
    dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

  def step(masked):
    k, v = _load_kv(static, k_ref, v_ref, j, masked)
    visible = (_visible(static, q_block, j, mask_ref, q_ids_ref, kv_ids_ref)
               if masked else None)
    q = q_ref[...].reshape(rows, head_dim)
    d_out = do_ref[...].reshape(rows, head_dim)
    p, ds = _probs_and_dlogits(
        static, q, k, v, d_out, _column(lse_ref, static),
        _column(di_ref, static), visible)
    # Rows hold every head of the group: these sums reduce over heads too.
    dv_acc_ref[...] += _dot(p.T.astype(d_out.dtype), d_out)
    dk_acc_ref[...] += _dot(ds.T.astype(q.dtype), q)

  _run_by_kind(kind, step)

  @pl.when(i == static.dkv.steps - 1)
  def finish():
    dk_ref[...] = (dk_acc_ref[...] * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)
