"""Training stages that run after any technique: supervised fine-tuning."""
