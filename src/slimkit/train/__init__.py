"""Training: the one loop every trainer runs (``fit``), its optimizers and checkpoint, and the
supervised fine-tuning stage that runs after any technique."""
