"""Fine-tuning and evaluation on downstream tasks (RCKD Sec. 2.2.2, Algorithm 2, Sec. 3).

* `run_finetune`: five seeded splits, each a Ray Train run, early stopping on the validation
  loss, the best epoch tested, mean ± std and bootstrap intervals, MLflow.
* `run_search`: Ray Tune over resolution, learning rate and positional encodings (Fig. 5).
* `run_comparison`: backbones x initialisations, Tables 3/4 and Fig. 10.
* `make_demo_tasks`: classification and segmentation datasets cut from synthetic slides.
"""

from histokd.finetune.config import DEMO_PRESET, FinetuneConfig
from histokd.finetune.datasets import TaskDataset, load_task_dataset
from histokd.finetune.demo_tasks import DemoTasks, make_demo_tasks
from histokd.finetune.early_stopping import EarlyStopping
from histokd.finetune.evaluation import summarize_splits
from histokd.finetune.job import FinetuneResult, prepare_dataset, run_finetune
from histokd.finetune.splits import Split, make_splits

__all__ = [
    "DEMO_PRESET",
    "DemoTasks",
    "EarlyStopping",
    "FinetuneConfig",
    "FinetuneResult",
    "Split",
    "TaskDataset",
    "load_task_dataset",
    "make_demo_tasks",
    "make_splits",
    "prepare_dataset",
    "run_finetune",
    "summarize_splits",
]
