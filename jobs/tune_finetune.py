"""Ray Tune search over fine-tuning settings (RCKD Sec. 3.1, Fig. 5).

    python jobs/tune_finetune.py                               # demo task, small grid, offline
    python jobs/tune_finetune.py --data /data/lymph --init runs/tcga/backbone.pth
    python jobs/tune_finetune.py --data /data/lymph --space space.yaml --scheduler asha

Default grid: input resolution {224, 384} x learning rate {1e-3, 1e-4} x positional encodings
{frozen, trained} = 8 trials, each a five-split fine-tuning job scored by its split mean. Other
spaces from a YAML file (--space), an ASHA scheduler (--scheduler asha). Trials are named by
trial id: rerunning with the same --run-name resumes an interrupted search. Writes
STORAGE/RUN/search_results.{csv,md,png}, also to MLflow.
"""

from __future__ import annotations

import sys

from histokd.cli import run_job
from histokd.finetune.config import DEMO_PRESET
from histokd.finetune.search import SearchConfig

# The demo: the paper's grid scaled to the demo's 256 px patches (resolutions 56 and 96 for
# 224 and 384; learning rates 10x larger, as in the fine-tuning demo), three splits.
DEMO_SEARCH_PRESET = {
    "finetune": dict(DEMO_PRESET, num_splits=3, epochs=15, patience=5),
    "input_sizes": [56, 96],
    "lrs": [1e-2, 1e-3],
}


def _run(config: SearchConfig):
    from histokd.finetune.search import run_search

    return run_search(config)


def _report(result) -> None:
    print(f"\ntable: {result.files['markdown']}\nchart: {result.files['chart']}")


def main(argv: list[str] | None = None) -> int:
    return run_job(
        SearchConfig, _run, argv, description=__doc__, presets={"demo": DEMO_SEARCH_PRESET},
        default_preset=lambda values: None if values.get("finetune", {}).get("data") else "demo",
        report=_report,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
