"""Public functional ops; each picks an implementation for the platform.

`implementation=None` picks the op's TPU default when the computation is
lowered for TPU (ahead-of-time compiles and `jax.export` from a CPU host
included) and the XLA version elsewhere; the env var
`GEMMA4_JAX_IMPLEMENTATION` overrides the default. `"pallas_tpu"`, `"xla"`
and `"reference"` force one; a forced Pallas kernel lowered for a platform
other than TPU raises unless `interpret=True` (see `implementations`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import implementations
from gemma4_jax import masks
from gemma4_jax import validation
from gemma4_jax.kernels import attention as attention_names
from gemma4_jax.kernels.attention import pallas_tpu as attention_pallas_tpu
from gemma4_jax.kernels.attention import sharding as attention_sharding
from gemma4_jax.kernels.attention import xla as attention_xla
from gemma4_jax.kernels.lora import common as lora_common
from gemma4_jax.kernels.lora import einsum as lora_einsum_lib
from gemma4_jax.kernels.lora import pallas as lora_pallas
from gemma4_jax.kernels.lora import sharding as lora_sharding
from gemma4_jax.kernels.lora import xla as lora_xla
from gemma4_jax.kernels.loss import fused as loss_fused
from gemma4_jax.kernels.loss import pallas_tpu as loss_pallas
from gemma4_jax.kernels.loss import xla as loss_xla
from gemma4_jax.kernels.ple import combine as ple_combine
from gemma4_jax.kernels.ple import host as ple_host
from gemma4_jax.kernels.ple import pallas_tpu as ple_pallas
from gemma4_jax.kernels.ple import sharded as ple_sharded
from gemma4_jax.kernels.ple import xla as ple_xla
from gemma4_jax.reference import attention as attention_reference
from gemma4_jax.reference import lora as lora_reference
from gemma4_jax.reference import loss as loss_reference
from gemma4_jax.reference import ple as ple_reference

# Remat policies may save these (`patches.apply(remat="attention")`).
ATTENTION_OUTPUT = attention_names.OUTPUT
ATTENTION_LOGSUMEXP = attention_names.LOGSUMEXP

_ATTENTION = {
    implementations.PALLAS_TPU: attention_pallas_tpu.attention,
    implementations.XLA: attention_xla.attention,
    implementations.REFERENCE: attention_reference.attention,
}
_EVERY = (implementations.PALLAS_TPU, implementations.XLA,
          implementations.REFERENCE)
_PLE = _LOSS = _EVERY
# op name -> implementations it has.
AVAILABLE = {
    "attention": tuple(_ATTENTION),
    "ple_lookup": _PLE,
    "per_layer_inputs": _PLE,
    "lora_matmul": _EVERY,
    "softcapped_cross_entropy": _LOSS,
}
# op name -> what `implementation=None` runs when lowered for TPU (the XLA
# version elsewhere). Pallas where the kernel needs no more HBM than the XLA
# version compiled for v5e and is not slower by the roofline; README's "TPU
# defaults" gives the figures. The PLE gather ties XLA's gather in HBM but
# Mosaic only DMAs whole 8-row tiles of Gemma 4's tables (L = 35, 42 layers
# make XLA tile the row axis), so it moves 3-4.5x the bytes. The fused LoRA
# kernel needs no more HBM than XLA per call, but a whole E2B step with it
# needs more (v5e:2x2, 5 layers: +19 MiB at 4 x 1024, +117 MiB at 4 x 4096)
# for a modeled gain of at most ~7%.
TPU_DEFAULT = {
    "attention": implementations.PALLAS_TPU,
    "ple_lookup": implementations.XLA,
    "per_layer_inputs": implementations.XLA,
    "lora_matmul": implementations.XLA,
    "softcapped_cross_entropy": implementations.PALLAS_TPU,
}


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
    implementation: None, "pallas_tpu", "xla" or "reference" (see module
      docstring).
    interpret: run a Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, N, H]` in q's dtype. A query with no visible key gives 0. Under
    a mesh with Tunix's axes (`jax.set_mesh` or `with mesh:`), batch over
    `fsdp` and query heads over `tp` (see `kernels.attention.sharding`).
    An empty dimension (B, T, N, H or S of 0) gives that result without
    running a kernel: an empty array, or zeros when only S is 0 (no query
    sees a key).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_attention_args(q, k, v, mask=mask, segment_ids=segment_ids,
                        causal=causal, sliding_window=sliding_window,
                        softcap=softcap, scale=scale)
  name = implementations.resolve("attention", implementation,
                                 tuple(_ATTENTION), interpret=interpret)
  if validation.has_empty_dim(q.shape, k.shape):
    # Every kernel tiles T and S and the default scale is H ** -0.5.
    return jnp.zeros(q.shape, q.dtype)
  options = dict(causal=causal, sliding_window=sliding_window,
                 softcap=softcap, scale=scale)
  # Only the Pallas kernel has an interpret mode.
  table = {impl: functools.partial(
      fn, **options, **({"interpret": interpret}
                        if impl == implementations.PALLAS_TPU else {}))
           for impl, fn in _ATTENTION.items()}
  run = implementations.select("attention", name, table, interpret=interpret,
                               tpu_default=TPU_DEFAULT["attention"])
  # Under a ('fsdp', 'tp') mesh each shard runs `run` in shard_map.
  return attention_sharding.attention(run, q, k, v, mask=mask,
                                      segment_ids=segment_ids)


def _check_attention_args(q, k, v, *, mask, segment_ids, causal,
                          sliding_window, softcap, scale):
  for name, x in (("q", q), ("k", k), ("v", v)):
    validation.check_array(name, x)
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
  # None or a string would silently pick one of the two behaviours.
  validation.check_bool("causal", causal)
  validation.check_int("sliding_window", sliding_window, minimum=1,
                       allow_none=True)
  validation.check_number("softcap", softcap, positive=True, allow_none=True)
  validation.check_number("scale", scale, allow_none=True,
                          what="Gemma 4 uses 1.0")
  if mask is not None:
    validation.check_array("mask", mask, what="a boolean array")
    masks.canonical_mask(mask, batch=batch, num_heads=num_heads, q_len=q_len,
                         kv_len=kv_len)
  if segment_ids is not None:
    masks.canonical_segment_ids(segment_ids, batch=batch, q_len=q_len,
                                kv_len=kv_len)


def ple_lookup(per_layer_table, tokens, *, num_layers, per_layer_dim,
               mesh=None, table_spec=None, implementation=None,
               interpret=False):
  """Gemma 4 Per-Layer Embedding rows: `table[tokens]` as `[B, T, L, P]`.

  Ids outside `[0, V)` (negative too) read row 0, as Tunix does.

  Args:
    per_layer_table: `[V, L, P]` (google-tunix 0.1.7) or `[V, L*P]` (Tunix
      main), or a `HostTable` (host-resident; only the rows move to the
      device, `implementation` does not apply; with `mesh`, each device
      fetches its own block of rows in the layout the sharded lookup hands
      over, `table_spec` being where the table would live on the mesh).
    tokens: integer ids `[B, T]`.
    num_layers, per_layer_dim: L and P.
    mesh: with `table_spec`, look up inside `shard_map` over this mesh
      without gathering the table (see `kernels/ple/sharded.py` for the
      vocab- and feature-parallel modes).
    table_spec: the table's `PartitionSpec` over `mesh`.
    implementation: None, "pallas_tpu", "xla" or "reference" (the
      unsharded float32 oracle; it ignores `mesh`).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    `[B, T, L, P]` in the table's dtype (empty when B or T is 0).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_ple_args(per_layer_table, tokens, num_layers=num_layers,
                  per_layer_dim=per_layer_dim, mesh=mesh,
                  table_spec=table_spec)
  row_shape = per_layer_table.shape[1:]
  if isinstance(per_layer_table, ple_host.HostTable):
    ids = ple_xla.valid_ids(tokens, per_layer_table.shape[0])
    out_spec = None if mesh is None else ple_sharded.activation_spec(
        table_spec, len(row_shape) + 1, mesh, ids.shape[0])
    if out_spec is not None:
      rows = ple_host.sharded_host_lookup(per_layer_table, ids,
                                          row_shape=row_shape, mesh=mesh,
                                          out_spec=out_spec)
    else:
      rows = ple_host.host_lookup(per_layer_table, ids, row_shape=row_shape)
    return rows.reshape(*tokens.shape, num_layers, per_layer_dim)
  name = implementations.resolve("ple_lookup", implementation, _PLE,
                                 interpret=interpret)
  if validation.has_empty_dim(tokens.shape):  # the Pallas gather tiles rows
    return jnp.zeros((*tokens.shape, num_layers, per_layer_dim),
                     per_layer_table.dtype)
  if name == implementations.REFERENCE:
    return ple_reference.ple_lookup(per_layer_table, tokens,
                                    num_layers=num_layers,
                                    per_layer_dim=per_layer_dim)
  gather_rows = implementations.select(
      "ple_lookup", name,
      {implementations.PALLAS_TPU: functools.partial(
          ple_pallas.gather_rows, interpret=interpret),
       implementations.XLA: ple_xla.gather_rows},
      interpret=interpret, tpu_default=TPU_DEFAULT["ple_lookup"])
  if mesh is not None:
    return ple_sharded.sharded_lookup(
        per_layer_table, tokens, num_layers=num_layers,
        per_layer_dim=per_layer_dim, mesh=mesh, table_spec=table_spec,
        gather_rows=gather_rows)
  rows = gather_rows(per_layer_table,
                     ple_xla.valid_ids(tokens, per_layer_table.shape[0]))
  return rows.reshape(*tokens.shape, num_layers, per_layer_dim)


