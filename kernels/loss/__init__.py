"""Fused softcapped final projection + cross-entropy (never the logits)."""
