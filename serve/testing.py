"""Helpers shared by the service's tests and its benchmark: a throw-away checkpoint and a small-cluster config.

Both start the real application from ``serve/config.yaml`` (through `serve.app.run_local`), changed only where a
2-CPU machine or the scenario needs it, so what they exercise is the production configuration.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import httpx

from serve.app import DEFAULT_CONFIG, TOKEN_ENV, run_local


def random_checkpoint(directory: str | Path, *, size: str = "small", seed: int = 0, threshold: float = 1.0) -> Path:
    """A checkpoint of a randomly initialized MCF (``size``: ``small`` or ``paper``), reproducible from ``seed``:
    enough to exercise every code path of the service, meaningless as a detector."""
    import torch

    from ecgad.checkpoint import save_checkpoint
    from ecgad.config import PrepConfig
    from ecgad.model import MCF, MCFConfig

    torch.manual_seed(seed)
    config = MCFConfig.small() if size == "small" else MCFConfig.paper()
    return save_checkpoint(directory, MCF(config).eval(), config, PrepConfig(), threshold,
                           metadata={"note": f"random init, seed {seed}, for tests and benchmarks"})


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_config(*, args: dict[str, Any] | None = None, ingress: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None, token: str | None = None,
                 http: dict[str, Any] | None = None) -> dict[str, Any]:
    """``serve/config.yaml`` for a small local cluster, with overrides.

    Each deployment gets one fixed replica (no autoscaling, so a test knows which replica serves it) and half a CPU
    (so ingress, model and a replacement replica fit on 2 CPUs); ``args``, ``ingress``, ``model`` and ``http`` are
    merged into the application args, the two deployments and ``http_options``; ``token`` is set as
    ``ECGAD_API_TOKEN`` in the replicas' environment.
    """
    data = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    data["http_options"].update(http or {})
    application = data["applications"][0]
    application["args"].update(args or {})
    if token is not None:
        application["runtime_env"] = {"env_vars": {TOKEN_ENV: token}}
    overrides = {"ECGIngress": ingress or {}, "ECGModel": model or {}}
    for deployment in application["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        deployment["ray_actor_options"].update(num_cpus=0.5)
        deployment.update(deepcopy(overrides[deployment["name"]]))
    return data


@contextmanager
def token_client(url: str, token: str, timeout_s: float = 60) -> Iterator["httpx.Client"]:
    """An HTTP client of the service at ``url`` that sends ``token`` as its bearer token."""
    import httpx

    with httpx.Client(base_url=url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


@contextmanager
def local_service(checkpoint: str | Path, config: dict[str, Any]) -> Iterator[str]:
    """The application deployed by `run_local` on a free loopback port (its base URL); Serve is shut down after."""
    from ray import serve

    try:
        yield run_local(checkpoint, port=free_port(), config=config, blocking=False)
    finally:
        serve.shutdown()
