"""Fine-tuning and evaluation on downstream tasks (RCKD Sec. 2.2.2, Algorithm 2, Sec. 3).

* `run_finetune`: five seeded splits, each a Ray Train run, early stopping on the validation
  loss, the best epoch tested, mean ± std and bootstrap intervals, MLflow.
* `run_search`: Ray Tune over resolution, learning rate and positional encodings (Fig. 5).
* `run_comparison`: backbones x initialisations, Tables 3/4 and Fig. 10.
"""

from histokd.lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "config": ["DEMO_PRESET", "FinetuneConfig"],
        "datasets": ["TaskDataset", "load_task_dataset"],
        "early_stopping": ["EarlyStopping"],
        "evaluation": ["summarize_splits"],
        "job": ["FinetuneResult", "prepare_dataset", "run_finetune"],
        "splits": ["Split", "make_splits"],
    },
)
