"""Reports: a rich table for the terminal, markdown, JSON and a Pareto plot.

Submodules are imported on use (the plot imports matplotlib only when drawing).
"""

from __future__ import annotations
