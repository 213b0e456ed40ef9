"""Gemma 4 attention implementations."""

# What the forward pass names (`jax.ad_checkpoint.checkpoint_name`) for remat
# policies: the output and the logsumexp that the backward pass reads. Saving
# both spares the backward pass a second run of the forward kernel.
OUTPUT = "gemma4_attention_output"
LOGSUMEXP = "gemma4_attention_logsumexp"
