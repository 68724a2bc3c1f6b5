"""samantic.train: data sources, feature caches, trainers and metrics.

Never imported by the runtime path (a Jetson install needs only
``samantic.runtime`` and ``samantic._C``).
"""
