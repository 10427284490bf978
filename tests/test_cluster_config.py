"""cluster.yaml: valid for the installed Ray's cluster launcher, GPU workers, nothing private open.

Validation runs the same two calls ``ray up`` makes before it talks to a cloud:
``prepare_config`` (merge the provider's defaults) and ``validate_config`` (Ray's JSON schema,
``ray/autoscaler/ray-schema.json``, plus its cross-field checks). No cloud account is needed.
"""

from __future__ import annotations

import ast
import copy
import ipaddress
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"

# Ray's private ports: dashboard + job server, GCS, Ray client server; and the MLflow server the
# head runs. None may be reachable from the internet.
PRIVATE_PORTS = {
    8265: "dashboard / job server",
    6379: "GCS",
    10001: "Ray client server",
    5000: "MLflow",
}


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _prepare_and_validate(config: dict) -> dict:
    """What ``ray up`` does with the file before any cloud call."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ray_default_world_rules() -> list[dict]:
    """The inbound rules with a CIDR that the installed Ray adds to the security group it creates.

    Read from Ray's source (``_create_default_ssh_inbound_rules`` returns a literal) instead of
    importing it: the AWS module imports boto3, which the test environment does not install. The
    other default rule admits the cluster's own group only (no CIDR).
    """
    import ray.autoscaler._private.aws as aws

    tree = ast.parse((Path(aws.__file__).parent / "config.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_create_default_ssh_inbound_rules":
            returned = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            return ast.literal_eval(returned[-1].value)
    raise AssertionError(
        "Ray no longer defines _create_default_ssh_inbound_rules: re-check its security group"
    )


def world_open_ports(config: dict) -> dict[str, list[tuple[int, int]]]:
    """Port ranges reachable from any address (0.0.0.0/0 or ::/0), by protocol.

    Covers the rules of the group Ray creates: Ray's defaults plus ``provider.security_group``'s
    IpPermissions. ``-1`` (all protocols) opens every port.
    """
    rules = _ray_default_world_rules() + list(
        config["provider"].get("security_group", {}).get("IpPermissions", [])
    )
    opened: dict[str, list[tuple[int, int]]] = {}
    for rule in rules:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [
            r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])
        ]
        if not any(ipaddress.ip_network(c, strict=False).prefixlen == 0 for c in cidrs):
            continue
        protocol = str(rule.get("IpProtocol", "-1"))
        if protocol == "-1" or rule.get("FromPort", -1) == -1:
            opened.setdefault(protocol, []).append((0, 65535))
        else:
            opened.setdefault(protocol, []).append((int(rule["FromPort"]), int(rule["ToPort"])))
    return opened


def _is_open(opened: dict[str, list[tuple[int, int]]], port: int) -> bool:
    return any(lo <= port <= hi for proto in ("tcp", "-1") for lo, hi in opened.get(proto, []))


# --- schema and Ray's own validation -------------------------------------------------------------


def test_cluster_yaml_passes_ray_schema_and_validation(cluster):
    jsonschema.validate(cluster, _ray_schema())  # the file as written
    prepared = _prepare_and_validate(cluster)  # after Ray merges the AWS defaults
    assert prepared["head_node_type"] == "head.cpu"
    assert prepared["provider"]["type"] == "aws"


def test_ray_validation_rejects_a_broken_copy(cluster):
    """The validation above can fail: a misspelt key and an impossible worker count are caught."""
    typo = copy.deepcopy(cluster)
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _prepare_and_validate(typo)
    too_few = copy.deepcopy(cluster)
    too_few["max_workers"] = 0
    with pytest.raises(ValueError, match="max_workers"):
        _prepare_and_validate(too_few)
    string_gpus = copy.deepcopy(cluster)
    string_gpus["available_node_types"]["gpu.a10g.x4"]["resources"]["GPU"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        _prepare_and_validate(string_gpus)


# --- the values that matter ----------------------------------------------------------------------


def test_docker_image_and_gpu_run_options(cluster):
    docker = cluster["docker"]
    image, _, tag = docker["image"].rpartition(":")
    assert image.endswith("/histokd"), (
        f"docker.image={docker['image']!r}: expected <registry>/histokd:<tag>"
    )
    assert tag and tag != "latest" and "/" not in tag, (
        f"docker.image={docker['image']!r}: pin a tag"
    )
    assert tag.endswith("-cu130"), (
        "the tag names the CUDA build of the default image (docker/Dockerfile, target node: TORCH_CUDA)"
    )
    assert docker["container_name"]
    assert "--gpus all" in docker["worker_run_options"], "GPU workers must see their GPUs"
    assert not any(
        "--gpus" in opt for opt in docker["run_options"] + docker.get("head_run_options", [])
    ), "the head is a CPU instance: `--gpus` there makes `docker run` fail"
    assert "-v /mnt/histokd:/mnt/histokd" in docker["run_options"], (
        "shared storage at one path in every container"
    )


def test_node_types_cpu_head_and_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0, "no task or actor of the job should land on the head"
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert len(workers) >= 1
    for name, node_type in workers.items():
        gpus = node_type["resources"].get("GPU")
        assert isinstance(gpus, int) and gpus >= 1, f"{name}: resources.GPU={gpus!r}"
        assert node_type["resources"]["CPU"] >= 4 * gpus, (
            f"{name}: too few CPUs to feed {gpus} GPUs"
        )
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["node_config"]["IamInstanceProfile"], (
            f"{name}: workers write checkpoints to S3"
        )
    # The job sizes itself from the GPUs present when it starts: keep at least one GPU node up.
    assert sum(t["min_workers"] for t in workers.values()) >= 1
    assert sum(t["min_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert max(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]


def test_file_mounts_exist_in_the_repository(cluster):
    for remote, local in cluster["file_mounts"].items():
        assert (REPO / local).exists(), (
            f"file_mounts[{remote!r}] = {local!r}: no such path in the repository"
        )


def test_storage_and_tracking_are_shared(cluster):
    """Slides and NFS run folders on the shared mount; MLflow artifacts on S3."""
    init = " ".join(cluster["initialization_commands"])
    assert re.search(r"mount -t nfs4 .* /mnt/histokd", init), (
        "every host mounts the shared file system"
    )
    head = " ".join(cluster["head_start_ray_commands"])
    assert re.search(r"mlflow server .*--artifacts-destination s3://", head)
    assert "--backend-store-uri sqlite:////mnt/histokd/" in head


def test_edit_points_agree(cluster):
    """The values an operator edits by hand name one registry and one region everywhere."""
    registry = cluster["docker"]["image"].split("/")[0]
    region = cluster["provider"]["region"]
    init = "\n".join(cluster["initialization_commands"])
    login = re.search(r"ecr get-login-password --region (\S+) .*--password-stdin (\S+)", init)
    assert login, "initialization_commands must log Docker in to the image's registry"
    assert login.group(2) == registry, f"docker login to {login.group(2)}, image from {registry}"
    regions = {login.group(1), region}
    regions |= set(re.findall(r"\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com", registry))
    regions |= set(re.findall(r"\.efs\.([a-z0-9-]+)\.amazonaws\.com", init))
    assert regions == {region}, f"regions disagree: {sorted(regions)}"
    zones = cluster["provider"]["availability_zone"].split(",")
    assert all(zone.startswith(region) for zone in zones), zones


# --- network exposure ----------------------------------------------------------------------------


def test_private_ports_are_not_open_to_the_internet(cluster):
    opened = world_open_ports(cluster)
    for port, what in PRIVATE_PORTS.items():
        assert not _is_open(opened, port), f"port {port} ({what}) is open to 0.0.0.0/0 or ::/0"
    # Only SSH may face the internet; it carries the tunnels.
    assert opened == {"tcp": [(22, 22)]}, f"internet-facing rules beyond SSH: {opened}"


def test_rules_live_in_this_file(cluster):
    """A pre-made group given by id holds rules this test cannot see; it must not be used silently."""
    for name, node_type in cluster["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], (
            f"{name}: SecurityGroupIds points at a group defined outside cluster.yaml; "
            "check its inbound rules by hand and update this test"
        )


@pytest.mark.parametrize(
    "rule, port",
    [
        (
            {
                "IpProtocol": "tcp",
                "FromPort": 8265,
                "ToPort": 8265,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            },
            8265,
        ),
        (
            {
                "IpProtocol": "tcp",
                "FromPort": 6000,
                "ToPort": 7000,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            },
            6379,
        ),
        ({"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, 10001),
    ],
    ids=["dashboard", "range-over-gcs", "all-traffic-ipv6"],
)
def test_exposure_check_catches_an_open_port(cluster, rule, port):
    """The check above is not vacuous: a copy that opens a private port to the world fails it."""
    opened_copy = copy.deepcopy(cluster)
    opened_copy["provider"]["security_group"]["IpPermissions"].append(rule)
    jsonschema.validate(opened_copy, _ray_schema())  # still a valid config: only this test stops it
    assert _is_open(world_open_ports(opened_copy), port)
    with pytest.raises(AssertionError, match=r"port \d+ \(.*\) is open to 0.0.0.0/0"):
        test_private_ports_are_not_open_to_the_internet(opened_copy)


def test_private_range_rule_is_allowed(cluster):
    """Rules for private networks (a VPN, the VPC) do not count as internet-facing."""
    private = copy.deepcopy(cluster)
    private["provider"]["security_group"]["IpPermissions"].append(
        {
            "IpProtocol": "tcp",
            "FromPort": 8265,
            "ToPort": 8265,
            "IpRanges": [{"CidrIp": "10.0.0.0/8"}],
        }
    )
    test_private_ports_are_not_open_to_the_internet(private)


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert not re.search(r"(?i)(secret|password|aws_access_key_id|token)\s*[:=]", text)
    assert "ssh_private_key" not in yaml.safe_load(text).get("auth", {}), (
        "keys stay on the operator's machine"
    )


# --- the documented commands ---------------------------------------------------------------------


def _job_commands(text: str) -> list[str]:
    """Commands running jobs/rckd_pretrain.py, continuation lines joined, comment marks dropped."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    return [line for line in joined.splitlines() if "jobs/rckd_pretrain.py" in line]


