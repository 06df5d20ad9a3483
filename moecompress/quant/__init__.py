"""Quantization algorithms (pure functions), packing and on-disk formats."""
