"""Per-Layer Embedding (PLE): row gather, fused combine, sharded and host
lookups."""
