"""Gemma 4 attention implementations."""
