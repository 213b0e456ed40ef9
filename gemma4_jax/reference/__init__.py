"""Float32 oracles, written to be obviously right; kernels are tested against these."""
