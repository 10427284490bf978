"""Features for slide-level models, and an attention-MIL baseline on them.

* `run_extraction`: a frozen backbone's pooled features of every tissue patch of every slide,
  one HDF5 file per slide in the layout CLAM and TRIDENT read (Ray Data, GPU actors).
* `run_mil`: ABMIL (Ilse et al. 2018, gated attention) on those files from a CSV of slide
  labels, k-fold cross-validation grouped by patient, bootstrap intervals.
"""

from histokd.lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "config": ["ExtractConfig", "MilConfig"],
        "extract": ["ExtractResult", "h5_is_complete", "load_encoder", "run_extraction",
                    "write_features_h5"],
        "mil": ["ABMIL", "MilResult", "read_bags", "run_mil"],
    },
)  # fmt: skip
