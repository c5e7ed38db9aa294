"""``cluster.yaml`` and ``docs/cluster.md``: the launcher config is valid for Ray's own schema, exposes nothing but SSH,
puts the project and the shared storage on every node; the documented commands parse; and ``ray job submit``
against a token-authenticated ``ray start --head`` runs a job with the token and is refused without it."""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from ecgad.settings import REPO_ROOT
from ecgad.synth_dataset import write_dataset

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
DOCS = REPO_ROOT / "docs" / "cluster.md"
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_for_the_ray_cluster_launcher(config):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)            # the file as written: no unknown or mistyped fields
    validate_config(prepare_config(config))        # merged with the AWS defaults, as `ray up` does


def test_only_ssh_is_exposed_and_auth_is_on(config):
    assert [(p["FromPort"], p["ToPort"]) for p in config["provider"]["security_group"]["IpPermissions"]] == [(22, 22)]
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in worker
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_every_node_gets_the_project_and_the_shared_storage(config):
    assert config["file_mounts"]["~/ecgad"] == "."
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    installs = {"head": config["head_setup_commands"], **{n: t["worker_setup_commands"] for n, t in workers.items()}}
    for name, commands in installs.items():
        assert any("-e ~/ecgad" in c and "constraints.txt" in c for c in commands), name
    assert any("/mnt/efs" in c and "mount -t nfs4" in c for c in config["initialization_commands"])
    assert "--volume /mnt/efs:/mnt/efs" in config["docker"]["run_options"]
    gpu = config["available_node_types"]["ray.worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1          # autoscaling GPU workers
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_images_and_torch_wheels_fit_each_node_type(config):
    """CPU nodes run the CPU image and take torch's CPU wheel; only GPU nodes pay for CUDA."""
    types = config["available_node_types"]
    assert config["docker"]["head_image"].endswith("-cpu")
    assert any("whl/cpu" in c and "torch==" in c for c in config["head_setup_commands"])
    for name, node in types.items():
        if name == config["head_node_type"]:
            continue
        gpu = node["node_config"]["InstanceType"].startswith(("g", "p"))
        image = node["docker"]["worker_image"]
        assert image.startswith("rayproject/ray:2.60.0-") and image.endswith("-gpu" if gpu else "-cpu"), name
        cpu_wheel = any("whl/cpu" in c for c in node["worker_setup_commands"])
        assert cpu_wheel != gpu, name


def test_workers_get_the_instance_profile_storage_needs(config):
    """Ray Train's rank 0 and Ray Data's tasks write from worker nodes: an s3:// storage path needs a role there."""
    for name, node in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


def _documented_commands() -> list[list[str]]:
    text = DOCS.read_text().replace("\\\n", " ")
    return [shlex.split(line.split(" -- ", 1)[1]) for line in text.splitlines()
            if line.startswith("ray job submit") and " -- " in line]


def test_documented_job_commands_parse():
    commands = _documented_commands()
    assert {c[2] for c in commands if c[:2] == ["python", "-m"]} == {"jobs.preprocess", "jobs.train", "jobs.evaluate",
                                                                     "jobs.score_archive"}
    for command in commands:
        if command[:2] == ["python", "-m"]:
            importlib.import_module(command[2]).build_parser().parse_args(command[3:])
        else:
            assert command[0] == "ecgad"
            importlib.import_module("ecgad.cli").build_parser().parse_args(command[1:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A ``ray start --head --block`` with token authentication and its dashboard on 127.0.0.1, in a private temp dir
    (so no other session on the machine sees it as "the current cluster"); stopped by ending that one process."""
    token = secrets.token_hex(16)
    tmp = tempfile.mkdtemp(prefix="ecgad-ray-", dir="/tmp")    # short: Ray puts socket paths under it
    dashboard = _free_port()
    # `python` in a job's entrypoint must be this environment's, as on a node where the project is installed
    # (`make test` runs the venv's python without activating the venv).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=2",
                                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={dashboard}", "--disable-usage-stats"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 360   # a loaded 2-core machine has taken over 3 minutes
        # Ready means a job can be submitted: the job API answers `list` before the node's agent takes jobs.
        while _ray_job(address, env, "submit", "--", "python", "-c", "print(1)").returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(process.pid, signal.SIGTERM)                 # --block: ending it stops the node it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", tmp], check=False)


def _ray_job(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``ray job <args> --address <address>`` with ``env`` (where the token does or does not come from)."""
    return subprocess.run([RAY, "job", args[0], "--address", address, *args[1:]], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.cluster
def test_job_submission_needs_the_token(head, tmp_path):
    address, env = head
    without = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = _ray_job(address, without, "submit", "--", "python", "-c", "print(1)")
    assert refused.returncode != 0 and re.search(r"401|[Uu]nauthori[sz]ed|authentication", refused.stdout + refused.stderr)
    wrong = _ray_job(address, {**env, "RAY_AUTH_TOKEN": "0" * 32}, "submit", "--", "python", "-c", "print(1)")
    assert wrong.returncode != 0

    root = write_dataset(tmp_path / "synth", 12, seed=5)
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})   # this checkout, on every worker
    done = _ray_job(address, env, "submit", "--runtime-env-json", runtime_env, "--",
                    "python", "-m", "jobs.preprocess", "--data", str(root), "--out", str(tmp_path / "shards"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((tmp_path / "shards" / "_SUCCESS.json").read_text())
    assert manifest["counts"]["records"] == 12
