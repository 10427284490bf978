"""Training throughput of each backbone with the U-Net decoder, at 512x512.

Goal (issue 4): CSAT trains at least 1.5x as many images per second as ResNet18.

Each configuration (eager fp32, eager bf16 autocast, optionally ``torch.compile``) builds one
``SegmentationModel`` per backbone (channels_last), warms it up, and then times rounds of SGD
steps on random images and labels. The backbones take turns within each round, so a change in
machine load hits all of them alike; the figure is the median over rounds. Results, with the
machine, the load average and the MACs of each model, go to ``benchmarks/backbones.json``.

Two clocks: wall time (images/s, what a dedicated machine gives) and the CPU time the process
used (images per CPU-second). On a CPU shared with other work, wall time measures the other
work too; CPU time does not, and with ``--threads 1`` it is free of OpenMP spin-waiting as well,
so its ratios are the ones to compare there.

Usage:
    python benchmarks/backbones.py                      # CPU: eager fp32 and bf16
    python benchmarks/backbones.py --compile            # also torch.compile (slow to compile on CPU)
    python benchmarks/backbones.py --device cuda --batch-size 16 --compile
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import argument_parser, load_average, per_second, take_turns, write_json  # noqa: E402
from histokd.models import SegmentationModel  # noqa: E402
from histokd.models.profile import count_params, macs_full, macs_paper  # noqa: E402

BACKBONES = ("csat", "csat_nosat", "resnet18", "efficientnet_b0", "convnextv2_atto")


@dataclass
class BenchmarkConfig:
    """What to time.

    Attributes:
        backbones: Backbones to compare (CSAT first).
        image_size: Side of the square training images (RCKD pretraining tiles: 512).
        batch_size: Images per step.
        warmup_steps: Untimed steps per model before the rounds (and after compiling).
        rounds: Rounds of timed steps; each backbone takes its turn in every round.
        steps_per_round: Timed steps per backbone per round.
        device: ``cpu`` or ``cuda``.
        bf16: Also time with bf16 autocast.
        compile: Also time ``torch.compile`` (eager fp32 and, with ``bf16``, bf16).
        channels_last: Model and images in channels_last memory format.
        threads: Intra-op threads (0: torch's default, one per core).
        output: JSON file for the results.
    """

    backbones: tuple[str, ...] = BACKBONES
    image_size: int = 512
    batch_size: int = 2
    warmup_steps: int = 1
    rounds: int = 6
    steps_per_round: int = 1
    device: str = "cpu"
    bf16: bool = True
    compile: bool = False
    channels_last: bool = True
    threads: int = 0
    output: Path = field(default_factory=lambda: Path(__file__).with_suffix(".json"))

    def __post_init__(self) -> None:
        """Reject a bad value, naming the field."""
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r}; allowed: 'cpu', 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' but torch sees no CUDA device")
        if self.threads < 0:
            raise ValueError(f"threads: {self.threads}; must be >= 0 (0: torch's default)")
        for name in ("image_size", "batch_size", "rounds", "steps_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)}; must be >= 1")
        if self.image_size % 32:
            raise ValueError(f"image_size: {self.image_size}; must be a multiple of 32")


def _make_step(model: torch.nn.Module, config: BenchmarkConfig, bf16: bool, compiled: bool):
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(config.device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model) if compiled else model
    size = config.image_size
    images = torch.randn(config.batch_size, 3, size, size, device=config.device)
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(0, 2, (config.batch_size, size, size), device=config.device)

    def step() -> None:
        with torch.autocast(config.device, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_configuration(config: BenchmarkConfig, bf16: bool, compiled: bool) -> dict[str, dict]:
    """Images per second of every backbone in one configuration."""
    steps = {}
    for name in config.backbones:
        torch.manual_seed(0)
        steps[name] = _make_step(SegmentationModel(name, num_classes=2), config, bf16, compiled)
    timings = take_turns(steps, config.rounds, config.steps_per_round, config.warmup_steps,
                         config.device)  # fmt: skip
    images = config.batch_size * config.steps_per_round
    return {
        name: {
            "first_step_s": round(t.first_s, 2),  # it compiles, when compiling
            **per_second(images, t.wall_s, "images_per_s"),
            **per_second(images, t.cpu_s, "images_per_cpu_s"),
        }
        for name, t in timings.items()
    }


def model_costs(config: BenchmarkConfig) -> dict[str, dict]:
    """Parameters and GMAC per image of each segmentation model at the benchmark size."""
    costs = {}
    for name in config.backbones:
        model = SegmentationModel(name, num_classes=2)
        costs[name] = {
            "params": count_params(model),
            "params_backbone": count_params(model.backbone),
            "gmac_paper": round(macs_paper(model, config.image_size) / 1e9, 3),
            "gmac_full": round(macs_full(model, config.image_size) / 1e9, 3),
        }
    return costs


def run(config: BenchmarkConfig) -> dict:
    """Time every configuration and write the JSON file."""
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    load_before = load_average()
    configurations = [("eager", False, False)]
    if config.bf16:
        configurations.append(("eager_bf16", True, False))
    if config.compile:
        configurations.append(("compile", False, True))
        if config.bf16:
            configurations.append(("compile_bf16", True, True))
    results = {}
    for label, bf16, compiled in configurations:
        results[label] = time_configuration(config, bf16, compiled)
        rates = {k: (v["images_per_s"], v["images_per_cpu_s"]) for k, v in results[label].items()}
        print(label, "(images/s, images/CPU-s):", rates, flush=True)
    speedup = {
        f"{label}_{clock}": round(r["csat"][key] / r["resnet18"][key], 3)
        for label, r in results.items()
        if "csat" in r and "resnet18" in r
        for clock, key in (
            ("wall", "images_per_s"),
            ("cpu", "images_per_cpu_s"),
            ("wall_best", "images_per_s_best"),
            ("cpu_best", "images_per_cpu_s_best"),
        )
    }
    payload = {
        "config": {**asdict(config), "output": str(config.output)},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "models": model_costs(config),
        "results": results,
        "csat_over_resnet18": speedup,
        "goal_csat_over_resnet18": 1.5,
        "goal_met": {label: s >= 1.5 for label, s in speedup.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json(config.output, payload, config.device)
    return payload


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    defaults = BenchmarkConfig()
    parser = argument_parser(__doc__, defaults.output, "--output", "--out")
    parser.add_argument("--backbones", nargs="+", default=list(defaults.backbones))
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--steps-per-round", type=int, default=defaults.steps_per_round)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    config = BenchmarkConfig(**{**vars(args), "backbones": tuple(args.backbones)})
    payload = run(config)
    print(
        json.dumps(
            {"csat_over_resnet18": payload["csat_over_resnet18"], "wall_s": payload["wall_s"]}
        )
    )


if __name__ == "__main__":
    main()
