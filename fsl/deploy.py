"""Deployment on real machines: certificates, one command per role, data-plane TLS.

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

Each role command only assembles Flower's own command line and replaces itself with it
(``--dry-run`` prints it instead). Nothing here imports torch or the server.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "advertised_address",
    "dataplane_tls",
    "flower_connection",
    "launch_command",
    "make_certs",
    "register",
    "superlink_command",
    "supernode_command",
]

CONNECTION = "fsl"  # the name of the SuperLink connection `fsl launch` writes into Flower's config
DEFAULT_SUPERLINK_PORT = 9093


# ----------------------------------------------------------------------------- certificates
def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _san(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for h in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):  # keeps order, drops duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_certs(
    out_dir: str | Path, hosts: Sequence[str] = (), nodes: int = 0, days: int = 365, first_node: int = 1
) -> dict[str, Path]:
    """Create (or extend) a deployment's key material in ``out_dir``; returns the paths.

    ``ca.pem``/``ca.key``: the CA, reused when it exists so certificates made later chain to
    the same root. ``server.pem``/``server.key``: the SuperLink host's certificate (used for
    Flower's control plane and for the data plane), SANs ``127.0.0.1``, ``localhost`` and
    ``hosts``; rewritten on every call. ``node-N.key``/``node-N.pub``: ECDSA P-384 key pairs in
    OpenSSH format for SuperNode authentication (``flwr supernode register node-N.pub``),
    kept when they exist. Private keys are written with mode 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    paths = {
        "ca": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server": out / "server.pem",
        "server_key": out / "server.key",
    }

    if paths["ca"].exists() and paths["ca_key"].exists():
        ca_cert = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
        ca_key = serialization.load_pem_private_key(paths["ca_key"].read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fsl deployment CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(paths["ca_key"], ca_key.private_bytes(pem, pkcs8, plain), private=True)
        _write(paths["ca"], ca_cert.public_bytes(pem))
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths['ca_key']}: expected an EC private key")

    key = ec.generate_private_key(ec.SECP384R1())
    primary = next((h for h in hosts), "localhost")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, primary)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths["server_key"], key.private_bytes(pem, pkcs8, plain), private=True)
    _write(paths["server"], cert.public_bytes(pem))

    for i in range(first_node, first_node + nodes):
        priv, pub = out / f"node-{i}.key", out / f"node-{i}.pub"
        if not (priv.exists() and pub.exists()):
            nkey = ec.generate_private_key(ec.SECP384R1())
            _write(priv, nkey.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain), private=True)
            ssh = serialization.Encoding.OpenSSH
            _write(pub, nkey.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + b"\n")
        paths[f"node-{i}"], paths[f"node-{i}.pub"] = priv, pub
    return paths


# ----------------------------------------------------------------------------- data plane
def dataplane_tls(server_cfg: Any) -> tuple[dict[str, bytes], dict[str, str]]:
    """TLS for the split server from ``server.tls_certfile``/``tls_keyfile``/``tls_ca_certfile``.

    Returns ``(SplitServer keyword arguments, entries for the round config)``: the server's
    chain and key, and the PEM the clients verify it with (``dataplane-root-certificates``;
    the CA when ``tls_ca_certfile`` is set, else the certificate itself). Both empty when TLS
    is off. A certificate without its key (or the reverse) is an error, not plaintext.
    """
    cert = str(getattr(server_cfg, "tls_certfile", "") or "")
    key = str(getattr(server_cfg, "tls_keyfile", "") or "")
    ca = str(getattr(server_cfg, "tls_ca_certfile", "") or "")
    if not cert and not key:
        return {}, {}
    if not (cert and key):
        raise ValueError("data-plane TLS needs both server.tls_certfile and server.tls_keyfile")
    chain = Path(cert).read_bytes()
    roots = Path(ca).read_bytes() if ca else chain
    return {"certificate_chain": chain, "private_key": Path(key).read_bytes()}, {
        "dataplane-root-certificates": roots.decode()
    }


def advertised_address(server_cfg: Any, bound: str) -> str:
    """The data-plane address clients dial: ``server.public_address`` (its port defaults to the bound one)."""
    public = str(getattr(server_cfg, "public_address", "") or "")
    port = bound.rsplit(":", 1)[1]
    if not public:
        host = bound.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "::"):
            raise ValueError(
                f"the split server listens on {bound}; set server.public_address to the name clients reach it by"
            )
        return bound
    if public.startswith("[") and public.endswith("]") or ":" not in public:
        return f"{public}:{port}"
    return public


# ----------------------------------------------------------------------------- role commands
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
    _write(path, tomli_w.dumps(data).encode())
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


def _exec(cmd: list[str], dry_run: bool, env: dict[str, str] | None = None) -> int:
    if dry_run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    full = {**os.environ, **(env or {})}
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
    full["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full.get("PATH", "")])
    os.execvpe(cmd[0], cmd, full)  # replaces this process: signals reach Flower directly
    return 1  # unreachable


_NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


# ----------------------------------------------------------------------------- CLI plugin
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
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", help="the deployment's ca.pem")
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
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")

    p = sub.add_parser("connect", help="write the SuperLink connection 'fsl' into Flower's config (for flwr commands)")
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", help="the deployment's ca.pem")
    p.add_argument("--insecure", action="store_true")

    p = sub.add_parser("launch", help="submit an experiment to a running SuperLink (`flwr run`)")
    p.add_argument("experiment", help="experiment name or .toml path")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--superlink", required=True, help="SuperLink host:port")
    p.add_argument("--root-certificates", help="the deployment's ca.pem")
    p.add_argument("--dataplane-certs", help="folder (as seen on the SuperLink host) with server.pem/server.key/ca.pem")
    p.add_argument("--resume", help="run directory on the SuperLink host to continue")
    p.add_argument("--app", default=".", help="the Flower app folder (this project)")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return {
        "certs": _cmd_certs,
        "superlink": _cmd_superlink,
        "supernode": _cmd_supernode,
        "connect": _cmd_connect,
        "launch": _cmd_launch,
    }
