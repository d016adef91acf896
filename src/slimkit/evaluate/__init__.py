"""Measuring models: task metrics, size on disk, params, MACs, latency, memory, robustness.

Submodules are imported on use; this package imports nothing heavy by itself.
"""

from __future__ import annotations
