"""The package imports cleanly beside the stdlib and the CPU torch wheel."""

import platform
import subprocess
import sys


def test_stdlib_platform_not_shadowed():
    import histokd  # noqa: F401

    assert platform.system() in {"Linux", "Darwin", "Windows"}
    assert hasattr(platform, "python_version")


def test_timm_imports_after_fix():
    # A fresh interpreter: the fix must work before anything else imported torchvision.
    code = (
        "from histokd.compat import ensure_torchvision; ensure_torchvision();"
        "import timm, torch; m = timm.create_model('resnet18', num_classes=3);"
        "print(m(torch.zeros(1, 3, 64, 64)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3])" in out.stdout


def test_fix_is_applied_only_when_needed():
    code = (
        "from histokd import compat; needed = compat.ensure_torchvision();"
        "print('needed' if needed else 'not-needed', compat._extension_loads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    needed, loads = out.stdout.split()
    # The schemas are defined exactly when the compiled extension does not load.
    assert (needed == "needed") == (loads == "False")


def test_timm_imports_in_any_order_after_import_histokd():
    code = "import histokd, timm; print(timm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("1.0")
    # The hook itself loads nothing heavy.
    code = "import sys, histokd; print('torch' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
