"""The fused loss's three passes in plain XLA: token and vocab chunks, scans.

Each function sees one shard: tokens `[N, D]`, an embedding slice `[Vs, D]`
and targets already shifted into the slice (a target outside `[0, Vs)` picks
no column here). Logit tiles `[block_tokens, block_vocab]` are computed one
at a time inside nested `lax.scan`s, so no more than one tile is live; the
float32 logsumexp runs online across vocab tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gemma4_jax.kernels.loss import common
from gemma4_jax.kernels.loss import fused


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Chunk sizes of the XLA version (any positive ints).

  A `[block_tokens, block_vocab]` float32 tile and a handful of same-sized
  temporaries are what the scans hold at once: 16 MiB per tile by default.
  """
  block_tokens: int = 1024
  block_vocab: int = 4096

  def __post_init__(self):
    for name in ("block_tokens", "block_vocab"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got "
                         f"{value!r}")

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def passes(block_sizes: BlockSizes, *, interpret: bool = False
           ) -> fused.Passes:
  """The three chunked passes as `fused.Passes` (`interpret` is unused)."""
  del interpret  # no Pallas kernel here
  bound = dict(block_sizes=block_sizes)
  return fused.Passes(
      forward_stats=functools.partial(forward_stats, **bound),
      backward_hidden=functools.partial(backward_hidden, **bound),
      backward_embedding=functools.partial(backward_embedding, **bound))


def forward_stats(hidden, embedding, targets, *, softcap, block_sizes):
  """Online max, sum of exp and target logit over this vocab slice.

  Args:
    hidden: `[N, D]`.
    embedding: `[Vs, D]`, same dtype as hidden.
    targets: `[N]` int32, shifted into this slice.
    softcap: c, or None.
    block_sizes: `BlockSizes`.

  Returns:
    float32 `row_max [N]`, `sum_exp [N]` (relative to row_max) and
    `target_logit [N]` (0 where the target is not in this slice).
  """
  h, e, t, tn, tv, vocab = _tiled(hidden, embedding, targets, block_sizes)

  def token_chunk(args):
    h_c, t_c = args

    def vocab_chunk(carry, j):
      row_max, sum_exp, picked = carry
      logits, _, cols = _tile(h_c, e(j), j, tv, softcap, vocab)
      new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
      sum_exp = (sum_exp * jnp.exp(row_max - new_max) +
                 jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1))
      picked += jnp.sum(jnp.where(cols == t_c[:, None], logits, 0.0), axis=1)
      return (new_max, sum_exp, picked), None

    init = (jnp.full((tn,), -jnp.inf, jnp.float32),
            jnp.zeros((tn,), jnp.float32), jnp.zeros((tn,), jnp.float32))
    out, _ = jax.lax.scan(vocab_chunk, init, jnp.arange(e.count))
    return out

  stats = jax.lax.map(token_chunk, (h, t))
  n = hidden.shape[0]
  return tuple(x.reshape(-1)[:n] for x in stats)


def backward_hidden(hidden, embedding, targets, lse, scale, *, softcap,
                    block_sizes, out_dtype=jnp.float32):
  """`sum_v dz[:, v] E[v]` over this vocab slice, `[N, D]` in `out_dtype`
  (accumulated in float32).

  `dz = scale * (softmax - onehot) * (1 - tanh^2)`, with `lse` the full
  logsumexp `[N]` and `scale` the loss cotangent times the weight `[N]`.
  """
  h, e, t, tn, tv, vocab = _tiled(hidden, embedding, targets, block_sizes)
  lse, scale = (_pad_tokens(x, tn).reshape(-1, tn) for x in (lse, scale))

  def token_chunk(args):
    h_c, t_c, lse_c, scale_c = args

    def vocab_chunk(acc, j):
      e_j = e(j)
      dz = _dz(h_c, e_j, j, tv, t_c, lse_c, scale_c, softcap, vocab)
      return acc + common.matmul(dz.astype(e_j.dtype), e_j), None

    acc, _ = jax.lax.scan(vocab_chunk,
                          jnp.zeros((tn, hidden.shape[1]), jnp.float32),
                          jnp.arange(e.count))
    return acc.astype(out_dtype)

  dh = jax.lax.map(token_chunk, (h, t, lse, scale))
  return dh.reshape(-1, hidden.shape[1])[:hidden.shape[0]]


