"""``fsl`` deployment commands: certificates and one command per role.

Roles (see README, "Deployment"):

- ``fsl certs DIR --host gpu-host --nodes 2``: a CA, a server certificate for the
  SuperLink host (SANs ``127.0.0.1``, ``localhost`` and every ``--host``) and an ECDSA
  (NIST P-384, OpenSSH format) key pair per SuperNode for Flower's node authentication.
- ``fsl superlink --certs DIR``: Flower's SuperLink with TLS, SuperNode authentication
  and runtime dependency installation disabled. The ServerApp it starts runs the split
  server in its own process, so this is the GPU host.
- ``fsl supernode --superlink HOST:PORT --root-certificates ca.pem --key node-1.key
  --partition-id 0 --num-partitions 2``: Flower's SuperNode on a device, with its data
  and resource limits as node config.
- ``fsl connect --superlink HOST:PORT --root-certificates ca.pem``: the connection for
  ``flwr supernode register node-N.pub fsl`` and other ``flwr`` commands.
- ``fsl launch EXPERIMENT [overrides] --superlink HOST:PORT --root-certificates ca.pem
  --dataplane-certs DIR``: writes the SuperLink connection ``fsl`` into Flower's config
  (``$FLWR_HOME/config.toml``) and submits the run with ``flwr run``.

Each role command only assembles Flower's own command line (:mod:`fsl.flower_commands`) and
replaces itself with it (``--dry-run`` prints it instead). Nothing here imports torch or the
server: a device runs ``fsl supernode`` from the client install.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsl.certs import make_certs
from fsl.flower_commands import (
    CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    flower_connection,
    launch_command,
    node_config,
    superlink_command,
    supernode_command,
)

__all__ = ["register"]


def _exec(cmd: list[str], dry_run: bool, env: dict[str, str] | None = None) -> int:
    if dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    full = {**os.environ, **(env or {})}
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
    full["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full.get("PATH", "")])
    os.execvpe(cmd[0], cmd, full)  # replaces this process: signals reach Flower directly


_NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def _cmd_certs(args: argparse.Namespace) -> int:
    paths = make_certs(args.dir, hosts=args.host, nodes=args.nodes, days=args.days, first_node=args.first_node)
    for name, p in paths.items():
        print(f"{name:>12}  {p}")
    print(f"server certificate valid for: 127.0.0.1, localhost{''.join(', ' + h for h in args.host)}")
    return 0


def _cmd_superlink(args: argparse.Namespace) -> int:
    cmd = superlink_command(args.certs, host=args.host, port=args.port, database=args.database, insecure=args.insecure)
    return _exec(cmd, args.dry_run, _NO_INSTALL)


def _cmd_supernode(args: argparse.Namespace) -> int:
    cfg = node_config(
        args.partition_id,
        args.num_partitions,
        data_path=args.data_path,
        threads=args.threads,
        batch_size=args.batch_size,
        memory_mb=args.memory_mb,
        capability=args.capability,
    )
    cmd = supernode_command(
        args.superlink,
        root_certificates=args.root_certificates,
        key=args.key,
        node_cfg=cfg,
        port=args.port,
        insecure=args.insecure,
    )
    return _exec(cmd, args.dry_run, _NO_INSTALL)


def _cmd_launch(args: argparse.Namespace) -> int:
    if not args.dry_run:
        path = flower_connection(args.superlink, args.root_certificates, insecure=args.insecure)
        print(f"SuperLink connection {CONNECTION!r} -> {args.superlink} written to {path}", file=sys.stderr)
    cmd = launch_command(
        args.app, args.experiment, args.overrides, dataplane_certs=args.dataplane_certs, resume=args.resume or ""
    )
    return _exec(cmd, args.dry_run, _NO_INSTALL)


def _cmd_connect(args: argparse.Namespace) -> int:
    path = flower_connection(args.superlink, args.root_certificates, insecure=args.insecure)
    print(f"SuperLink connection {CONNECTION!r} -> {args.superlink} written to {path}")
    return 0


def _superlink_access(p: argparse.ArgumentParser) -> None:
    """How a command reaches a running SuperLink (supernode, connect, launch): address and CA, or no TLS."""
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", help="the deployment's ca.pem")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``certs``, ``superlink``, ``supernode`` and ``launch`` to the ``fsl`` CLI."""
    p = sub.add_parser("certs", help="create a CA, server certificates and SuperNode keys for a deployment")
    p.add_argument("dir", help="output folder (an existing CA there is reused)")
    p.add_argument("--host", action="append", default=[], help="a name or IP the SuperLink host is reached by (repeat)")
    p.add_argument("--nodes", type=int, default=0, help="SuperNode authentication key pairs to create")
    p.add_argument("--first-node", type=int, default=1, help="number of the first node key (node-N.key)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")

    p = sub.add_parser("superlink", help="start Flower's SuperLink (TLS, node auth, no runtime installs)")
    p.add_argument("--certs", help="folder made by `fsl certs`")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT)
    p.add_argument("--database", help="SQLite file for the SuperLink's state (default: in memory)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (loopback tests only)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")

    p = sub.add_parser("supernode", help="start Flower's SuperNode on a device with its data and resource limits")
    _superlink_access(p)
    p.add_argument("--key", help="this node's private key (node-N.key)")
    p.add_argument("--partition-id", type=int, required=True)
    p.add_argument("--num-partitions", type=int, required=True)
    p.add_argument("--data-path", default="", help="folder with the dataset's files on this device")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0: the experiment's)")
    p.add_argument("--batch-size", type=int, default=0, help="training batch size on this device (0: the experiment's)")
    p.add_argument(
        "--memory-mb", type=float, default=0.0, help="refuse to train when the cut would not fit (0: no limit)"
    )
    p.add_argument("--capability", type=float, default=0.0, help="declared speed for hybrid grouping (0: 1.0)")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's local ClientApp API port")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")

    p = sub.add_parser("connect", help="write the SuperLink connection 'fsl' into Flower's config (for flwr commands)")
    _superlink_access(p)

    p = sub.add_parser("launch", help="submit an experiment to a running SuperLink (`flwr run`)")
    p.add_argument("experiment", help="experiment name or .toml path")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    _superlink_access(p)
    p.add_argument("--dataplane-certs", help="folder (as seen on the SuperLink host) with server.pem/server.key/ca.pem")
    p.add_argument("--resume", help="run directory on the SuperLink host to continue")
    p.add_argument("--app", default=".", help="the Flower app folder (this project)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return {
        "certs": _cmd_certs,
        "superlink": _cmd_superlink,
        "supernode": _cmd_supernode,
        "connect": _cmd_connect,
        "launch": _cmd_launch,
    }
