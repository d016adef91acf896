"""Calibration machinery shared by every technique: input capture, block-by-block
sequential calibration, Hessian accumulation."""
