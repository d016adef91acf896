"""Knowledge distillation: a student trained on a teacher's soft labels, features and
attention maps."""
