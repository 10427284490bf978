"""Resolution-based distillation (DiPalma et al., Artificial Intelligence in Medicine 2021).

A 10x teacher teaches a student of the same GroupNorm ResNet that sees the same tissue regions
at a lower magnification, by a soft loss on the logits and a pixel loss on the last feature maps
(Eqs. 1-3; :mod:`histokd.losses.resolution_kd`). Data flows regions -> region_set -> dataset ->
loop (driven by job) -> model files -> evaluation; search is Ray Tune. Imports nothing itself.
"""
