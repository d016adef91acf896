"""Entropy coding of compressed artifacts' integer streams."""
