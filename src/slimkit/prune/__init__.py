"""Pruning: importance criteria, sparse storage, methods."""
