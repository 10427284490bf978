"""The label-fraction demo: the demo pretraining's backbone against random initialisation, by
the field's protocols (full fine-tuning, a frozen linear probe, kNN) at 1 %, 10 % and all labels.

    python benchmarks/label_fractions.py                       # pretrain the demo, then compare
    python benchmarks/label_fractions.py --backbone runs/demo/backbone.pth   # compare only
    python benchmarks/label_fractions.py --smoke               # a quick check of the path

Step 1 runs README command 1's job (``jobs/rckd_pretrain.py``, the embedded demo) unless
``--backbone`` gives a backbone file. Step 2 runs ``jobs/compare_pretraining.py`` on the demo
task (its demo preset: five 6:2:2 splits, 96 px, at most 40 epochs) with
``--protocols finetune linear knn --label-fractions 0.01 0.1 1.0``: every arm sees the same
training rows. Writes ``benchmarks/label_fractions.json`` (a row per initialisation, protocol and
fraction) and prints a Markdown table for RESULTS.md. On a 2-core CPU the whole run takes about
30 minutes (pretraining ~5, each initialisation's fine-tuning ~10 at all labels and ~5 at the
two smaller fractions; the probes a minute).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, argument_parser, write_json

#: A quick run of the whole path (one split, two epochs, 64 px): numbers that mean nothing.
SMOKE_FLAGS = ["--num-splits", "1", "--epochs", "2", "--input-size", "64",
               "--bootstrap-resamples", "200"]  # fmt: skip


def _run(command: list[str]) -> str:
    """Run a job, echo its console, return it; stop with its last lines on failure."""
    print("$", " ".join(command), flush=True)
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    console = out.stdout + out.stderr
    if out.returncode:
        sys.exit(f"{command[1]} failed (exit {out.returncode}):\n{console[-3000:]}")
    return console


def _pct(row: dict, name: str) -> str:
    key = "" if name == "accuracy" else f"{name}_"  # accuracy: the rows' primary columns
    mean, low, high, std = (float(row[f"{key}{k}"]) for k in ("mean", "ci_low", "ci_high", "std"))
    if int(row["num_splits"]) == 1:
        return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown(rows: list[dict]) -> str:
    """The RESULTS.md table: a row per protocol and fraction, the initialisations side by side."""
    inits = list(dict.fromkeys(r["init"] for r in rows))
    arms = list(dict.fromkeys((r["protocol"], float(r["label_fraction"])) for r in rows))
    head = ["Protocol", "Labels"] + [
        f"{i}: {m}" for i in inits for m in ("accuracy", "bal. acc", "AUROC")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for protocol, fraction in arms:
        cells = [protocol, f"{100 * fraction:g} %"]
        for init in inits:
            row = next(
                r
                for r in rows
                if r["init"] == init
                and (r["protocol"], float(r["label_fraction"])) == (protocol, fraction)
            )
            flag = " †" if row.get("single_class_predictions") is True else ""
            cells += [
                _pct(row, "accuracy") + flag,
                _pct(row, "balanced_accuracy"),
                _pct(row, "auroc"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    note = "\n† every test prediction of a split was one class.\n" if "†" in "".join(lines) else ""
    return "\n".join(lines) + "\n" + note


def main() -> None:
    parser = argument_parser(__doc__, REPO / "benchmarks" / "label_fractions.json")
    parser.add_argument(
        "--backbone", type=Path, help="a backbone file; default: run the demo pretraining"
    )
    parser.add_argument(
        "--storage-path", type=Path, default=REPO / "runs", help="where the runs go"
    )
    parser.add_argument(
        "--fractions", nargs="+", default=["0.01", "0.1", "1.0"], help="label fractions"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="one split, two epochs: checks the path only"
    )
    args = parser.parse_args()
    storage = args.storage_path.resolve()
    python = sys.executable
    started = time.monotonic()
    backbone, pretrain_console = args.backbone, ""
    if backbone is None:
        pretrain = [python, "jobs/rckd_pretrain.py", "--storage-path", str(storage), "--run-name",
                    "label-fractions-demo"] + (["--epochs", "1"] if args.smoke else [])  # fmt: skip
        pretrain_console = _run(pretrain)
        found = re.search(r"^backbone:\s+(\S+)$", pretrain_console, re.M)
        if not found:
            sys.exit(
                f"no 'backbone:' line in the pretraining's output:\n{pretrain_console[-2000:]}"
            )
        backbone = Path(found.group(1))
    pretrain_seconds = time.monotonic() - started
    run_name = "label-fractions-smoke" if args.smoke else "label-fractions"
    compare = [python, "jobs/compare_pretraining.py", "--storage-path", str(storage), "--run-name", run_name,
               "--inits", f"csat={backbone.resolve()}", "--protocols", "finetune", "linear", "knn",
               "--label-fractions", *args.fractions] + (SMOKE_FLAGS if args.smoke else [])  # fmt: skip
    _run(compare)
    import pandas as pd

    rows = pd.read_csv(storage / run_name / "comparison.csv").to_dict("records")
    table = markdown(rows)
    keep = ("init", "protocol", "label_fraction", "num_splits", "mean", "std", "ci_low", "ci_high",
            *(f"{m}_{k}" for m in ("balanced_accuracy", "macro_f1", "auroc") for k in ("mean", "std", "ci_low", "ci_high")),
            "single_class_predictions")  # fmt: skip
    write_json(args.out, {
        "backbone": str(backbone), "smoke": args.smoke, "fractions": [float(f) for f in args.fractions],
        "pretrain_seconds": round(pretrain_seconds), "wall_seconds": round(time.monotonic() - started),
        "rows": [{k: r.get(k) for k in keep} for r in rows], "markdown": table,
        "comparison_dir": str(storage / run_name),
    })  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
