"""Kernels and their math below the models: varlen attention, the chunked weighted loss, recompute policies."""