def test_documented_commands_use_real_flags_and_the_tunnel():
    """The guide's and cluster.yaml's commands name flags the job has, and go through the tunnel."""
    import dataclasses

    from histokd.pretrain.config import PretrainConfig

    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(PretrainConfig)}
    flags |= {"--config", "--preset", "--print-config", "--help", "--no-use-gpu"}
    guide = (REPO / "docs" / "operators_guide.md").read_text()
    commands = _job_commands(guide) + _job_commands(CLUSTER_YAML.read_text())
    assert len(commands) >= 3
    for command in commands:
        job_args = command.split("jobs/rckd_pretrain.py", 1)[1]
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", job_args):
            assert flag in flags, (
                f"{flag} is not a flag of jobs/rckd_pretrain.py: {command.strip()}"
            )
        if "ray job submit" in command:
            assert "--address http://localhost:8265" in command, (
                f"submit through the tunnel: {command}"
            )
            assert "--working-dir ." in command


def test_split_placement_resources_match_the_guide(cluster):
    """The guide's teacher/trainer split works on this cluster.yaml as written."""
    from histokd.pretrain.config import PretrainConfig

    types = cluster["available_node_types"]
    teacher_types = [n for n, t in types.items() if t["resources"].get("teacher_node")]
    trainer_types = [n for n, t in types.items() if t["resources"].get("trainer_node")]
    assert teacher_types and trainer_types and not set(teacher_types) & set(trainer_types)
    for name in teacher_types + trainer_types:  # one label per GPU: any actor split fits
        resources = types[name]["resources"]
        assert resources.get("teacher_node", resources.get("trainer_node")) == resources["GPU"], (
            name
        )
    guide = (REPO / "docs" / "operators_guide.md").read_text()
    assert (
        """--teacher-resources '{"teacher_node": 1}' --trainer-resources '{"trainer_node": 1}'"""
        in guide
    )
    config = PretrainConfig(
        teacher_resources={"teacher_node": 1}, trainer_resources={"trainer_node": 1}
    )
    assert (config.teacher_resources, config.trainer_resources) == (
        {"teacher_node": 1},
        {"trainer_node": 1},
    )