def backward_embedding(hidden, embedding, targets, lse, scale, *, softcap,
                       block_sizes):
  """`sum_n dz[n, v] h[n]` for this vocab slice, float32 `[Vs, D]`."""
  h, e, t, tn, tv, vocab = _tiled(hidden, embedding, targets, block_sizes)
  lse, scale = (_pad_tokens(x, tn).reshape(-1, tn) for x in (lse, scale))

  def vocab_chunk(j):
    def token_chunk(acc, i):
      dz = _dz(h[i], e(j), j, tv, t[i], lse[i], scale[i], softcap, vocab)
      return acc + common.matmul_t(dz.astype(h.dtype), h[i]), None

    acc, _ = jax.lax.scan(token_chunk,
                          jnp.zeros((tv, hidden.shape[1]), jnp.float32),
                          jnp.arange(h.shape[0]))
    return acc

  de = jax.lax.map(vocab_chunk, jnp.arange(e.count))
  return de.reshape(-1, hidden.shape[1])[:vocab]


class _Chunks:
  """`[block, D]` row blocks of a `[n * block, D]` array, read one at a time
  inside a loop by `dynamic_slice` of the array itself.

  XLA:CPU computes bf16 dots in float32; without the barrier it converts
  the whole operand once, outside the loop (1.5 GiB for E2B's embedding),
  instead of one chunk per iteration.
  """

  def __init__(self, rows, block):
    self.dtype = rows.dtype
    self.count = rows.shape[0] // block
    self._rows, self._block = rows, block

  def __call__(self, j):
    # The barrier keeps a later dtype conversion on this chunk.
    return jax.lax.optimization_barrier(jax.lax.dynamic_slice_in_dim(
        self._rows, j * self._block, self._block))


def _tiled(hidden, embedding, targets, block_sizes):
  """Pads and splits into chunks: h `[nt, tn, D]`, e `[nv, tv, D]` (read
  with `e(j)`)."""
  n, d = hidden.shape
  vocab = embedding.shape[0]
  tn = min(block_sizes.block_tokens, n)
  tv = min(block_sizes.block_vocab, vocab)
  h = _pad_tokens(hidden, tn).reshape(-1, tn, d)
  # Padded token rows get target -1 (no column); padded vocab rows are masked.
  t = jnp.pad(targets, (0, -n % tn), constant_values=-1).reshape(-1, tn)
  e = embedding
  if vocab % tv:
    e = jnp.pad(embedding, ((0, -vocab % tv), (0, 0)))
  return h, _Chunks(e, tv), t, tn, tv, vocab


def _pad_tokens(x, tn):
  return jnp.pad(x, [(0, -x.shape[0] % tn)] + [(0, 0)] * (x.ndim - 1))


def _tile(h_c, e_c, j, tv, softcap, vocab):
  """Softcapped logits of one tile (padding columns at -inf), tanh, ids."""
  z = common.matmul_nt(h_c, e_c)
  cols = j * tv + jnp.arange(tv)[None, :]
  logits, tanh = common.softcap_logits(z, softcap)
  return jnp.where(cols < vocab, logits, -jnp.inf), tanh, cols


def _dz(h_c, e_c, j, tv, t_c, lse_c, scale_c, softcap, vocab):
  logits, tanh, cols = _tile(h_c, e_c, j, tv, softcap, vocab)
  return common.logit_grad(logits, tanh, cols == t_c[:, None], lse_c[:, None],
                           scale_c[:, None], softcap)
