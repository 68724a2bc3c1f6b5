"""Training and evaluation data sources.

- :mod:`samantic.train.data.shapes`: the procedural shapes world (seeded single-object
  images and multi-object scenes, written as COCO datasets).
"""
