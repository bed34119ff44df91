"""Glue between also_fused and training frameworks; each module is imported on its own, and only it
needs its framework installed (``import also_fused`` needs torch alone):

* ``also_fused.integrations.lightning``: ``GroupWeightsCallback`` for ``lightning.Trainer``, and the
  ALSO pattern (no callback needed);
* ``also_fused.integrations.transformers``: ``GroupWeightedTrainer``, a ``transformers.Trainer`` that
  weighs per-sample losses with ALSO or a ``GroupWeights``;
* ``also_fused.integrations.accelerate``: ``prepare_group_weights`` for ``accelerate.Accelerator``,
  and the ALSO pattern with ``prepare`` and ``accumulate``.

docs/integrations.md shows each one in a short example.
"""
