"""Comparing pretraining: every backbone x initialisation fine-tuned on every dataset.

RCKD Sec. 3.2-3.3 and 3.6: Tables 3 and 4 (accuracy per classification dataset, mIoU per
segmentation dataset, their averages, with each backbone's parameters and GMAC) and Fig. 10
(average accuracy against GMAC, circle size by parameters, colour by pretraining method). Each
cell is one fine-tuning job (`run_finetune`, five splits by default), named
``RUN_NAME-DATASET-BACKBONE-INIT``, so rerunning a comparison skips what it finished.

Initialisations: random weights (``random_init``), backbone files (``inits``: RCKD
pretraining's output, label "RCKD") and timm weights (``timm_weights``: ImageNet-supervised
weights, label "SPT on ImageNet": ``BACKBONE=imagenet`` from the Hugging Face Hub, a local file, or
``hf-hub:ORG/NAME``). Each entry is ``[LABEL@]BACKBONE=PATH``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from histokd.cli import arg, save_config
from histokd.finetune.config import FinetuneConfig, refuse_register_model
from histokd.run import RunConfig, holds_run_lock, open_mlflow_run

__all__ = ["CompareConfig", "ComparisonResult", "parse_init_entry", "run_comparison"]


def parse_init_entry(entry: str, field_name: str, default_label: str) -> tuple[str, str, str]:
    """``[LABEL@]BACKBONE=PATH`` -> (label, backbone, absolute path).

    Raises:
        ValueError: Bad syntax, an unknown backbone or a missing file, naming the field.
    """
    from histokd.models import BACKBONES

    match = re.fullmatch(r"(?:(?P<label>[^@=]+)@)?(?P<backbone>[\w]+)=(?P<path>.+)", entry.strip())
    if not match:
        raise ValueError(
            f"{field_name}: {entry!r}; expected [LABEL@]BACKBONE=PATH, e.g. csat=runs/rckd/backbone.pth"
        )
    backbone, path = match["backbone"], match["path"]
    if backbone not in BACKBONES:
        raise ValueError(
            f"{field_name}: {entry!r}: backbone {backbone!r} unknown; allowed: {', '.join(BACKBONES)}"
        )
    label = (match["label"] or default_label).strip()
    if field_name == "timm_weights" and (path == "imagenet" or path.startswith("hf-hub:")):
        from histokd.models.timm_weights import check_init

        return label, backbone, check_init(path, backbone, f"{field_name}: {entry!r}: init")
    if not os.path.isfile(path):
        raise ValueError(f"{field_name}: {entry!r}: no such file {path!r}")
    return label, backbone, os.path.abspath(path)


def _parse_dataset(entry: str, field_name: str) -> tuple[str, str]:
    name, sep, path = entry.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"{field_name}: {entry!r}; expected NAME=PATH (a folder or CSV)")
    if not os.path.exists(path):
        raise ValueError(f"{field_name}: {entry!r}: no such folder or file {path!r}")
    return name.strip(), os.path.abspath(path)


#: FinetuneConfig fields that `run_comparison` sets per cell, and what to give instead.
_PER_CELL = {
    "data": "give the datasets as --datasets NAME=PATH (classification) or --segmentation-datasets NAME=PATH",
    "task": "give segmentation datasets as --segmentation-datasets NAME=PATH, classification ones as --datasets NAME=PATH",
    "backbone": "give the backbones as --backbones (random weights), or as BACKBONE in --inits / --timm-weights",
    "init": "give the initialisations as --random-init, --inits [LABEL@]BACKBONE=PATH or --timm-weights [LABEL@]BACKBONE=PATH",
    "init_label": "give labels as LABEL@ in --inits / --timm-weights ([LABEL@]BACKBONE=PATH)",
}


@dataclass
class CompareConfig(RunConfig):
    """Backbones x initialisations x datasets, each cell a fine-tuning job (``finetune``: the
    shared settings; its ``data``, ``task``, ``backbone``, ``init`` and ``init_label`` are set
    per cell, so giving them is an error).

    Attributes:
        backbones: Fine-tuned from random weights, and listed in the tables.
        inits: Backbone files, ``[LABEL@]BACKBONE=PATH``; the label defaults to ``RCKD`` (e.g.
            ``csat=runs/rckd/backbone.pth``).
        timm_weights: timm weights, ``[LABEL@]BACKBONE=PATH``, PATH a local file, ``imagenet``
            or ``hf-hub:ORG/NAME``; the label defaults to ``SPT on ImageNet``.
        datasets: Classification datasets, ``NAME=PATH``; with none and no
            ``segmentation_datasets``, the demo task.
    """

    run_name: str = arg("compare", "name of the comparison; rerunning it skips finished cells")
    mlflow_experiment: str = arg("histokd-compare", "MLflow experiment name")
    finetune: FinetuneConfig = arg(help="the fine-tuning of every cell", factory=FinetuneConfig)
    backbones: list[str] = arg(help="fine-tuned from random weights", factory=lambda: ["csat"])
    random_init: bool = arg(True, "random initialisation of every backbone (RCKD: Random Weight)")
    inits: list[str] = arg(help="[LABEL@]BACKBONE=PATH", factory=list, aliases=["backbone_files"])
    timm_weights: list[str] = arg(
        help="[LABEL@]BACKBONE=PATH, imagenet or hf-hub:ORG/NAME", factory=list
    )
    datasets: list[str] = arg(help="classification datasets, NAME=PATH; none: demo", factory=list)
    segmentation_datasets: list[str] = arg(help="segmentation datasets, NAME=PATH", factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        given = (
            dict(self.finetune) if isinstance(self.finetune, dict) else vars(self.finetune).copy()
        )
        # run_comparison sets these per cell: a value given here would be silently ignored
        for name in _PER_CELL:
            value = given.get(name, FinetuneConfig.__dataclass_fields__[name].default)
            if value != FinetuneConfig.__dataclass_fields__[name].default:
                raise ValueError(
                    f"{name}={value!r}: a comparison sets it for every cell and would ignore it; {_PER_CELL[name]}"
                )
        from histokd.models import BACKBONES

        for name in self.backbones:
            if name not in BACKBONES:
                raise ValueError(f"backbones: {name!r} unknown; allowed: {', '.join(BACKBONES)}")
        inits = self.initialisations()
        if not inits:
            raise ValueError("no initialisation to compare: set random_init, inits or timm_weights")
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        refuse_register_model(self.finetune, "comparison")
        if self.segmentation_datasets and (
            self.finetune.protocols != ["finetune"] or self.finetune.label_fractions != [1.0]
        ):
            raise ValueError(
                f"protocols={self.finetune.protocols!r}, label_fractions={self.finetune.label_fractions!r}: "
                "segmentation datasets allow only finetune at 1.0; compare them in a run of their own"
            )
        self.dataset_list()  # validates

    def initialisations(self) -> list[tuple[str, str, str]]:
        """(label, backbone, init value) of every cell's initialisation, in table order."""
        cells: list[tuple[str, str, str]] = []
        if self.random_init:
            cells += [("Random Weight", b, "random") for b in self.backbones]
        cells += [
            (label, b, p if p == "imagenet" or p.startswith("hf-hub:") else f"timm:{p}")
            for label, b, p in (
                parse_init_entry(e, "timm_weights", "SPT on ImageNet") for e in self.timm_weights
            )
        ]
        cells += [
            (label, b, p)
            for label, b, p in (parse_init_entry(e, "inits", "RCKD") for e in self.inits)
        ]
        return cells

    def dataset_list(self) -> list[tuple[str, str, str]]:
        """(name, path, task) of every dataset; empty when the demo task is meant."""
        out = [(*_parse_dataset(e, "datasets"), "classification") for e in self.datasets]
        out += [
            (*_parse_dataset(e, "segmentation_datasets"), "segmentation")
            for e in self.segmentation_datasets
        ]
        names = [n for n, _, _ in out]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must differ, got {names}")
        return out


