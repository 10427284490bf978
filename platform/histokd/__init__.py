"""histokd: knowledge-distillation pretraining of small pathology backbones, on Ray."""

__version__ = "0.1.0"

from histokd.compat import install_import_hook  # noqa: E402

# Lets timm import beside the CPU torch wheel and registers histokd's backbones with timm once
# it is imported; loads neither torch nor timm itself (see histokd.compat).
install_import_hook()
