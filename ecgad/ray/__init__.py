"""The Ray adapters of ecgad, and the only part of the library that imports Ray.

Everything else in ``ecgad`` (readers, preparation, the model, scoring, metrics, layouts) imports without Ray and is
unit-tested without a cluster; the modules here wrap those pieces for Ray Data, Ray Train and the scoring actors
without changing what they compute. ``tests/test_boundary.py`` keeps it so.
"""
