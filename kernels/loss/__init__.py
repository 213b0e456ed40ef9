"""Fused softcapped final projection + cross-entropy (never the logits).

`vjp` (the `custom_vjp` both versions share) <- `sharding` (its passes in
`jax.shard_map`) <- `xla` / `pallas_tpu` (+ `pallas_tpu_kernel`), all on
the tile math in `tile`; `top_k` streams the same tiles for the perplexity
command's top-k.
"""
