"""CSAT's training speed before and after the speed work (issue 14, item 8), against ResNet18.

Three models train side by side, with the same weights for both CSATs:

* ``csat_before``: CSAT running the code of ``csat.py`` and ``sat.py`` at git revision
  ``--before`` (the commit before the speed work): a copy of today's model whose modules are
  switched to the classes of that revision (same attributes, same parameters, the old
  ``forward`` methods), with timm's ``GlobalResponseNormMlp`` in place of ``FusedGrnMlp``;
* ``csat``: CSAT today;
* ``resnet18``.

Each case times SGD steps (forward, cross-entropy, backward, momentum update) on random
images, channels_last, fp32 eager, as ``benchmarks/backbones.py`` does (issue 4): the models
take turns within each round, and the figure is the median over rounds. Cases:
``segmentation`` is the pretraining model (backbone + U-Net decoder, pixel labels),
``backbone`` is the backbone with a linear classifier (``ClassificationModel``), which shows
the backbone's own speed. Every case runs at each ``--threads`` setting; with one thread the
CPU-time clock is free of OpenMP spin-waiting and of other jobs on a shared machine.

Usage:
    python benchmarks/csat_speed.py                  # writes benchmarks/csat_speed.json
    python benchmarks/csat_speed.py --threads 1 --rounds 3
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import histokd.models.csat as csat_today  # noqa: E402
import histokd.models.sat as sat_today  # noqa: E402
from harness import argument_parser, load_average, per_second, take_turns, write_json  # noqa: E402
from histokd.models import ClassificationModel, SegmentationModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEFORE = "0777fcd"  # the last commit before the speed work (issue 14, item 8)


@dataclass
class SpeedConfig:
    """What to time.

    Attributes:
        before: Git revision whose ``csat.py`` and ``sat.py`` are "before".
        cases: ``task:image_size:batch_size`` for each case; task ``segmentation`` or
            ``backbone``.
        threads: Intra-op thread settings to run every case at (0: torch's default).
        warmup_steps: Untimed steps per model before the rounds.
        rounds: Rounds of one timed step per model.
        output: JSON file for the results.
    """

    before: str = BEFORE
    cases: tuple[str, ...] = ("segmentation:512:2", "backbone:512:4", "backbone:224:8")
    threads: tuple[int, ...] = (0, 1)
    warmup_steps: int = 1
    rounds: int = 5
    output: Path = field(default_factory=lambda: Path(__file__).with_suffix(".json"))

    def __post_init__(self) -> None:
        """Reject a bad value, naming the field."""
        for case in self.cases:
            task, *sizes = case.split(":")
            if task not in ("segmentation", "backbone") or len(sizes) != 2:
                raise ValueError(
                    f"cases: {case!r}; want 'segmentation:SIZE:BATCH' or 'backbone:SIZE:BATCH'"
                )
            if int(sizes[0]) % 32 or int(sizes[1]) < 1:
                raise ValueError(f"cases: {case!r}; size a multiple of 32, batch >= 1")
        if not self.threads or min(self.threads) < 0:
            raise ValueError(f"threads: {self.threads}; one or more values >= 0 (0: default)")
        if self.rounds < 1 or self.warmup_steps < 0:
            raise ValueError(f"rounds {self.rounds} must be >= 1, warmup_steps >= 0")


def _module_at(revision: str, path: str, name: str) -> types.ModuleType:
    """The module in ``path`` at git ``revision``, imported as ``name`` (timm models unregistered)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(name)
    # the old csat.py registers "csat" with timm again: keep today's registration
    with mock.patch("timm.models._registry.register_model", lambda fn: fn):
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def model_before(model: nn.Module, revision: str) -> nn.Module:
    """A copy of ``model`` whose CSAT modules run the code of ``revision``."""
    old_csat = _module_at(revision, "platform/histokd/models/csat.py", "csat_before")
    old_sat = _module_at(revision, "platform/histokd/models/sat.py", "sat_before")
    before = copy.deepcopy(model)
    switched = 0
    for module in before.modules():
        cls = type(module)
        if cls is csat_today.FusedGrnMlp:
            module.__class__ = csat_today.GlobalResponseNormMlp  # timm's, as before
        elif cls.__module__ == csat_today.__name__:
            module.__class__ = getattr(old_csat, cls.__name__)
        elif cls.__module__ == sat_today.__name__:
            module.__class__ = getattr(old_sat, cls.__name__)
        else:
            continue
        switched += 1
    if not switched:
        raise ValueError("model_before: the model holds no CSAT module")
    return before


def _build(task: str, name: str) -> nn.Module:
    if task == "segmentation":
        return SegmentationModel(name, num_classes=2)
    return ClassificationModel(name, num_classes=2)


def _make_step(model: nn.Module, task: str, size: int, batch: int):
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    shape = (batch, size, size) if task == "segmentation" else (batch,)
    labels = torch.randint(0, 2, shape)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_case(config: SpeedConfig, case: str) -> dict:
    """Images per second (wall and CPU clocks) of the three models in one case."""
    task, size, batch = case.split(":")
    size, batch = int(size), int(batch)
    torch.manual_seed(0)
    csat = _build(task, "csat")
    models = {
        "csat_before": model_before(csat, config.before),
        "csat": csat,
        "resnet18": _build(task, "resnet18"),
    }
    steps = {name: _make_step(model, task, size, batch) for name, model in models.items()}
    timings = take_turns(steps, config.rounds, warmup=config.warmup_steps)
    results = {
        name: {
            **per_second(batch, t.wall_s, "images_per_s"),
            **per_second(batch, t.cpu_s, "images_per_cpu_s"),
        }
        for name, t in timings.items()
    }
    ratios = {}
    for label, num, den in (
        ("csat_over_csat_before", "csat", "csat_before"),
        ("csat_over_resnet18", "csat", "resnet18"),
        ("csat_before_over_resnet18", "csat_before", "resnet18"),
    ):
        for clock in ("images_per_s", "images_per_s_best", "images_per_cpu_s"):
            ratios[f"{label}:{clock}"] = round(results[num][clock] / results[den][clock], 3)
    return {
        "task": task,
        "image_size": size,
        "batch_size": batch,
        "models": results,
        "ratios": ratios,
    }


def run(config: SpeedConfig) -> dict:
    """Time every case at every thread setting and write the JSON file."""
    started = time.perf_counter()
    default_threads = torch.get_num_threads()
    load_before = load_average()
    runs = []
    for threads in config.threads:
        torch.set_num_threads(threads or default_threads)
        for case in config.cases:
            result = {"threads": torch.get_num_threads(), **time_case(config, case)}
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("threads", "task", "ratios")}), flush=True)
    torch.set_num_threads(default_threads)
    payload = {
        "config": {**asdict(config), "output": str(config.output)},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "runs": runs,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(config.output, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    defaults = SpeedConfig()
    parser = argument_parser(__doc__, defaults.output, "--output", "--out")
    parser.add_argument("--before", default=defaults.before)
    parser.add_argument("--cases", nargs="+", default=list(defaults.cases))
    parser.add_argument("--threads", nargs="+", type=int, default=list(defaults.threads))
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    args = parser.parse_args(argv)
    config = SpeedConfig(
        **{**vars(args), "cases": tuple(args.cases), "threads": tuple(args.threads)}
    )
    payload = run(config)
    print(json.dumps({"wall_s": payload["wall_s"]}))


if __name__ == "__main__":
    main()
