"""Per-Layer Embedding (PLE) kernels: the row gather (XLA and Pallas TPU),
the sharded lookup and the fused per-layer-input combine."""
