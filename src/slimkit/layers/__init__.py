"""Compressed layers and the storage they hold: affine integer codes, packed bits, codebooks,
sparse values with masks."""
