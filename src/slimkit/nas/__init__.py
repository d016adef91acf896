"""Architecture search: a search space of small CNNs and MLPs, evolution under a cost limit.

``space.py`` (genomes, the space, the standard-layer models they build), ``search.py``
(evolution with tournament selection, one-gene mutation, logged and resumable trials,
parallel trials in local processes, the Pareto front), ``stage.py`` (the ``nas`` stage),
``plot.py`` (the Pareto plot of the trials).
"""
