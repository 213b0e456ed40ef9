"""Attention mask normalization: every accepted mask form to one canonical form.

Users and libraries build masks as `[T, S]`, `[B, T, S]`, `[B, 1, T, S]` or
`[B, N, T, S]`. Scores are 4-D, so a rank-3 mask broadcast naively against
`[B, N, T, S]` pairs its batch axis with the heads axis: the bug this module
exists to remove. Everything downstream sees `[B|1, N|1, T|1, S]` booleans.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ACCEPTED_MASK_FORMS = "[T,S], [B,T,S], [B,1,T,S] or [B,N,T,S]"


def canonical_mask(mask, *, batch: int, num_heads: int, q_len: int,
                   kv_len: int) -> jax.Array:
  """Returns `mask` as a boolean `[B|1, N|1, T|1, S]` array.

  Args:
    mask: boolean, True where a query may attend a key, in one of the forms
      `[T,S]`, `[B,T,S]`, `[B,1,T,S]`, `[B,N,T,S]`; a batch, head or query
      axis of size 1 broadcasts (Tunix passes `[B,1,S]` key masks).
    batch, num_heads, q_len, kv_len: the B, N, T and S of the attention.

  Raises:
    TypeError: `mask` is not boolean.
    ValueError: its rank or a dimension does not fit, naming both shapes.
  """
  dtype = getattr(mask, "dtype", None)
  if dtype is None or jnp.dtype(dtype) != jnp.bool_:
    raise TypeError(f"mask must be boolean (True = may attend), got dtype "
                    f"{dtype}; convert with mask.astype(bool)")
  shape = tuple(mask.shape)
  expected = {2: (q_len, kv_len), 3: (batch, q_len, kv_len),
              4: (batch, num_heads, q_len, kv_len)}
  if len(shape) not in expected:
    raise ValueError(
        f"mask must have rank 2, 3 or 4 ({ACCEPTED_MASK_FORMS} with B={batch},"
        f" N={num_heads}, T={q_len}, S={kv_len}); got shape {shape}")
  want = expected[len(shape)]
  # The key axis must match exactly; the others may be 1 and broadcast.
  fits = all(
      have == need or (have == 1 and axis < len(shape) - 1)
      for axis, (have, need) in enumerate(zip(shape, want)))
  if not fits:
    raise ValueError(
        f"mask of shape {shape} does not fit attention with B={batch}, "
        f"N={num_heads}, T={q_len}, S={kv_len}: expected {want} "
        f"(one of {ACCEPTED_MASK_FORMS}; B, N and T may be 1)")
  if len(shape) == 2:
    return mask[None, None]
  if len(shape) == 3:
    return mask[:, None]
  return mask


def canonical_segment_ids(segment_ids, *, batch: int, q_len: int,
                          kv_len: int) -> tuple[jax.Array, jax.Array]:
  """Returns `(q_segment_ids [B,T], kv_segment_ids [B,S])` as int32.

  Accepts one `[B,T]` array (self-attention, T == S) or a `(q, kv)` pair.
  """
  if isinstance(segment_ids, Sequence) and not hasattr(segment_ids, "shape"):
    if not any(hasattr(ids, "shape") for ids in segment_ids):
      # Nested Python lists, not a pair of arrays.
      raise TypeError("segment_ids must be an integer array [B,T] or a (q "
                      "[B,T], kv [B,S]) pair of arrays, got a "
                      f"{type(segment_ids).__name__} of Python values")
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be a [B,T] array or a (q [B,T], "
                       f"kv [B,S]) pair; got a sequence of {len(segment_ids)}")
    q_ids, kv_ids = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(
          f"a single segment_ids array needs T == S, got T={q_len}, "
          f"S={kv_len}; pass a (q [B,T], kv [B,S]) pair")
    q_ids = kv_ids = segment_ids
  for name, ids, length in (("q", q_ids, q_len), ("kv", kv_ids, kv_len)):
    if not (hasattr(ids, "shape") and hasattr(ids, "dtype")):
      raise TypeError(f"{name} segment_ids must be an integer array (a "
                      f"jax.Array or numpy.ndarray), got "
                      f"{type(ids).__name__}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} segment_ids must be integer, got {ids.dtype}")
    if tuple(ids.shape) != (batch, length):
      raise ValueError(f"{name} segment_ids must have shape "
                       f"{(batch, length)}, got {tuple(ids.shape)}")
  return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def position_visibility(q_len: int, kv_len: int, *, causal: bool,
                        sliding_window: int | None) -> jax.Array:
  """`[T, S]` booleans from positions alone; queries end-aligned to keys."""
  q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  kv_pos = jnp.arange(kv_len)[None, :]
  visible = jnp.ones((q_len, kv_len), jnp.bool_)
  if causal:
    visible &= kv_pos <= q_pos
  if sliding_window is not None:
    visible &= kv_pos > q_pos - sliding_window
  return visible


def visibility(*, batch: int, num_heads: int, q_len: int, kv_len: int,
               mask=None, segment_ids=None, causal: bool = True,
               sliding_window: int | None = None) -> jax.Array:
  """All visibility rules combined: boolean `[B|1, N|1, T, S]`."""
  visible = position_visibility(q_len, kv_len, causal=causal,
                                sliding_window=sliding_window)[None, None]
  if mask is not None:
    visible = visible & canonical_mask(mask, batch=batch, num_heads=num_heads,
                                       q_len=q_len, kv_len=kv_len)
  if segment_ids is not None:
    q_ids, kv_ids = canonical_segment_ids(segment_ids, batch=batch,
                                          q_len=q_len, kv_len=kv_len)
    visible = visible & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
  return visible


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalPaddingMask:
  """Tunix's `make_causal_attn_mask(input_mask)` without the `[B, T, T]`.

  Query i may attend key j iff `j <= i` and `input_mask[b, j]`. Tunix builds
  this as a dense boolean `[B, T, T]` array: 1 GiB at batch 1 x 32768, and
  XLA:TPU adds an int8 copy for the attention kernel. This object holds the
  `[B, T]` key mask only; `gemma4_jax.patches`' attention reads it as a key
  mask plus causality, which `ops.attention` handles in tiles. Anything else
  that reads it as an array (`jnp.asarray`, indexing, `&`, `*`, `.shape`)
  gets exactly the dense mask Tunix would have built, so code that does not
  know it still computes the same thing.
  """
  input_mask: jax.Array   # [B, T] bool, True for real (not padding) tokens

  @property
  def shape(self) -> tuple[int, int, int]:
    batch, length = self.input_mask.shape
    return (batch, length, length)

  @property
  def dtype(self):
    return jnp.dtype(jnp.bool_)

  @property
  def ndim(self) -> int:
    return 3

  def dense(self) -> jax.Array:
    """The `[B, T, T]` boolean mask, as `make_causal_attn_mask` builds it."""
    length = self.input_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    return jnp.asarray(self.input_mask, jnp.bool_)[:, None, :] & causal[None]

  def __jax_array__(self) -> jax.Array:
    return self.dense()

  def __array__(self, dtype=None, copy=None):
    del copy
    array = np.asarray(self.dense())
    return array if dtype is None else array.astype(dtype)

  def __getitem__(self, index):
    return self.dense()[index]

  def astype(self, dtype):
    return self.dense().astype(dtype)

  def __and__(self, other):
    return self.dense() & other

  def __rand__(self, other):
    return other & self.dense()

  def __mul__(self, other):
    return self.dense() * other

  def __rmul__(self, other):
    return other * self.dense()
