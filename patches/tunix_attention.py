"""Tunix Gemma 4 attention through `gemma4_jax.ops.attention`.

Replaces `Attention.block`. Prefill, the no-cache path (every training step)
and decode (one token against the KV cache or a shared KV cache, including
the sliding-window ring buffer) compute attention with
`ops.attention(..., scale=1.0)`. Everything around the attention
(projections, QK and V norms, RoPE, the cache update, the output projection,
the sharding constraints) is Tunix's code, restated here because Tunix's
block is a single function; the tests check it against the original
numerically.

What changes against Tunix:
- the mask may have rank 2, 3 or 4, in prefill and in decode (Tunix's
  `expand_dims(attn_mask, -2)` breaks on rank 4, its decode window code
  wants `[B, 1, S]`);
- `use_flash_attention=True` honours the mask (Tunix's splash path attends
  padding) and takes any sequence length (splash needs multiples of 1024);
- a query with no visible key (left padding) gives 0 instead of the mean of
  all values.

Two layouts are supported, told apart by which module exists: google-tunix
0.1.7 (`tunix.models.gemma4.model`) and Tunix main, whose attention lives in
`tunix.models.gemma4.attention` and whose `block` also takes `segment_ids`.
Given `segment_ids`, a query sees only keys of its own segment, as in Tunix
main's flash path (its dense path ignores them); decode ignores them, as
Tunix does (the cache keeps no segment ids). Tunix main cannot be installed
from PyPI; the tests run this patch against its copy at commit c7d8950f
(`../shared/tunix-main`, tests/tunix_main/).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from gemma4_jax import masks
from gemma4_jax import ops
from gemma4_jax.patches import _framework

_BLOCK_PARAMETERS = ("self", "x", "segment_pos", "cache", "attn_mask",
                     "kv_shared_cache")
# What the restated block reads from `self`, all stored by Attention.__init__.
_INSTANCE_ATTRIBUTES = (
    "config", "attn_type", "q_einsum", "kv_einsum", "k_einsum",
    "attn_vec_einsum", "_query_norm", "_key_norm", "rope_base_frequency",
    "rope_scale_factor", "rope_proportion")
_CONFIG_FIELDS = ("dtype", "shd_config", "sliding_window_size",
                  "use_sliding_window_kv_cache")


def _requirements(config_module: str) -> tuple[_framework.Requirement, ...]:
  """What the restated block relies on besides `Attention.block` itself: in
  the module holding `Attention` (None) and in the config module."""
  return (
      _framework.Requirement(None, "Attention.__init__",
                             names=_INSTANCE_ATTRIBUTES),
      _framework.Requirement(
          None, "apply_rope",
          parameters=("inputs", "positions", "base_frequency",
                      "scale_factor", "rope_proportion")),
      _framework.Requirement(None, "shard", parameters=("x", "s", "eager")),
      _framework.Requirement(None, "AttentionType.LOCAL_SLIDING"),
      *(_framework.Requirement(config_module, f"ModelConfig.{field}")
        for field in _CONFIG_FIELDS),
      *(_framework.Requirement(config_module, f"ShardingConfig.{field}")
        for field in ("act_btnh", "act_btd")),
  )


SPEC = _framework.PatchSpec(
    feature="attention", distribution="google-tunix",
    attribute="Attention.block",
    layouts=(
        # Tunix main is not on PyPI: its code is imported over google-tunix
        # 0.1.7's metadata, so the version string cannot identify it. Tested
        # at commit c7d8950f (tests/tunix_main/).
        _framework.Layout(
            name="Tunix main c7d8950f",
            module="tunix.models.gemma4.attention",
            parameters=_BLOCK_PARAMETERS + ("segment_ids",),
            requirements=_requirements("tunix.models.gemma4.config"),
            known_by_layout=True, found_by="Attention"),
        _framework.Layout(
            name="google-tunix 0.1.7", module="tunix.models.gemma4.model",
            parameters=_BLOCK_PARAMETERS,
            requirements=_requirements("tunix.models.gemma4.model"),
            known_versions=("0.1.7",), found_by="Attention"),
    ),
    ops=("attention",),
    stock="none of the attention itself (training, prefill and decode all "
    "run ops.attention); the projections, norms, RoPE and cache update "
    "around it are Tunix's code, restated")


def targets() -> tuple[_framework.Target, ...]:
  """`SPEC` in the installed Tunix, replaced by the restated block below."""
  return SPEC.targets(_make_block)


# Tunix's attention block, restated around `ops.attention`.


def _make_block(original: Callable, options: _framework.OpOptions,
                layout: _framework.Layout) -> Callable:
  """`Attention.block` with the same parameters as `original`."""
  module = importlib.import_module(layout.module)
  tunix = _TunixFunctions(apply_rope=module.apply_rope, shard=module.shard,
                          local=module.AttentionType.LOCAL_SLIDING)

  if "segment_ids" in layout.parameters:
    def block(self, x, segment_pos, cache, attn_mask, kv_shared_cache=None,
              segment_ids=None):
      return _block(self, x, segment_pos, cache, attn_mask, kv_shared_cache,
                    segment_ids, tunix=tunix, options=options)
  else:
    def block(self, x, segment_pos, cache, attn_mask, kv_shared_cache=None):
      return _block(self, x, segment_pos, cache, attn_mask, kv_shared_cache,
                    None, tunix=tunix, options=options)

  return _framework.wraps(
      original, block,
      note="Tunix Gemma 4 attention block, patched by gemma4_jax.patches: "
      "prefill, decode and no-cache attention run gemma4_jax.ops.attention.")


@dataclasses.dataclass(frozen=True)
class _TunixFunctions:
  apply_rope: Callable
  shard: Callable
  local: object  # AttentionType.LOCAL_SLIDING


def _block(self, x, segment_pos, cache, attn_mask, kv_shared_cache,
           segment_ids, *, tunix: _TunixFunctions,
           options: _framework.OpOptions):
  """Tunix's block with attention from `ops.attention`."""
  config = self.config
  act_btnh = config.shd_config.act_btnh

  def rope(proj):
    return tunix.apply_rope(proj, segment_pos,
                            base_frequency=self.rope_base_frequency,
                            scale_factor=self.rope_scale_factor,
                            rope_proportion=self.rope_proportion)

  x = x.astype(config.dtype)
  query = rope(self._query_norm(tunix.shard(self.q_einsum(x), act_btnh)))
  if kv_shared_cache is not None:
    if cache is not None:
      raise ValueError("Attention.block: pass cache or kv_shared_cache, not "
                       "both")
    key, value = kv_shared_cache["k"], kv_shared_cache["v"]
  else:
    if hasattr(self, "k_einsum"):  # k_eq_v
      key = value = self.k_einsum(x)
    else:
      key, value = self.kv_einsum(x)
    key = tunix.shard(key, act_btnh)
    value = tunix.shard(value, act_btnh)
    value = value * jax.lax.rsqrt(
        jnp.mean(jnp.square(value), axis=-1, keepdims=True) + 1e-06)
    key = rope(self._key_norm(key))

  decode = x.shape[1] == 1 and (cache is not None or
                                kv_shared_cache is not None)
  if cache is None:
    new_cache = {"v": value, "k": key}
  elif decode:
    new_cache = _decode_cache(cache, key, value)
    key, value = new_cache["k"], new_cache["v"]  # attend the whole cache
  else:
    new_cache = _prefill_cache(cache, key, value,
                               config.use_sliding_window_kv_cache)

  if decode:
    encoded = _decode_attention(self, query, key, value, attn_mask, cache,
                                kv_shared_cache, local=tunix.local,
                                options=options)
  else:
    encoded = _attention(self, query, key, value, attn_mask, segment_ids,
                         local=tunix.local, options=options)
  output = tunix.shard(self.attn_vec_einsum(encoded), config.shd_config.act_btd)
  return new_cache, output, (key, value)


