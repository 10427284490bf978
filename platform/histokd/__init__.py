"""histokd: knowledge-distillation pretraining of small pathology backbones, on Ray."""

from histokd.compat import install_import_hook

install_import_hook()  # lets timm import beside the CPU torch wheel (see histokd.compat)

__version__ = "0.1.0"
