"""Artifacts on disk: atomic writes, checksums, safe loading."""
