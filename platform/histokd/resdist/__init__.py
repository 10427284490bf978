"""Resolution-based distillation (DiPalma et al., Artificial Intelligence in Medicine 2021).

A teacher trained at high magnification (10x) teaches a student of the same GroupNorm ResNet
that sees the same tissue regions at an n-times lower magnification, by a soft loss on the
logits and a pixel loss on the last feature maps (Eqs. 1-3; :mod:`histokd.losses.resolution_kd`),
on labelled or unlabelled (auxiliary) regions, then optionally fine-tunes its last layer.

Data flows through :mod:`~histokd.resdist.regions` (tissue regions, Lanczos-downsampled from the
original), :mod:`~histokd.resdist.region_set` (data table in, region images out),
:mod:`~histokd.resdist.dataset` (single variable-size images), :mod:`~histokd.resdist.model`
(the network and its task-model file), :mod:`~histokd.resdist.loop` (the Ray Train worker loop)
and :mod:`~histokd.resdist.job` (the drivers) to :mod:`~histokd.resdist.evaluation` (Tables 5-8,
Fig. 3); :mod:`~histokd.resdist.search` is Ray Tune, :mod:`~histokd.demos.resdist` the offline demo.
The package imports nothing itself: the jobs' ``--help`` reads only :mod:`~histokd.resdist.config`.
"""
