"""End to end on Flower's deployment engine: real SuperLink and SuperNode processes on 127.0.0.1.

TLS on the control plane (Flower's flags) and on the data plane (our split server, inside the
ServerApp process the SuperLink starts), SuperNode authentication with ECDSA keys, runtime
dependency installation disabled. Every process runs in its own process group and is killed
in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from fsl.certs import make_certs
from fsl.flower_commands import flower_connection
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from server.round_hooks import PHASES, read_progress

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Processes started by a test, each in its own session; all killed on exit."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env, self.procs = tmp, env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(
            [sys.executable, "-m", "fsl_cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs[name] = (p, log)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p, _ in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for p, log in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group too: Flower's SuperExec and app processes
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(timeout=10)
            log.close()


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the SuperLink exited during startup"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


class DataPlaneProbe(threading.Thread):
    """While the run is on, knock on the split server without credentials and without TLS."""

    def __init__(self, port: int, ca: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.ca = port, ca
        self.stop = threading.Event()
        self.codes: dict[str, grpc.StatusCode] = {}
        self.plaintext: grpc.StatusCode | None = None

    def _request(self, token: str) -> pb.TrainRequest:
        return pb.TrainRequest(
            header=pb.Header(run_id="probe", round=1, client_id="intruder", step=1, token=token),
            activations=codec.encode(torch.zeros(2, 16, 4, 4)),  # digits 8x8 at cut conv1
            labels=codec.encode(torch.zeros(2, dtype=torch.int64)),
        )

    def run(self) -> None:
        target = f"127.0.0.1:{self.port}"
        tls = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=self.ca))
        plain = grpc.insecure_channel(target)
        stub, plain_stub = pb_grpc.SplitDataPlaneStub(tls), pb_grpc.SplitDataPlaneStub(plain)
        try:
            while not self.stop.is_set() and len(self.codes) < 2:
                for what, token in (("no-token", ""), ("forged", "00" * 32)):
                    try:
                        stub.Train(self._request(token), timeout=5)
                        self.codes[what] = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.UNAVAILABLE:  # not up yet
                            self.codes[what] = e.code()
                time.sleep(0.5)
            if self.codes:  # the server is up: a client that does not speak TLS gets nowhere
                try:
                    plain_stub.Info(pb.InfoRequest(), timeout=5)
                    self.plaintext = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    self.plaintext = e.code()
        finally:
            tls.close()
            plain.close()


def _deploy_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),  # Flower's config and installed apps: not ~/.flwr
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _superlink_with_nodes(procs: Procs, env: dict[str, str], certs: Path, port: int, nodes, monkeypatch) -> str:
    """Start the SuperLink, write the connection ``fsl`` in $FLWR_HOME, register the keys of ``nodes``."""
    sl = procs.start("superlink", "superlink", "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port))
    _wait_port(port, sl)
    superlink = f"127.0.0.1:{port}"
    monkeypatch.setenv("FLWR_HOME", env["FLWR_HOME"])
    flower_connection(superlink, str(certs / "ca.pem"))
    for i in nodes:
        reg = _flwr(env, "supernode", "register", str(certs / f"node-{i}.pub"), "fsl")
        assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
    return superlink


def test_deployment_engine_with_tls_node_auth_and_an_authenticated_data_plane(tmp_path, monkeypatch):
    t_start = time.monotonic()
    certs = tmp_path / "certs"
    make_certs(certs, nodes=3)
    env = _deploy_env(tmp_path)
    sl_port, dp_port = _free_port(), _free_port()
    procs = Procs(tmp_path, env)
    probe = DataPlaneProbe(dp_port, (certs / "ca.pem").read_bytes())
    try:
        # the run's connection in $FLWR_HOME/config.toml, then two of the three node keys registered
        superlink = _superlink_with_nodes(procs, env, certs, sl_port, (1, 2), monkeypatch)
        for i in (1, 2, 3):  # node 3 holds a key the SuperLink does not know
            procs.start(
                f"supernode-{i}",
                "supernode",
                "--superlink",
                superlink,
                "--root-certificates",
                str(certs / "ca.pem"),
                "--key",
                str(certs / f"node-{i}.key"),
                "--partition-id",
                str(min(i - 1, 1)),
                "--num-partitions",
                "2",
                "--threads",
                "1",
                "--memory-mb",
                "4000",
                "--port",
                str(_free_port()),
            )
        probe.start()
        t_run = time.monotonic()
        print(f"setup {t_run - t_start:.0f}s")
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "fsl_cli",
                "launch",
                "quickstart",
                "data.name=digits",
                "clients=2",
                "train.rounds=2",
                "train.fraction_evaluate=0",
                "train.min_clients=2",
                "train.round_timeout_s=120",
                f"server.address=127.0.0.1:{dp_port}",
                f"output_dir={tmp_path / 'runs'}",
                "--superlink",
                superlink,
                "--root-certificates",
                str(certs / "ca.pem"),
                "--dataplane-certs",
                str(certs),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        probe.stop.set()
        probe.join(timeout=30)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        print(f"run {time.monotonic() - t_run:.0f}s")

        # ---- the unregistered SuperNode was refused and gave up; the registered ones are online
        p3 = procs.procs["supernode-3"][0]
        p3.wait(timeout=30)
        assert p3.returncode != 0, procs.log("supernode-3")
        assert "Failed to activate SuperNode" in procs.log("supernode-3"), procs.log("supernode-3")
        for i in (1, 2):
            assert procs.procs[f"supernode-{i}"][0].poll() is None, procs.log(f"supernode-{i}")
        nodes = _flwr(env, "supernode", "list", "fsl", "--format", "json")
        assert nodes.returncode == 0, nodes.stdout + nodes.stderr
        listed = json.loads(nodes.stdout[nodes.stdout.index("{") :])
        assert len(listed["nodes"]) == 2, listed

        # ---- the data plane refused a client without a valid credential, and plaintext
        assert probe.codes == {
            "no-token": grpc.StatusCode.UNAUTHENTICATED,
            "forged": grpc.StatusCode.UNAUTHENTICATED,
        }, probe.codes
        assert probe.plaintext == grpc.StatusCode.UNAVAILABLE, probe.plaintext

        # ---- two rounds with both clients; accuracy rises well above chance (10 classes)
        (run_dir,) = list((tmp_path / "runs").iterdir())
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows), rows
        acc = [r["accuracy"] for r in rows]
        assert acc[0] > 0.3 and acc[1] > 0.6 and acc[1] > acc[0] - 0.02, acc
        assert all(r["dataplane_bytes_up"] > 0 for r in rows)
        assert all(50 < r["client_peak_rss_mb"] < 4000 for r in rows), [r["client_peak_rss_mb"] for r in rows]
        config = (run_dir / "config.toml").read_text()
        assert "tls_certfile" in config and str(certs / "server.pem") in config
        assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    finally:
        probe.stop.set()
        procs.stop_all()
    assert all(p.poll() is not None for p, _ in procs.procs.values())
    print(f"deployment e2e: {time.monotonic() - t_start:.0f}s")


def _run_dir(run_root: Path) -> Path | None:
    dirs = list(run_root.iterdir()) if run_root.exists() else []
    return dirs[0] if dirs else None


def _rows(run_root: Path) -> list[dict]:
    run = _run_dir(run_root)
    if run is None or not (run / "metrics.jsonl").exists():
        return []
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def _reached(run_root: Path, rnd: int, phase: str) -> bool:
    """Has the ServerApp announced phase ``phase`` of round ``rnd`` (or anything after it)?"""
    run = _run_dir(run_root)
    now = read_progress(run) if run is not None else None
    if now is None:
        return False
    order = [*PHASES, "done"]
    return now[0] > rnd or (now[0] == rnd and order.index(now[1]) >= order.index(phase))


def test_a_supernode_killed_mid_round_is_dropped_and_rejoins_the_next_round(tmp_path, monkeypatch):
    """SIGKILL a SuperNode (and its ClientApp) during round 2; a replacement takes its data.

    Round 2 ends on its timeout with the surviving client only (the dead one's segment is not
    aggregated), the server segment stays finite, and the replacement SuperNode (its own
    registered key, the dead node's partition) trains from round 3 or 4 on.

    The kill follows the ServerApp's own announcement that round 2's train phase began
    (``progress.json``): the round's clients are chosen by then (the replacement, started after
    the kill, is not among them), and the announcement is written before any of them is sent its
    instruction, so the victim is killed before it could have pulled, run and answered round 2.

    Restarting the dead node with its *own* key works too, but only once the SuperLink has marked
    it offline (two missed heartbeats, ~60 s, not configurable from the SuperNode's CLI), which can
    take minutes on a loaded host; a replacement device with its own registered key is activated
    at once.
    """
    t_start = time.monotonic()
    certs = tmp_path / "certs"
    make_certs(certs, nodes=3)
    env = _deploy_env(tmp_path)
    sl_port = _free_port()
    superlink = f"127.0.0.1:{sl_port}"
    procs = Procs(tmp_path, env)
    runs = tmp_path / "runs"

    def supernode(name: str, i: int, partition: int | None = None) -> subprocess.Popen:
        part = i if partition is None else partition
        return procs.start(
            name, "supernode", "--superlink", superlink, "--root-certificates", str(certs / "ca.pem"),
            "--key", str(certs / f"node-{i}.key"), "--partition-id", str(part - 1), "--num-partitions", "2",
            "--threads", "1", "--port", str(_free_port()),
        )  # fmt: skip

    try:
        _superlink_with_nodes(procs, env, certs, sl_port, (1, 2, 3), monkeypatch)
        for i in (1, 2):
            supernode(f"supernode-{i}", i)
        launch = procs.start(
            "launch", "launch", "quickstart", "data.name=digits", "clients=2", "train.rounds=4",
            "train.local_epochs=4", "train.fraction_evaluate=0", "train.min_clients=2", "train.round_timeout_s=45",
            f"server.address=127.0.0.1:{_free_port()}", f"output_dir={runs}", "--superlink", superlink,
            "--root-certificates", str(certs / "ca.pem"), "--dataplane-certs", str(certs),
        )  # fmt: skip

        def stuck(why: str) -> str:
            """Where the run stood, and every process's log: what a hang or an early exit leaves to read."""
            run = _run_dir(runs)
            logs = "\n".join(f"--- {name}\n{procs.log(name)[-4000:]}" for name in procs.procs)
            return f"{why}; the run at {read_progress(run) if run is not None else None}\n{logs}"

        deadline = time.monotonic() + 300  # a safety net only: round 2 starts within seconds
        while not _reached(runs, 2, "train") and time.monotonic() < deadline:
            assert launch.poll() is None, stuck(f"the launch exited ({launch.returncode}) before round 2")
            time.sleep(0.05)
        assert _reached(runs, 2, "train"), stuck("round 2 never started")
        victim = procs.procs["supernode-2"][0]
        os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and its ClientApp, no goodbye
        victim.wait(timeout=10)
        # a replacement device with its own registered key takes over the dead node's partition
        replacement = supernode("supernode-3", 3, partition=2)
        deadline = time.monotonic() + 300  # a safety net only: the rest takes two minutes on a loaded host
        while launch.poll() is None and time.monotonic() < deadline:
            # without the replacement, rounds 3-4 would wait for a second node forever
            assert replacement.poll() is None, stuck(f"the replacement SuperNode exited ({replacement.returncode})")
            time.sleep(0.2)
        out = procs.log("launch")
        assert launch.poll() is not None, stuck("the launch did not end in 300 s")
        assert launch.returncode == 0, out
        rows = _rows(runs)
        assert [r["round"] for r in rows] == [1, 2, 3, 4], rows
        r1, r2, r3, r4 = rows
        assert r1["clients"] == 2 and r1["failures"] == 0, r1
        # round 2: only the survivor's segment was aggregated; the dead node counts as a failure: a
        # timeout, or an error reply when the SuperLink declares the node offline (its heartbeat
        # expired) before the round's 45 s are up
        assert r2["clients"] == 1 and r2["failures"] == 1 and r2["timeouts"] in (0, 1), r2
        # round 3 may still go to the dead node's id as well (the SuperLink believes it online until
        # two heartbeats are missed): it then times out again
        assert r3["clients"] >= 1, r3
        assert r4["clients"] == 2 and r4["failures"] == 0, r4  # survivor and replacement
        acc = [r["accuracy"] for r in rows]
        assert all(a == a for a in acc) and acc[3] > acc[0] and acc[3] > 0.6, acc  # finite and still rising
        assert procs.procs["supernode-3"][0].poll() is None, procs.log("supernode-3")  # the replacement is up
        print(f"round seconds {[round(r['seconds']) for r in rows]}, clients {[r['clients'] for r in rows]}, "
              f"replacement up")  # fmt: skip
        summary = json.loads((next(runs.iterdir()) / "summary.json").read_text())
        assert summary["rounds"] == 4
    finally:
        procs.stop_all()
    assert all(p.poll() is not None for p, _ in procs.procs.values())
    print(f"supernode-kill e2e: {time.monotonic() - t_start:.0f}s")
