"""Weight formats: one idea of storing a weight each (affine integer codes, codebooks,
sparse values with masks, their compositions), as small immutable values with
``encode``, ``decode``, their integer ``streams`` and a spec."""
