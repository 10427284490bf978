"""The layers of docs/architecture.md: the runtime path of a real cohort never imports the demo
layer (synthetic slides, demo tasks, the resolution-KD demo)."""

from __future__ import annotations

import subprocess
import sys

RUNTIME = [
    "histokd.manifest", "histokd.streams", "histokd.teachers.stream", "histokd.teachers.registry",
    "histokd.pretrain.job", "histokd.pretrain.loop", "histokd.finetune.job", "histokd.finetune.loop",
    "histokd.finetune.search", "histokd.finetune.compare", "histokd.inference.job",
    "histokd.inference.stream", "histokd.resdist.job", "histokd.resdist.loop", "histokd.resdist.search",
]  # fmt: skip


def test_the_runtime_path_does_not_import_the_demo_layer():
    code = (
        "import importlib, sys\n"
        f"for name in {RUNTIME!r}:\n"
        "    importlib.import_module(name)\n"
        "demo = sorted(m for m in sys.modules if m.startswith('histokd.demos'))\n"
        "assert not demo, demo\n"
        "print('ok', len([m for m in sys.modules if m.startswith('histokd.')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
