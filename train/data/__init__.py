"""Training and evaluation data sources.

- :mod:`samantic.train.data.shapes`: the procedural shapes world (seeded single-object
  images and multi-object scenes, written as COCO datasets).
- :mod:`samantic.train.data.panoptic`: the shapes world v2 (stuff regions, composite
  things with parts, one salient thing; COCO panoptic plus instance, part, entity and
  salient annotations).
"""
