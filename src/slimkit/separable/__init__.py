"""Depthwise-separable factorization of standard convolutions (MobileNet-style).

``fit.py``: the least-squares fit of a depthwise + pointwise pair to a dense kernel (pure
math); ``stage.py``: the ``SeparableConv2d`` layer and the ``separable`` stage.
"""