def per_layer_inputs(embeddings, tokens, per_layer_table, model_projection,
                     projection_norm_scale, *, num_layers, per_layer_dim,
                     mesh=None, table_spec=None, implementation=None,
                     interpret=False):
  """Tunix's `Embedder.encode_per_layer_input`, the combine fused.

  `(rms_norm(embeddings @ (model_projection * D**-0.5)) * norm_scale
  + sqrt(P) * table[tokens]) * rsqrt(2)`, the norm over P per layer, with
  Tunix's dtype casts; the backward pass keeps one `[B, T, L, P]` residual.

  Args:
    embeddings: the scaled token embeddings `[B, T, D]`, floating.
    tokens: integer ids `[B, T]`; ids outside `[0, V)` read row 0.
    per_layer_table: `[V, L, P]`, `[V, L*P]` or a `HostTable`.
    model_projection: the unscaled `[D, L, P]` or `[D, L*P]` projection.
    projection_norm_scale: the norm's scale `[P]`.
    num_layers, per_layer_dim: L and P.
    mesh, table_spec, implementation, interpret: as in `ple_lookup`.

  Returns:
    `[B, T, L, P]` in the promoted dtype of embeddings and table (Tunix's;
    the reference implementation returns the embeddings' dtype).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  for arg, value in (("embeddings", embeddings),
                     ("model_projection", model_projection),
                     ("projection_norm_scale", projection_norm_scale)):
    validation.check_array(arg, value, what="a floating array")
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"{arg} must be floating, got {value.dtype}")
  _check_ple_args(per_layer_table, tokens, num_layers=num_layers,
                  per_layer_dim=per_layer_dim, mesh=mesh,
                  table_spec=table_spec)
  name = implementation
  if not isinstance(per_layer_table, ple_host.HostTable):
    name = implementations.resolve(
        "per_layer_inputs", implementation, _PLE, interpret=interpret)
  if name == implementations.REFERENCE:
    return ple_reference.per_layer_inputs(
        embeddings, tokens, per_layer_table, model_projection,
        projection_norm_scale, num_layers=num_layers,
        per_layer_dim=per_layer_dim)
  ple_reference.check_combine_args(
      embeddings, tokens, model_projection, projection_norm_scale,
      num_layers=num_layers, per_layer_dim=per_layer_dim)
  rows = ple_lookup(per_layer_table, tokens, num_layers=num_layers,
                    per_layer_dim=per_layer_dim, mesh=mesh,
                    table_spec=table_spec, implementation=implementation,
                    interpret=interpret)
  return ple_combine.per_layer_inputs(
      embeddings, rows, model_projection, projection_norm_scale,
      num_layers=num_layers, per_layer_dim=per_layer_dim)


def combine_per_layer_inputs(projected, rows, projection_norm_scale):
  """The per-layer-input combine after the projection matmul, fused.

  `(rms_norm(projected) * norm_scale + sqrt(P) * rows) * rsqrt(2)`, the norm
  over P in float32 (Tunix's casts); the backward pass keeps `projected` as
  its only residual. For callers whose projection is its own module (a qwix
  LoRA'd Einsum); `per_layer_inputs` is the whole computation. One XLA
  elementwise fusion on every platform (it has no implementation choice).

  Args:
    projected: `embeddings @ (model_projection * D**-0.5)` as `[B, T, L, P]`,
      floating (the compute dtype).
    rows: `ple_lookup(...)`, `[B, T, L, P]`.
    projection_norm_scale: `[P]`.

  Returns:
    `[B, T, L, P]` in `result_type(projected, rows)`.

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  for arg, value in (("projected", projected), ("rows", rows),
                     ("projection_norm_scale", projection_norm_scale)):
    validation.check_array(arg, value, what="a floating array")
  if getattr(projected, "ndim", None) != 4:
    raise ValueError(f"projected must be [B, T, L, P], got shape "
                     f"{getattr(projected, 'shape', type(projected))}")
  for name, value in (("projected", projected), ("rows", rows)):
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating, got {value.dtype}")
  if getattr(rows, "shape", None) != projected.shape:
    raise ValueError(f"rows must have projected's shape {projected.shape}, "
                     f"got {getattr(rows, 'shape', None)}")
  if getattr(projection_norm_scale, "shape", None) != projected.shape[-1:]:
    raise ValueError(f"projection_norm_scale must be [P] = "
                     f"{projected.shape[-1:]}, got shape "
                     f"{getattr(projection_norm_scale, 'shape', None)}")
  return ple_combine.normalize_and_add(projected, rows, projection_norm_scale)


def _check_ple_args(per_layer_table, tokens, *, num_layers, per_layer_dim,
                    mesh, table_spec):
  for name, value in (("num_layers", num_layers),
                      ("per_layer_dim", per_layer_dim)):
    validation.check_int(name, value, minimum=1)
  validation.check_array("per_layer_table", per_layer_table)
  validation.check_array("tokens", tokens, what="an integer array")
  shape = getattr(per_layer_table, "shape", None)
  if shape is None or len(shape) not in (2, 3):
    raise ValueError(f"per_layer_table must be [V, L, P] or [V, L*P], got "
                     f"shape {shape}")
  want = ((num_layers, per_layer_dim) if len(shape) == 3
          else (num_layers * per_layer_dim,))
  if tuple(shape[1:]) != want:
    raise ValueError(f"per_layer_table of shape {tuple(shape)} does not match "
                     f"num_layers={num_layers}, per_layer_dim={per_layer_dim}: "
                     f"expected [V, *{want}]")
  if shape[0] == 0:
    # Out-of-range ids read row 0, which an empty table does not have.
    raise ValueError(f"per_layer_table has no rows (V = 0, shape "
                     f"{tuple(shape)}); it needs at least one")
  dtype = getattr(tokens, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"tokens must be an integer array, got dtype {dtype}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
  if (mesh is None) != (table_spec is None):
    raise ValueError(f"pass mesh and table_spec together, got mesh={mesh!r} "
                     f"and table_spec={table_spec!r}")
  validation.check_mesh("ple_lookup", mesh)
  if mesh is not None:
    ple_sharded.table_axes(table_spec, len(shape), mesh)


def lora_matmul(x, w, a, b, *, scale, adapter_ids=None, w_scale=None,
                mesh=None, w_axes=None, implementation=None,
                interpret=False):
  """`x @ w + scale * (x @ a) @ b` with `w` frozen; one or many adapters.

  The Pallas kernel reads each `x` tile once for `w` and `a`, keeps `x @ a`
  in float32 VMEM and adds `@ b` in the epilogue; the XLA version computes
  the same in float32. Neither rounds `x @ a` to x's dtype (qwix does, in
  bfloat16), so they are at least as accurate as qwix.

  Args:
    x: `[..., K]`, float32 or bfloat16 (XLA and reference: any float).
    w: the frozen weight `[K, N]` in x's dtype, or int8 with `w_scale`. Its
      gradient is zero (not computed).
    a: `[K, r]`, or `[n, K, r]` with `adapter_ids`; any float dtype, b's.
    b: `[r, N]`, or `[n, r, N]` with `adapter_ids`.
    scale: `alpha / rank`, a Python number.
    adapter_ids: optional integer `x.shape[:-1]`: row m uses adapter
      `adapter_ids[m]`. Concrete ids outside `[0, n)` raise; under `jit`
      they cannot be checked and such a row gets `x @ w` only (the
      reference implementation instead clamps the index).
    w_scale: `[N]` per-output-channel scales of an int8 `w` (QLoRA):
      `w_float = w * w_scale`.
    mesh: optional mesh (e.g. Tunix's `('fsdp','tp')`): run per shard in
      `jax.shard_map` (`kernels/lora/sharding.py`), rows over `fsdp`, with
      `w_axes`; many adapters are kept whole on every shard.
    w_axes: the mesh axis (or None) of `w`'s two dims, e.g. `("fsdp",
      "tp")`.
    implementation: None, "pallas_tpu", "xla" or "reference" (see the module
      docstring).
    interpret: run the Pallas kernel in interpret mode (CPU).

  Returns:
    `[..., N]` in x's dtype (empty, without running a kernel, when x has no
    rows or w no columns; K = 0 and rank 0 are errors).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
    RuntimeError: a forced implementation cannot run here.
  """
  _check_lora_args("lora_matmul", x=x, w=w, a=a, b=b, scale=scale,
                   adapter_ids=adapter_ids, w_scale=w_scale, mesh=mesh,
                   w_axes=w_axes)
  lora_common.check_lora_matmul_args(x, w, a, b, scale=scale,
                                     adapter_ids=adapter_ids,
                                     w_scale=w_scale)
  _check_lora_sizes("lora_matmul", k=w.shape[0], rank=a.shape[-1])
  name = _lora_implementation("lora_matmul", implementation, x.dtype,
                              interpret)
  lead, (k, n) = x.shape[:-1], w.shape
  if validation.has_empty_dim(lead, (n,)):
    return jnp.zeros((*lead, n), x.dtype)  # no rows or no columns
  x2 = x.reshape(-1, k)
  ids = None if adapter_ids is None else adapter_ids.reshape(-1)

  def reference(x2, w, a, b, w_scale, ids):
    if w_scale is not None:
      w = w.astype(jnp.float32) * w_scale
    return lora_reference.lora_matmul(x2, w, a, b, scale=scale,
                                      adapter_ids=ids)

  def xla(x2, w, a, b, w_scale, ids):
    return lora_xla.lora_matmul(x2, w, a, b, scale=scale, adapter_ids=ids,
                                w_scale=w_scale)

  def pallas(x2, w, a, b, w_scale, ids):
    return lora_pallas.lora_matmul(x2, w, a, b, scale=scale, adapter_ids=ids,
                                   w_scale=w_scale, interpret=interpret)

  run = implementations.select(
      "lora_matmul", name, {implementations.REFERENCE: reference,
                            implementations.XLA: xla,
                            implementations.PALLAS_TPU: pallas},
      interpret=interpret, tpu_default=TPU_DEFAULT["lora_matmul"])

  def local(x2, w, a, b, w_scale, ids):
    if w_scale is not None:  # [1, N] per shard (w's rank for the layout)
      w_scale = w_scale.reshape(-1)
    return run(x2, w, a, b, w_scale, ids)

  if mesh is None:
    out = local(x2, w, a, b, w_scale, ids)
  else:
    _check_w_axes("lora_matmul", w_axes, w.ndim)
    out = lora_sharding.shard_einsum(
        local, "mk,kn->mn", x2, w, a, b, mesh=mesh, w_axes=w_axes,
        w_scale=None if w_scale is None else w_scale.reshape(1, n),
        adapter_ids=ids)
  return out.reshape(*lead, n)


def _lora_implementation(op, implementation, dtype, interpret):
  """`resolve`'s answer for a LoRA op on `dtype`: the kernel takes float32
  and bfloat16 only, so other dtypes run the XLA version by default."""
  name = implementations.resolve(op, implementation, AVAILABLE["lora_matmul"],
                                 interpret=interpret)
  if dtype in lora_common.KERNEL_DTYPES:
    return name
  if name == implementations.PALLAS_TPU:
    raise TypeError(f"{op}: the Pallas kernel takes float32 or bfloat16 x, "
                    f"got {dtype}")
  return implementations.XLA if name == implementations.BY_PLATFORM else name


def _check_w_axes(op_name, w_axes, ndim):
  if w_axes is None or len(w_axes) > ndim:
    raise ValueError(f"{op_name}: with a mesh, w_axes must name a mesh axis "
                     f"or None for each of w's {ndim} dims, got {w_axes!r}")


def _check_lora_args(op, *, scale, w_scale, mesh, w_axes, adapter_ids=None,
                     **arrays):
  """What `lora_common.check_lora_matmul_args` leaves to the public ops:
  array-likes, a finite scale, the mesh and the axes it must have."""
  for name, value in arrays.items():
    validation.check_array(name, value)
  for name, value in (("adapter_ids", adapter_ids), ("w_scale", w_scale)):
    if value is not None:
      validation.check_array(name, value)
  validation.check_number("scale", scale, what="alpha / rank")
  validation.check_mesh(op, mesh)
  if mesh is None:
    if w_axes is not None:
      raise ValueError(f"{op}: w_axes {w_axes!r} is only used with a mesh; "
                       f"pass mesh= too, or no w_axes")
    return
  if isinstance(w_axes, str):  # a bare name would be read letter by letter
    raise TypeError(f"{op}: w_axes must be a tuple with one entry per dim of "
                    f"w, got the string {w_axes!r}")
  _check_w_axes(op, w_axes, arrays["w"].ndim)
  validation.check_mesh_axes(op, "w_axes", w_axes, mesh)


def _check_lora_sizes(op, *, k, rank):
  if k == 0:
    raise ValueError(f"{op}: w has no input features (K = 0); x @ w would "
                     f"be all zeros")
  if rank == 0:
    raise ValueError(f"{op}: the adapter has rank r = 0 (a and b are empty); "
                     f"use a rank >= 1, or no adapter")


def _einsum_operands(equation):
  """`(x letters, w letters, out letters)` of a two-operand einsum, or a
  message saying why it is not one."""
  operands, arrow, out = equation.replace(" ", "").partition("->")
  parts = operands.split(",")
  letters = "".join(parts) + out
  if not arrow or len(parts) != 2 or "->" in out or not (
      letters.isascii() and letters.isalpha()):
    return None, ("expected two operands of letters and an output, like "
                  "'BTD,NDH->BTNH'")
  lhs, rhs = parts
  for label, axes in (("x's operand", lhs), ("w's operand", rhs),
                      ("the output", out)):
    if len(set(axes)) != len(axes):
      return None, f"{label} {axes!r} repeats a letter"
  stray = sorted(set(out) - set(lhs + rhs))
  if stray:
    return None, f"output letters {stray} are in neither operand"
  kept = sorted(c for c in lhs if c not in rhs and c not in out)
  if kept:
    return None, f"x's letters {kept} are neither contracted nor in the output"
  return (lhs, rhs, out), None


def _check_einsum_args(equation, x, w):
  """Raises for an equation that is malformed or does not fit x and w."""
  if not isinstance(equation, str):
    raise TypeError(f"lora_einsum: equation must be a str, got "
                    f"{type(equation).__name__}")
  parsed, why = _einsum_operands(equation)
  if parsed is None:
    raise ValueError(f"lora_einsum: equation {equation!r}: {why}")
  lhs, rhs, _ = parsed
  for name, axes, value in (("x", lhs, x), ("w", rhs, w)):
    if len(axes) != value.ndim:
      raise ValueError(f"lora_einsum: equation {equation!r} gives {name} "
                       f"{len(axes)} axes ({axes!r}) but {name} has shape "
                       f"{tuple(value.shape)}")
  x_size, w_size = dict(zip(lhs, x.shape)), dict(zip(rhs, w.shape))
  for c in lhs:
    if c in w_size and x_size[c] != w_size[c]:
      raise ValueError(f"lora_einsum: axis {c!r} of {equation!r} is "
                       f"{x_size[c]} in x {tuple(x.shape)} but {w_size[c]} "
                       f"in w {tuple(w.shape)}")


def lora_einsum(equation, x, w, lora_a, lora_b, *, scale, w_scale=None,
                mesh=None, w_axes=None, implementation=None,
                interpret=False):
  """qwix's LoRA einsum `einsum(equation, x, w) + scale * einsum(x, a, b)`.

  `lora_a` holds w's axes shared with x (in w's order) and the rank,
  `lora_b` the rank and w's other axes, as qwix creates them. Runs on the
  `lora_matmul` kernel by reshapes (`kernels/lora/einsum.py` lists the
  forms: every one qwix produces on Gemma 4).

  Args:
    equation: two operands, letters only, e.g. `"BTD,NDH->BTNH"`.
    x, w: the einsum's operands; same floating dtype (float32 or bfloat16
      for the Pallas kernel), or an int8 `w` with `w_scale`.
    lora_a, lora_b: the adapter; one floating dtype.
    scale: `alpha / rank`.
    w_scale: per-channel scales of an int8 `w`: w's shape with 1 on the
      contracted axes (qwix's channelwise int8), `w_float = w * w_scale`.
    mesh: optional mesh (e.g. Tunix's `('fsdp','tp')`): run per shard in
      `jax.shard_map` (`kernels/lora/sharding.py`); needs `w_axes`.
    w_axes: the mesh axis (or None) of each dim of `w`, as Tunix shards it.
    implementation, interpret: as `lora_matmul`.

  Returns:
    The einsum's output in x's dtype.

  Raises:
    ValueError: an equation the op cannot express (see `lora_einsum_plan`)
      or adapter shapes that do not fit it.
    TypeError: dtypes, as `lora_matmul`.
  """
  _check_lora_args("lora_einsum", x=x, w=w, lora_a=lora_a, lora_b=lora_b,
                   scale=scale, w_scale=w_scale, mesh=mesh, w_axes=w_axes)
  _check_einsum_args(equation, x, w)
  plan = lora_einsum_plan(equation, x.shape, w.shape)
  if plan is None:
    raise ValueError(f"lora_einsum cannot express {equation!r} with x "
                     f"{x.shape} and w {w.shape} (an axis shared by x and "
                     f"w must be contracted and x's contracted axes last)")
  rank = lora_b.shape[0] if lora_b.ndim else 0
  want_a, want_b = (*plan.contracted_shape, rank), (
      rank, *plan.group_shape, *plan.column_shape)
  if lora_a.shape != want_a or lora_b.shape != want_b:
    raise ValueError(f"for {equation!r} with w {w.shape}, lora_a must be "
                     f"{want_a} and lora_b {want_b}, got lora_a "
                     f"{lora_a.shape} and lora_b {lora_b.shape}")
  scale_2d = None
  if w_scale is not None:
    want = tuple(1 if c in equation.split(",")[0] else d for c, d in zip(
        equation.split("->")[0].split(",")[1], w.shape))
    if getattr(w_scale, "shape", None) != want:
      raise ValueError(f"w_scale must be {want} (w's shape with 1 on the "
                       f"contracted axes), got "
                       f"{getattr(w_scale, 'shape', None)}")
    scale_2d = jax.ShapeDtypeStruct((plan.n,), w_scale.dtype)
  lora_common.check_lora_matmul_args(
      x.reshape(plan.m, plan.k), jax.ShapeDtypeStruct((plan.k, plan.n),
                                                      w.dtype),
      jax.ShapeDtypeStruct((plan.k, rank), lora_a.dtype),
      jax.ShapeDtypeStruct((rank, plan.n), lora_b.dtype), scale=scale,
      adapter_ids=None, w_scale=scale_2d)
  _check_lora_sizes("lora_einsum", k=plan.k, rank=rank)
  name = _lora_implementation("lora_einsum", implementation, x.dtype,
                              interpret)
  if validation.has_empty_dim(plan.out_shape):
    return jnp.zeros(plan.out_shape, x.dtype)

  def reference(x, w, lora_a, lora_b, w_scale):
    if w_scale is not None:
      w = w.astype(jnp.float32) * w_scale
    return lora_reference.lora_einsum(equation, x, w, lora_a, lora_b,
                                      scale=scale)

  def xla(x, w, lora_a, lora_b, w_scale):
    local_plan = lora_einsum_lib.plan(equation, x.shape, w.shape)
    return lora_einsum_lib.run_xla(local_plan, equation, x, w, lora_a,
                                   lora_b, scale=scale, w_scale=w_scale)

  def pallas(x, w, lora_a, lora_b, w_scale):
    local_plan = lora_einsum_lib.plan(equation, x.shape, w.shape)
    return lora_einsum_lib.run_pallas(local_plan, x, w, lora_a, lora_b,
                                      scale=scale, w_scale=w_scale,
                                      interpret=interpret)

  run = implementations.select(
      "lora_einsum", name, {implementations.REFERENCE: reference,
                            implementations.XLA: xla,
                            implementations.PALLAS_TPU: pallas},
      interpret=interpret, tpu_default=TPU_DEFAULT["lora_matmul"])

  def local(x, w, lora_a, lora_b, w_scale, adapter_ids):
    del adapter_ids  # lora_einsum runs one adapter
    return run(x, w, lora_a, lora_b, w_scale)

  if mesh is None:
    return local(x, w, lora_a, lora_b, w_scale, None)
  _check_w_axes("lora_einsum", w_axes, w.ndim)
  return lora_sharding.shard_einsum(local, equation, x, w, lora_a, lora_b,
                                    mesh=mesh, w_axes=w_axes,
                                    w_scale=w_scale)


def lora_einsum_plan(equation, x_shape, w_shape):
  """How `lora_einsum` maps `equation`, or None if it cannot express it."""
  if not isinstance(equation, str):
    raise TypeError(f"equation must be a str, got {type(equation).__name__}")
  if _einsum_operands(equation)[0] is None:
    return None
  return lora_einsum_lib.plan(equation, tuple(x_shape), tuple(w_shape))


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
      unsharded). A mesh with neither axis is an error.

  Returns:
    `(sum(weights * nll), sum(weights))`, float32 scalars; `(0, 0)` when
    there are no tokens (B or T is 0).

  Raises:
    ValueError / TypeError: naming the argument and expected vs actual.
  """
  _check_loss_args(hidden, embedding, targets, weights, softcap, mesh)
  name = implementations.resolve("softcapped_cross_entropy", implementation,
                                 _LOSS, interpret=interpret)
  if validation.has_empty_dim(hidden.shape[:2]):
    # No tokens: both sums are 0 (the kernels tile the token axis).
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  targets = targets.astype(jnp.int32)
  weights = weights.astype(jnp.float32)
  if (block_sizes is not None and name != implementations.BY_PLATFORM and
      not isinstance(block_sizes, _LOSS_MODULES.get(name, ()))):
    want = _LOSS_MODULES.get(name)
    raise TypeError(f"block_sizes must be a "
                    f"{want.__module__ if want else 'no'}.BlockSizes for "
                    f"implementation {name!r}, got {block_sizes!r}")

  def reference(hidden, embedding, targets, weights):
    nll = loss_reference.token_nll(hidden, embedding, targets,
                                   softcap=softcap)
    return jnp.sum(weights * nll), jnp.sum(weights)

  def fused(module):
    # Under BY_PLATFORM, given block sizes go to the implementation they
    # belong to; the other one takes its defaults.
    sizes = (block_sizes if isinstance(block_sizes, module.BlockSizes)
             else module.BlockSizes.get_default())
    passes = module.passes(sizes, interpret=interpret)
    return lambda h, e, t, w: loss_fused.loss_sums(
        h, e, t, w, softcap=softcap, passes=passes, mesh=mesh)

  run = implementations.select(
      "softcapped_cross_entropy", name,
      {implementations.REFERENCE: reference,
       implementations.XLA: fused(loss_xla),
       implementations.PALLAS_TPU: fused(loss_pallas)},
      interpret=interpret,
      tpu_default=TPU_DEFAULT["softcapped_cross_entropy"])
  return run(hidden, embedding, targets, weights)


_LOSS_MODULES = {implementations.PALLAS_TPU: loss_pallas.BlockSizes,
                 implementations.XLA: loss_xla.BlockSizes}


def _check_loss_args(hidden, embedding, targets, weights, softcap, mesh):
  for name, x in (("hidden", hidden), ("embedding", embedding),
                  ("targets", targets), ("weights", weights)):
    validation.check_array(name, x)
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
  validation.check_number("softcap", softcap, positive=True, allow_none=True)
  vocab, embed_dim = embedding.shape
  if vocab == 0 or embed_dim == 0:
    raise ValueError(f"embedding must have V >= 1 rows and D >= 1 columns, "
                     f"got shape {embedding.shape}")
  validation.check_mesh("softcapped_cross_entropy", mesh)
  wanted = (loss_fused.BATCH_AXIS, loss_fused.VOCAB_AXIS)
  if mesh is not None and not set(wanted) & set(mesh.axis_names):
    # It would run unsharded without a word.
    raise ValueError(f"softcapped_cross_entropy: mesh has axes "
                     f"{tuple(mesh.axis_names)}, none of {wanted} (tokens "
                     f"are split over {wanted[0]!r}, the vocab over "
                     f"{wanted[1]!r})")
  if not isinstance(targets, jax.core.Tracer) and targets.size:
    vocab = embedding.shape[0]
    ids = np.asarray(targets)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
      bad = low if low < 0 else high
      position = tuple(int(i) for i in np.argwhere(ids == bad)[0])
      raise ValueError(f"targets must be in [0, V) = [0, {vocab}), got "
                       f"{bad} at {position}")