@dataclass
class ComparisonResult:
    """One row per (dataset, backbone, initialisation, protocol, label fraction), and the files
    written."""

    rows: list[dict[str, Any]]
    files: dict[str, str]
    run_dir: str
    mlflow_run_id: str | None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


@holds_run_lock
def run_comparison(config: CompareConfig) -> ComparisonResult:
    """Fine-tune every cell, then write the Table 3/4-style tables and the Fig. 10-style chart."""
    from histokd.finetune.job import prepare_dataset, run_finetune
    from histokd.finetune.report import write_comparison_outputs
    from histokd.models.profile import profile_backbones

    datasets = config.dataset_list() or [("Demo tissue", "", "classification")]
    work_dir = config.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, work_dir / "compare_config.yaml")
    run = open_mlflow_run(config, "compare_pretraining")
    input_size = config.finetune.input_size
    base = {f.name: getattr(config.finetune, f.name) for f in dataclasses.fields(FinetuneConfig)}
    base.update(storage_path=config.storage_path, mlflow_experiment=config.mlflow_experiment)
    profiles: dict[str, Any] = {}
    rows = []
    try:
        for dataset_name, path, task in datasets:
            dataset = None
            for label, backbone, init in config.initialisations():
                cell = dict(base, data=path, task=task, backbone=backbone, init=init, init_label=label,
                            run_name=f"{config.run_name}-{_slug(dataset_name)}-{backbone}-{_slug(label)}",
                            mlflow_tracking_uri=config.tracking_uri)  # fmt: skip
                cell_config = FinetuneConfig(**cell)
                dataset = dataset or prepare_dataset(cell_config)
                print(f"[{dataset_name}] {backbone} ({label})", flush=True)
                outcome = run_finetune(cell_config, dataset=dataset, parent_run_id=run.run_id)
                if backbone not in profiles:
                    profiles[backbone] = profile_backbones([backbone], [input_size])[0]
                # one row per (protocol, label fraction): the summary's arms (one by default)
                for arm in outcome.summary.get("arms") or [
                    {**outcome.summary, "protocol": "finetune", "label_fraction": 1.0}
                ]:
                    entry = arm["metrics"][arm["primary_metric"]]
                    rows.append({
                        "dataset": dataset_name, "task": task, "model": backbone, "init": label,
                        "protocol": arm["protocol"], "label_fraction": arm["label_fraction"],
                        "params": profiles[backbone].params_backbone, "gmac": profiles[backbone].gmac_paper,
                        "input_size": input_size, "metric": arm["primary_metric"],
                        "mean": entry["mean"], "std": entry["std"], "ci_low": entry["ci_low"], "ci_high": entry["ci_high"],
                        "num_splits": arm["num_splits"], "run_dir": outcome.run_dir,
                    })  # fmt: skip
                    if task == "classification":  # the other columns (report.comparison_table)
                        for name in ("balanced_accuracy", "macro_f1", "auroc"):
                            other = arm["metrics"].get(name, {})
                            rows[-1].update({f"{name}_{k}": other.get(k, math.nan)
                                             for k in ("mean", "std", "ci_low", "ci_high")})  # fmt: skip
                        rows[-1]["single_class_predictions"] = bool(
                            arm.get("single_class_predictions", False)
                        )
                    arm_tag = (
                        ""
                        if (arm["protocol"], arm["label_fraction"]) == ("finetune", 1.0)
                        else f".{arm['protocol']}.labels{arm['label_fraction']:g}"
                    )
                    metric_key = f"{_slug(dataset_name)}.{backbone}.{_slug(label)}{arm_tag}.{arm['primary_metric']}_mean"
                    if math.isfinite(entry["mean"]):
                        run.log_metrics({metric_key: entry["mean"]})
    except BaseException:
        run.finish("FAILED")
        raise
    files = write_comparison_outputs(rows, work_dir)
    for path in files.values():
        run.log_artifact(path)
    run.finish("FINISHED")
    return ComparisonResult(rows=rows, files=files, run_dir=str(work_dir), mlflow_run_id=run.run_id)
