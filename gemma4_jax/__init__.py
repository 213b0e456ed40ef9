"""gemma4-jax: Pallas TPU kernels and Tunix patches for fine-tuning Gemma 4.

Importing the package patches nothing; see `gemma4_jax.patches.apply()`.
"""

__version__ = "0.1.0"