def _mlflow_server_command(cluster: dict) -> str:
    commands = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert len(commands) == 1, commands
    return commands[0]


def test_mlflow_listens_on_the_heads_private_address_only(cluster):
    """MLflow has no authentication: never on every interface, but on the address the guide's
    HEAD_IP names (the nodes log there) and its laptop tunnel forwards to."""
    command = _mlflow_server_command(cluster)
    hosts = re.findall(r"(?:--host|-h)[ =](\"[^\"]*\"|'[^']*'|\S+)", command)
    assert len(hosts) == 1, f"give mlflow server one --host: {command}"
    host = hosts[0].strip("\"'")
    for everywhere in ("0.0.0.0", "::", "[::]", "*"):
        assert host != everywhere, f"mlflow server --host {host}: every interface"
    assert host == "$(hostname -I | awk '{print $1}')", host  # the first address, as HEAD_IP
    guide = (REPO / "docs" / "operators_guide.md").read_text()
    head_ip = "HEAD_IP=$(ray exec cluster.yaml \"hostname -I\" 2>/dev/null | grep -Eo '^[0-9]+(\\.[0-9]+){3}' | tail -1)"
    assert head_ip in guide
    # the laptop's tunnel goes to that address: `ray dashboard --remote-port 5000` would forward
    # to the head's localhost, where nothing listens any more
    assert "-L 5000:$HEAD_IP:5000" in guide and "--remote-port 5000" not in guide
    assert "--mlflow-tracking-uri http://$HEAD_IP:5000" in guide
    assert "--remote-port 5000" not in CLUSTER_YAML.read_text()


def test_every_node_starts_ray_with_the_clusters_token(cluster):
    """Ray 2.60's token authentication: the head writes one token to the shared file system once,
    every `ray start` reads it, and the guide tells a laptop how to fetch it."""
    token = "/mnt/histokd/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start and f"RAY_AUTH_TOKEN_PATH={token}" in start, start
    writes = [c for c in cluster["head_start_ray_commands"] if f"> {token}" in c]
    assert len(writes) == 1 and f"test -s {token}" in writes[0]  # once: a restart keeps it
    assert f"chmod 600 {token}" in writes[0]
    head = cluster["head_start_ray_commands"]
    assert head.index(writes[0]) < head.index(next(c for c in head if "ray start" in c))
    guide = (REPO / "docs" / "operators_guide.md").read_text()
    assert f"ray rsync-down cluster.yaml {token} ~/.ray/auth_token" in guide
    assert "export RAY_AUTH_MODE=token" in guide
