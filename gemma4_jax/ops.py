"""Public functional ops; each picks an implementation for the platform.

`implementation=None` picks Pallas on TPU and the XLA version elsewhere (the
env var `GEMMA4_JAX_IMPLEMENTATION` overrides the default); `"pallas_tpu"`,
`"xla"` and `"reference"` force one and raise if it cannot run here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import implementations
from gemma4_jax import masks
from gemma4_jax.kernels.attention import xla as attention_xla
from gemma4_jax.kernels.loss import fused as loss_fused
from gemma4_jax.kernels.loss import pallas_tpu as loss_pallas
from gemma4_jax.kernels.loss import xla as loss_xla
from gemma4_jax.reference import attention as attention_reference
from gemma4_jax.reference import loss as loss_reference

_ATTENTION = {
    implementations.XLA: attention_xla.attention,
    implementations.REFERENCE: attention_reference.attention,
}
_LOSS = (implementations.PALLAS_TPU, implementations.XLA,
         implementations.REFERENCE)
# op name -> implementations it has, in order of preference.
AVAILABLE = {"attention": tuple(_ATTENTION),
             "softcapped_cross_entropy": _LOSS}


def attention(q, k, v, *, mask=None, segment_ids=None, causal=True,
              sliding_window=None, softcap=None, scale=None,
              implementation=None, interpret=False):
  """Gemma 4 attention for any mask rank, any length, MHA/GQA/MQA.

  Args:
    q: queries `[B, T, N, H]`.
    k, v: keys and values `[B, S, K, H]`, `N % K == 0`; floating, same dtype
      as q.
    mask: optional boolean, True = may attend: `[T,S]`, `[B,T,S]`,
      `[B,1,T,S]` or `[B,N,T,S]`.
    segment_ids: optional `[B,T]` ints (T == S) or a `(q [B,T], kv [B,S])`
      pair; a query sees only keys of its own segment.
    causal: query i (at position i + S - T) sees key j iff j <= i + S - T.
    sliding_window: W; additionally j > i + S - T - W (W keys including
      itself, Tunix's convention).
    softcap: c; logits become c * tanh(logits / c) before masking.
    scale: multiplies q k^T; defaults to H ** -0.5 (Gemma 4 uses 1.0).
    implementation: None, "xla" or "reference" (see module docstring).
    interpret: run a Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, N, H]` in q's dtype. A query with no visible key gives 0.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_attention_args(q, k, v, mask=mask, segment_ids=segment_ids,
                        sliding_window=sliding_window, softcap=softcap,
                        scale=scale)
  name = implementations.resolve("attention", implementation,
                                 tuple(_ATTENTION), interpret=interpret)
  return _ATTENTION[name](q, k, v, mask=mask, segment_ids=segment_ids,
                          causal=causal, sliding_window=sliding_window,
                          softcap=softcap, scale=scale)


def _check_attention_args(q, k, v, *, mask, segment_ids, sliding_window,
                          softcap, scale):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D ({'[B,T,N,H]' if name == 'q' else '[B,S,K,H]'}), "
                       f"got shape {getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} "
                     f"and v {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  (batch, q_len, num_heads, head_dim), (kv_batch, kv_len, num_kv_heads, kv_dim) = q.shape, k.shape
  if kv_batch != batch:
    raise ValueError(f"q batch B={batch} but k/v batch is {kv_batch}")
  if kv_dim != head_dim:
    raise ValueError(f"q head_dim H={head_dim} but k/v head_dim is {kv_dim}")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"query heads N={num_heads} must be a multiple of kv "
                     f"heads K={num_kv_heads}")
  if sliding_window is not None and (not isinstance(sliding_window, int)
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None, got "
                     f"{sliding_window!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be positive or None, got {softcap!r}")
  if scale is not None and not isinstance(scale, (int, float)):
    raise TypeError(f"scale must be a Python number or None, got "
                    f"{type(scale).__name__}")
  if mask is not None:
    masks.canonical_mask(mask, batch=batch, num_heads=num_heads, q_len=q_len,
                         kv_len=kv_len)
  if segment_ids is not None:
    masks.canonical_segment_ids(segment_ids, batch=batch, q_len=q_len,
                                kv_len=kv_len)


def softcapped_cross_entropy(hidden, embedding, targets, weights, *,
                             softcap=30.0, implementation=None,
                             interpret=False, block_sizes=None, mesh=None):
  """Weighted cross-entropy of softcapped tied-embedding logits, fused.

  The logits `c * tanh(hidden @ embedding.T / c)` are never materialized:
  the Pallas and XLA versions stream `[tokens, vocab]` tiles with an online
  float32 logsumexp, and the gradient `dz = (softmax - onehot) * (1 -
  tanh^2)` is recomputed per tile (`d hidden = dz @ E`, `d embedding = dz^T
  @ hidden`, the latter only when the embedding is differentiated). Under a
  mesh (`mesh`, or the one in context), tokens are split over `fsdp` and the
  vocab over `tp` inside `jax.shard_map`.

  Tunix's SFT loss is `loss_sum / (weight_sum + 1e-8)`.

  Args:
    hidden: final-norm outputs `[B, T, D]`, floating.
    embedding: the tied embedding `[V, D]`, same dtype as hidden.
    targets: integer ids `[B, T]` in `[0, V)`. Concrete targets outside that
      range raise `ValueError`; under `jit` they cannot be checked and, as in
      Tunix's one-hot loss, give nll 0 and no gradient.
    weights: `[B, T]`, boolean (a loss mask) or real.
    softcap: c in `c * tanh(logits / c)` (Gemma 4: 30), or None.
    implementation: None, "pallas_tpu", "xla" or "reference" (module
      docstring); "reference" materializes the logits.
    interpret: run the Pallas kernel in interpret mode (CPU).
    block_sizes: the implementation's `BlockSizes`, or None for defaults.
    mesh: a `('fsdp', 'tp')` mesh, or None for the mesh in context (none:
      unsharded).

  Returns:
    `(sum(weights * nll), sum(weights))`, float32 scalars.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_loss_args(hidden, embedding, targets, weights, softcap)
  name = implementations.resolve("softcapped_cross_entropy", implementation,
                                 _LOSS, interpret=interpret)
  targets = targets.astype(jnp.int32)
  weights = weights.astype(jnp.float32)
  if name == implementations.REFERENCE:
    nll = loss_reference.token_nll(hidden, embedding, targets,
                                   softcap=softcap)
    return jnp.sum(weights * nll), jnp.sum(weights)
  module = loss_pallas if name == implementations.PALLAS_TPU else loss_xla
  if block_sizes is None:
    block_sizes = module.BlockSizes.get_default()
  elif not isinstance(block_sizes, module.BlockSizes):
    raise TypeError(f"block_sizes must be a {module.__name__}.BlockSizes for "
                    f"implementation {name!r}, got {block_sizes!r}")
  return loss_fused.loss_sums(
      hidden, embedding, targets, weights, softcap=softcap,
      passes=module.passes(block_sizes, interpret=interpret), mesh=mesh)


def _check_loss_args(hidden, embedding, targets, weights, softcap):
  for name, x, rank in (("hidden", hidden, "[B, T, D]"),
                        ("embedding", embedding, "[V, D]")):
    if getattr(x, "ndim", None) != len(rank.split(",")):
      raise ValueError(f"{name} must be {rank}, got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got {x.dtype}")
  if hidden.dtype != embedding.dtype:
    raise TypeError(f"hidden and embedding must share a dtype, got "
                    f"{hidden.dtype} and {embedding.dtype}")
  if hidden.shape[-1] != embedding.shape[1]:
    raise ValueError(f"hidden [B, T, D] and embedding [V, D] need the same D, "
                     f"got hidden {hidden.shape} and embedding "
                     f"{embedding.shape}")
  for name, x in (("targets", targets), ("weights", weights)):
    if getattr(x, "shape", None) != hidden.shape[:2]:
      raise ValueError(f"{name} must have shape [B, T] = {hidden.shape[:2]}, "
                       f"got {getattr(x, 'shape', type(x).__name__)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"targets must be integer ids, got {targets.dtype}")
  if not (jnp.issubdtype(weights.dtype, jnp.floating) or
          weights.dtype == jnp.bool_):
    raise TypeError(f"weights must be boolean or floating, got "
                    f"{weights.dtype}")
  if softcap is not None and not (isinstance(softcap, (int, float)) and
                                  softcap > 0):
    raise ValueError(f"softcap must be a positive number or None, got "
                     f"{softcap!r}")
  if not isinstance(targets, jax.core.Tracer) and targets.size:
    vocab = embedding.shape[0]
    ids = np.asarray(targets)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
      bad = low if low < 0 else high
      position = tuple(int(i) for i in np.argwhere(ids == bad)[0])
      raise ValueError(f"targets must be in [0, V) = [0, {vocab}), got "
                       f"{bad} at {position}")
