"""Named benchmark shapes for the fused LoRA matmul (Gemma 4 E2B, E4B)."""

TOKENS = 4096
# name -> (K, N) of the frozen weight, E2B unless named otherwise.
SHAPES = {
    "q (sliding)": (1536, 2048),
    "kv": (1536, 512),
    "attention out": (2048, 1536),
    "mlp up/gate": (1536, 6144),
    "mlp down": (6144, 1536),
    "mlp up/gate (wide)": (1536, 12288),
    "mlp down (wide)": (12288, 1536),
    "per-layer model proj": (1536, 8960),
    "E4B mlp up/gate": (2560, 10240),
}
MLP_SHAPES = ("mlp up/gate", "mlp down")
RANKS = (16, 64)
