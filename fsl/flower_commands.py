"""Flower's own command lines for each deployment role, assembled from this project's settings.

``flower-superlink`` with TLS and node authentication, ``flower-supernode`` with the node config
the ClientApp reads, the SuperLink connection ``fsl`` in Flower's config, and ``flwr run`` with an
experiment in the run config. The ``fsl`` commands (:mod:`fsl_cli.deploy`) run them; tests and
scripts build the same lines. Nothing here imports torch or the server.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsl.certs import atomic_write

__all__ = [
    "CONNECTION",
    "DEFAULT_SUPERLINK_PORT",
    "flower_connection",
    "flower_home",
    "launch_command",
    "node_config",
    "superlink_command",
    "supernode_command",
]

CONNECTION = "fsl"  # the name of the SuperLink connection `fsl launch` writes into Flower's config
DEFAULT_SUPERLINK_PORT = 9093


def _binary(name: str) -> str:
    """A console script of this environment (next to ``sys.executable``), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def superlink_command(
    certs: str | Path | None,
    *,
    host: str = "0.0.0.0",
    port: int = DEFAULT_SUPERLINK_PORT,
    database: str | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` (``fsl certs``), node authentication, no runtime installs."""
    cmd = [
        _binary("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        cmd.append("--insecure")
    else:
        if certs is None:
            raise ValueError("give --certs DIR (made by `fsl certs`) or --insecure")
        c = Path(certs).resolve()
        cmd += ["--ssl-ca-certfile", str(c / "ca.pem"), "--ssl-certfile", str(c / "server.pem")]
        cmd += ["--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
    if database:
        cmd += ["--database", database]
    return cmd


def node_config(
    partition_id: int,
    num_partitions: int,
    *,
    data_path: str = "",
    threads: int = 0,
    batch_size: int = 0,
    memory_mb: float = 0.0,
    capability: float = 0.0,
) -> str:
    """The ``--node-config`` string the ClientApp reads (see clients/client_app.py)."""
    items: list[str] = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if data_path:
        items.append(f"data-path={_toml_str(data_path)}")
    if threads:
        items.append(f"threads={threads}")
    if batch_size:
        items.append(f"batch-size={batch_size}")
    if memory_mb:
        items.append(f"memory-mb={float(memory_mb)}")
    if capability:
        items.append(f"capability={float(capability)}")
    return " ".join(items)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def supernode_command(
    superlink: str,
    *,
    root_certificates: str | None,
    key: str | None,
    node_cfg: str,
    port: int = 9094,
    insecure: bool = False,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` over TLS, authenticated with ``key``."""
    cmd = [_binary("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", node_cfg]
    if insecure:
        cmd.append("--insecure")
    else:
        if not root_certificates:
            raise ValueError("give --root-certificates ca.pem (made by `fsl certs`) or --insecure")
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    if key:
        cmd += ["--auth-supernode-private-key", str(Path(key).resolve())]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def flower_home() -> Path:
    """Flower's configuration directory (``$FLWR_HOME``, else ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def flower_connection(superlink: str, root_certificates: str | None, *, insecure: bool = False) -> Path:
    """Write (or replace) the SuperLink connection ``fsl`` in ``$FLWR_HOME/config.toml``; returns the file."""
    import tomllib

    import tomli_w

    path = flower_home() / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    sl = data.setdefault("superlink", {})
    sl.setdefault("default", CONNECTION)
    conn: dict[str, Any] = {"address": superlink}
    if insecure:
        conn["insecure"] = True
    elif root_certificates:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    sl[CONNECTION] = conn
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tomli_w.dumps(data).encode())
    return path


def launch_command(
    app_dir: str | Path,
    experiment: str,
    overrides: Sequence[str] = (),
    *,
    dataplane_certs: str | Path | None = None,
    resume: str = "",
    stream: bool = True,
) -> list[str]:
    """``flwr run APP fsl`` with the experiment, its overrides and data-plane TLS in the run config."""
    extra = list(overrides)
    if dataplane_certs is not None:
        c = Path(dataplane_certs).resolve()
        # bare words: `overrides` is itself a quoted string in Flower's run config, which has no escapes
        extra += [
            f"server.tls_certfile={c / 'server.pem'}",
            f"server.tls_keyfile={c / 'server.key'}",
            f"server.tls_ca_certfile={c / 'ca.pem'}",
        ]
    if any('"' in o or " " in o for o in extra):
        raise ValueError(f"overrides cannot contain quotes or spaces in a Flower run config: {extra}")
    run_config = " ".join(
        [
            f"experiment={_toml_str(experiment)}",
            f"overrides={_toml_str(' '.join(extra))}",
            f"resume={_toml_str(resume)}",
        ]
    )
    cmd = [_binary("flwr"), "run", str(app_dir), CONNECTION, "--run-config", run_config]
    if stream:
        cmd.append("--stream")
    return cmd