def _prefill_cache(cache, key, value, sliding_window_kv_cache: bool):
  seq_len, cache_len = key.shape[1], cache["v"].shape[1]
  if sliding_window_kv_cache:
    # A ring buffer of the last cache_len positions; no chunked prefill.
    valid_len = min(seq_len, cache_len)
    indices = jnp.arange(seq_len - valid_len, seq_len) % cache_len
    cache_v = cache["v"].at[:, indices, ...].set(value[:, -valid_len:, ...])
    cache_k = cache["k"].at[:, indices, ...].set(key[:, -valid_len:, ...])
  else:
    cache_v = cache["v"].at[:, :seq_len, ...].set(value)
    cache_k = cache["k"].at[:, :seq_len, ...].set(key)
  return {"v": cache_v, "k": cache_k,
          "end_index": cache["end_index"] + seq_len}


def _decode_cache(cache, key, value):
  """Tunix's decode update: the new token at `end_index[0] % cache_len` (one
  index for the whole batch, as Tunix does; a ring buffer when the cache is
  shorter than the sequence)."""
  # Indices of one dtype (Tunix's Python 0s become int64 under x64).
  zero = jnp.zeros((), cache["end_index"].dtype)
  slot = (zero, cache["end_index"][0] % cache["v"].shape[1], zero, zero)
  return {"v": jax.lax.dynamic_update_slice(cache["v"], value, slot),
          "k": jax.lax.dynamic_update_slice(cache["k"], key, slot),
          "end_index": cache["end_index"] + 1}


