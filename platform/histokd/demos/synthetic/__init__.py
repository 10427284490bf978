"""Synthetic H&E-like slides with exact ground truth, for the demo, the tests and the demo teacher.

* :func:`make_demo_slides` writes Aperio-style SVS pyramids (20x at 0.5 um/px by default)
  with a nuclei instance mask and a tissue class mask beside each; :func:`read_truth`
  reads crops of those masks aligned with OpenSlide's ``read_region``.
* :func:`synthesize_slide` draws one slide in memory.
* :func:`write_tiled_tiff` writes any array as a plain tiled TIFF pyramid, for slide-layer
  edge cases (tiny slides, blank slides, slides without magnification).
"""

from histokd.demos.synthetic.demo import (
    GENERATOR_VERSION,
    DemoSlide,
    load_demo_slide,
    make_demo_slides,
    read_truth,
)
from histokd.demos.synthetic.slide import SlideSpec, SyntheticSlide, synthesize_slide
from histokd.demos.synthetic.tiff import (
    read_tiff_region,
    write_label_tiff,
    write_svs,
    write_tiled_tiff,
)
from histokd.demos.synthetic.tissue import DEFAULT_CLASSES, TissueClass

__all__ = [
    "DEFAULT_CLASSES",
    "GENERATOR_VERSION",
    "DemoSlide",
    "SlideSpec",
    "SyntheticSlide",
    "TissueClass",
    "load_demo_slide",
    "make_demo_slides",
    "read_tiff_region",
    "read_truth",
    "synthesize_slide",
    "write_label_tiff",
    "write_svs",
    "write_tiled_tiff",
]
