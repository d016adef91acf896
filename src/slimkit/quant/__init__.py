"""Quantization: primitives, quantized modules and methods."""