def _boolean_mask(attn_mask):
  if attn_mask is None:
    raise ValueError("Attention.block: attn_mask is required (a boolean "
                     "[T,S], [B,T,S], [B,1,T,S] or [B,N,T,S] mask)")
  mask = jnp.asarray(attn_mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0  # nonzero attends


def _sliding_window(self) -> int:
  window = self.config.sliding_window_size
  if window is None:
    raise ValueError("Attention.block: a LOCAL_SLIDING layer needs "
                     "config.sliding_window_size, got None")
  return window


def _decode_attention(self, query, key, value, attn_mask, cache,
                      kv_shared_cache, *, local, options: _framework.OpOptions):
  """One query against the KV cache, with Tunix's decode masking, any rank.

  `attn_mask` covers logical positions `[.., 1, cache_size]`. On local
  layers with the sliding-window (ring buffer) cache, each physical slot is
  mapped to the logical position it holds and slots not written yet are
  masked; with a full-length cache, the window ends at the mask's last
  visible position. Global layers use the mask as it is.
  """
  batch, _, num_heads, _ = query.shape
  cache_len = key.shape[1]
  mask = _boolean_mask(attn_mask)
  mask = masks.canonical_mask(mask, batch=batch, num_heads=num_heads,
                              q_len=1, kv_len=mask.shape[-1])
  if self.attn_type == local:
    window = _sliding_window(self)
    if self.config.use_sliding_window_kv_cache:
      active = cache if cache is not None else kv_shared_cache
      end = active["end_index"]
      if cache is None:  # the origin layer has already counted this token
        end = end - 1
      end = end[:, None, None, None]
      logical = end - (end - jnp.arange(cache_len)) % cache_len
      shape = (batch, mask.shape[1], 1, cache_len)
      mask = jnp.take_along_axis(
          jnp.broadcast_to(mask, (batch,) + mask.shape[1:]),
          jnp.broadcast_to(jnp.maximum(logical, 0), shape), axis=-1)
      mask = mask & (logical >= 0)  # slots not written yet
    else:
      positions = jnp.arange(mask.shape[-1])
      last = jnp.max(jnp.where(mask, positions, 0), axis=-1, keepdims=True)
      mask = mask & (positions > last - window) & (positions <= last)
  dtype = jnp.result_type(query, key, value)
  return ops.attention(
      query.astype(dtype), key.astype(dtype), value.astype(dtype), mask=mask,
      causal=False, scale=1.0, **options.op_kwargs)


def _attention(self, query, key, value, attn_mask, segment_ids, *, local,
               options: _framework.OpOptions):
  """Tunix's prefill masking, any mask rank, through `ops.attention`."""
  batch, seq_len, num_heads, _ = query.shape
  kv_len = key.shape[1]
  window = _sliding_window(self) if self.attn_type == local else None
  if (isinstance(attn_mask, masks.CausalPaddingMask)
      and attn_mask.shape[-1] == seq_len == kv_len):
    # Causal with a key mask: tiles from [B, S], no [B, T, T] built. The
    # causal rule is the upper side of Tunix's band.
    mask, causal = attn_mask.input_mask[:, None, None, :], True
  else:
    mask = masks.canonical_mask(_boolean_mask(attn_mask)[..., :seq_len],
                                batch=batch, num_heads=num_heads,
                                q_len=seq_len, kv_len=kv_len)
    causal = False
    if window is not None:
      # Tunix's prefill band is two-sided, |i - j| < W; ops' window is the
      # lower side j > i - W, so the upper side goes into the mask.
      mask = mask & (jnp.arange(kv_len)[None, :] <
                     jnp.arange(seq_len)[:, None] + window)
  dtype = jnp.result_type(query, key, value)
  return ops.attention(
      query.astype(dtype), key.astype(dtype), value.astype(dtype), mask=mask,
      segment_ids=segment_ids, causal=causal, sliding_window=window,
      scale=1.0,  # queries and keys are RMS-normed; Gemma 4 has no 1/sqrt(H)
      **options.op_kwargs)
