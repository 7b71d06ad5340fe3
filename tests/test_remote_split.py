"""Scale-out: segment copies on standalone split servers (`fsl split-server`), merged by the ServerApp.

Integration tests run split-server hosts in this process on 127.0.0.1 (real gRPC); the slow test
starts two `fsl split-server` processes and trains a `hybrid` round through the real CLI and
Flower's simulation engine against them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fsl.auth import RoundAuthority
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.config import load_experiment
from fsl.experiment import build_model_for, config_to_json
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.models import cut_shape, split_model
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from server.remote import ControlKey, RemoteSegments, fedavg_states, read_secret, unpack_state
from server.split_host import SplitHost, SplitHostServer
from server.split_server import SplitServerState

pytestmark = pytest.mark.integration

RUN = "run-remote"
SHAPE = (1, 8, 8)  # digits


def _cfg(mode="hybrid"):
    return load_experiment("quickstart", ["data.name=digits", f"mode={mode}"])


def _local_state(cfg):
    split = split_model(build_model_for(cfg, SHAPE, 10), cfg.model.cut)
    t = cfg.train
    return SplitServerState(
        split.server,
        sample_shape=cut_shape(split.client, SHAPE),
        num_classes=10,
        lr=t.server_lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        device="cpu",
    )


@contextlib.contextmanager
def _hosts(n, key):
    servers = [SplitHostServer(SplitHost(key, device="cpu"), "127.0.0.1:0").start() for _ in range(n)]
    try:
        yield [s.address for s in servers]
    finally:
        for s in servers:
            s.stop(grace=None)


def _remote(addresses, key, cfg):
    return RemoteSegments(
        addresses, key, run_id=RUN, experiment=config_to_json(cfg), input_shape=SHAPE, num_classes=10, timeout_s=60
    )


def _batches(client, sample_shape, n=3, b=8):
    g = torch.Generator().manual_seed(sum(map(ord, client)))
    return [(torch.randn(b, *sample_shape, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    "assignment",
    [
        {"a": "g0", "b": "g0", "c": "g1"},  # hybrid: two groups, one per split server
        {"a": "g0", "b": "g1", "c": "g2"},  # sflv1: three copies on two servers (the first merges two itself)
    ],
    ids=["hybrid", "sflv1"],
)
def test_two_split_servers_train_and_merge_as_one_process_would(assignment):
    cfg = _cfg()
    key = ControlKey(b"k" * 32)
    auth = RoundAuthority(RUN)
    local = _local_state(cfg)  # the reference: the same round on in-process copies
    start = local.state_tensors()
    local.open_replicas(assignment)
    with _hosts(2, key) as addresses:
        remote = _remote(addresses, key, cfg)
        remote.open_round(1, assignment, start, auth)
        for client in assignment:  # in the same order on both sides: a and b share a copy in hybrid
            ident = ChannelIdentity(run_id=RUN, round=1, client_id=client, token=auth.issue(1, client))
            ch = GrpcChannel(address=remote.address_for(client), identity=ident)
            ref = InMemoryChannel(server=local, identity=ident)
            for h, y in _batches(client, local.sample_shape):
                got, want = ch.train_step(h, y), ref.train_step(h, y)
                torch.testing.assert_close(got.grad, want.grad)
            ch.close()
        results = remote.collect()
        remote.close()
    local.merge_replicas()
    want = local.state_tensors()
    merged = remote.merge(results, start)
    assert sorted(merged) == sorted(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r.samples for r in results] == [24 * sum(1 for c in assignment if remote._route[c] == i) for i in (0, 1)]
    assert int(merged["meta.steps"]) == 9  # three clients, three steps each
    # and the merge is the sample-weighted mean of what the two servers hold
    (s0, n0), (s1, n1) = [(r.state, r.samples) for r in results]
    k = next(k for k in want if k.startswith("segment.") and k.endswith("weight"))
    torch.testing.assert_close(merged[k], s0[k] * (n0 / (n0 + n1)) + s1[k] * (n1 / (n0 + n1)))


def test_a_client_trains_only_where_its_copy_lives_and_only_in_its_round():
    cfg = _cfg()
    key = ControlKey(b"k" * 32)
    auth = RoundAuthority(RUN)
    local = _local_state(cfg)
    h, y = _batches("a", local.sample_shape, n=1)[0]
    with _hosts(2, key) as addresses:
        remote = _remote(addresses, key, cfg)
        remote.open_round(1, {"a": "g0", "b": "g1"}, local.state_tensors(), auth)
        ident = ChannelIdentity(run_id=RUN, round=1, client_id="a", token=auth.issue(1, "a"))
        assert remote.address_for("a") != remote.address_for("b")
        GrpcChannel(address=remote.address_for("a"), identity=ident).train_step(h, y)
        with pytest.raises(DataPlaneError) as e:  # b's server was not told about a
            GrpcChannel(address=remote.address_for("b"), identity=ident, retries=0).train_step(h, y)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        forged = ChannelIdentity(run_id=RUN, round=1, client_id="a", token=auth.issue(1, "b"))
        with pytest.raises(DataPlaneError) as e:
            GrpcChannel(address=remote.address_for("a"), identity=forged, retries=0).train_step(h, y)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        remote.collect()  # closes the round on both servers
        with pytest.raises(DataPlaneError) as e:
            GrpcChannel(address=remote.address_for("a"), identity=ident, retries=0).train_step(h, y)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        remote.close()


def test_control_calls_need_the_control_secret_not_a_client_token():
    cfg = _cfg()
    key = ControlKey(b"k" * 32)
    auth = RoundAuthority(RUN)
    state = _local_state(cfg).state_tensors()
    with _hosts(1, key) as (address,):
        stub = pb_grpc.SplitControlStub(grpc.insecure_channel(address))
        client_token = pb.ControlHeader(run_id=RUN, round=1, token=auth.issue(1, "a"))
        other_secret = ControlKey(b"x" * 32).header("LoadSegment", RUN, 1)
        wrong_method = key.header("SegmentState", RUN, 1)  # a SegmentState credential does not load
        for header in (client_token, other_secret, wrong_method, pb.ControlHeader(run_id=RUN, round=1)):
            req = pb.LoadSegmentRequest(
                header=header, experiment=config_to_json(cfg), input_shape=SHAPE, num_classes=10
            )
            with pytest.raises(grpc.RpcError) as e:
                stub.LoadSegment(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.SegmentState(pb.SegmentStateRequest(header=client_token, tensors=True), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the secret's holder loads; then the data plane answers for the segment it loaded
        remote = _remote([address], key, cfg)
        remote.open_round(1, {"a": "g0"}, state, auth)
        ident = ChannelIdentity(run_id=RUN, round=1, client_id="a", token=auth.issue(1, "a"))
        assert tuple(GrpcChannel(address=address, identity=ident).info().sample_shape) == (16, 4, 4)
        remote.close()


def test_evaluation_runs_on_the_merged_segment_on_every_server():
    cfg = _cfg()
    key = ControlKey(b"k" * 32)
    auth = RoundAuthority(RUN)
    local = _local_state(cfg)
    with _hosts(2, key) as addresses:
        remote = _remote(addresses, key, cfg)
        remote.open_round(1, {"a": "g0", "b": "g1"}, local.state_tensors(), auth)
        for c in ("a", "b"):
            ident = ChannelIdentity(run_id=RUN, round=1, client_id=c, token=auth.issue(1, c))
            ch = GrpcChannel(address=remote.address_for(c), identity=ident)
            for h, y in _batches(c, local.sample_shape):
                ch.train_step(h, y)
        remote.collect_into(local)  # the ServerApp's global segment is now the merge
        remote.open_evaluation(1, ["a", "b", "c"], local.state_tensors(), auth)
        assert {remote.address_for(c) for c in "abc"} == set(addresses)
        h = _batches("z", local.sample_shape, n=1)[0][0]
        with torch.no_grad():
            want = local.segment.eval()(h)
        for c in "abc":
            ident = ChannelIdentity(run_id=RUN, round=1, client_id=c, token=auth.issue(1, c))
            torch.testing.assert_close(GrpcChannel(address=remote.address_for(c), identity=ident).infer(h), want)
        remote.finish_round(local)
        assert {c for c, s in local.traffic().items() if s.infer_requests} == {"a", "b", "c"}
        assert local.traffic()["a"].train_requests == 3
        remote.close()


def test_split_servers_serve_tls_to_the_serverapp_and_the_clients(tmp_path):
    from fsl.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    cfg = load_experiment(
        "quickstart",
        ["data.name=digits", "server.endpoints=127.0.0.1:1", f"server.control_secret_file={tmp_path / 's'}",
         f"server.tls_ca_certfile={certs['ca']}"],
    )  # fmt: skip
    key = ControlKey(read_secret(tmp_path / "s", create=True))
    auth = RoundAuthority(RUN)
    tls = {"certificate_chain": certs["server"], "private_key": certs["server_key"]}
    server = SplitHostServer(SplitHost(key, device="cpu"), "127.0.0.1:0", **tls).start()
    try:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, endpoints=(server.address,)))
        remote = RemoteSegments.from_config(
            cfg.server, run_id=RUN, experiment=config_to_json(cfg), input_shape=SHAPE, num_classes=10
        )
        remote.open_round(1, {"a": "g0"}, _local_state(cfg).state_tensors(), auth)
        roots = remote.client_conf()["dataplane-root-certificates"].encode()  # what the clients are sent
        ident = ChannelIdentity(run_id=RUN, round=1, client_id="a", token=auth.issue(1, "a"))
        h, y = _batches("a", (16, 4, 4), n=1)[0]
        GrpcChannel(address=server.address, identity=ident, root_certificates=roots).train_step(h, y)
        assert remote.collect()[0].samples == 8
        with pytest.raises(DataPlaneError):  # plaintext is not served
            GrpcChannel(address=server.address, identity=ident, retries=0, timeout_s=10).train_step(h, y)
        remote.close()
    finally:
        server.stop(grace=None)


def test_the_control_secret_is_made_once_private_and_then_shared(tmp_path):
    path = tmp_path / "control.secret"
    with pytest.raises(FileNotFoundError):
        read_secret(path)  # the ServerApp never makes one: it must be the split servers'
    first = read_secret(path, create=True)
    assert len(first) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert read_secret(path, create=True) == first == read_secret(path)
    assert [p.name for p in tmp_path.iterdir()] == ["control.secret"]


def test_endpoints_are_an_array_or_a_comma_list_and_need_the_secret():
    from fsl.config import ConfigError

    a = load_experiment("quickstart", ['server.endpoints=["h1:7800", "h2:7800"]', "server.control_secret_file=s"])
    b = load_experiment("quickstart", ["server.endpoints=h1:7800,h2:7800", "server.control_secret_file=s"])
    assert a.server.endpoints == b.server.endpoints == ("h1:7800", "h2:7800")
    assert load_experiment("quickstart").server.endpoints == ()
    with pytest.raises(ConfigError, match="control_secret_file"):
        load_experiment("quickstart", ["server.endpoints=h1:7800"])
    with pytest.raises(ConfigError, match="host:port"):
        load_experiment("quickstart", ["server.endpoints=h1", "server.control_secret_file=s"])


# ----------------------------------------------------------------------------- two processes, the CLI
def _fsl(*args, **kw):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "fsl_cli", *args], env=env, text=True, **kw)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_hybrid_round_on_two_split_server_processes_merges_their_segments(tmp_path):
    secret = tmp_path / "control.secret"
    procs = [
        _fsl(
            "split-server",
            "--address",
            "127.0.0.1:0",
            "--secret-file",
            str(secret),
            "--device",
            "cpu",
            "--threads",
            "1",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        addresses = [json.loads(p.stdout.readline())["address"] for p in procs]
        run = _fsl(
            "run", "quickstart", "data.name=digits", "clients=2", "train.rounds=1", "train.batch_size=16",
            "simulation.client_cpus=1", "mode=hybrid", "hybrid.groups=2", "train.fraction_evaluate=0",
            f"server.endpoints={','.join(addresses)}", f"server.control_secret_file={secret}",
            f"output_dir={tmp_path / 'runs'}", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, out + err
        run_dir = Path(next(ln for ln in out.splitlines() if ln.startswith("run directory:")).split(":", 1)[1].strip())
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        # each process trained one group's copy; ask each (with the control secret) what it holds now
        key = ControlKey(bytes.fromhex(secret.read_text().strip()))
        held = []
        for a in addresses:
            with grpc.insecure_channel(a, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                hdr = key.header("SegmentState", run_dir.name, 1)
                rep = pb_grpc.SplitControlStub(ch).SegmentState(pb.SegmentStateRequest(header=hdr, tensors=True))
            held.append((unpack_state(rep.state), int(rep.samples)))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    assert [s["address"] for s in row["split_servers"]] == addresses
    assert [s["samples"] for s in row["split_servers"]] == [n for _, n in held]
    assert all(n > 0 for _, n in held) and row["clients"] == 2 and row["failures"] == 0
    server = load_file(str(run_dir / "checkpoints" / "round-0001" / "server.safetensors"))
    (s0, n0), (s1, n1) = held
    for k, v in server.items():  # the checkpointed global segment is their sample-weighted average
        if k.startswith(("segment.", "optim.")) and v.is_floating_point():
            torch.testing.assert_close(v, s0[k] * (n0 / (n0 + n1)) + s1[k] * (n1 / (n0 + n1)), msg=k)
    assert server.keys() == fedavg_states(held, server).keys()
    assert row["dataplane_bytes_up"] > 0 and row["dataplane_bytes_down"] > 0  # the servers' traffic, counted here
    # the client segments were FedAvg'd as in any hybrid run: one joined model, well above chance
    client = load_file(str(run_dir / "checkpoints" / "round-0001" / "client.safetensors"))
    initial = split_model(build_model_for(_cfg(), SHAPE, 10), _cfg().model.cut).client.state_dict()
    assert client.keys() == initial.keys() and any(not torch.equal(client[k], initial[k]) for k in client)
    assert row["accuracy"] > 0.5


def test_a_split_server_trains_each_round_at_the_experiments_scheduled_rate():
    cfg = load_experiment(
        "quickstart", ["data.name=digits", "mode=sflv1", "train.rounds=4", "train.lr_schedule=cosine"]
    )
    key = ControlKey(b"k" * 32)
    auth = RoundAuthority(RUN)
    local = _local_state(cfg)
    start = local.state_tensors()
    local.set_lr(cfg.train.server_lr * cfg.train.lr_factor(3))  # round 3 of 4: about 0.15 of the rate
    assignment = {"a": "g0"}
    local.open_replicas(assignment)
    with _hosts(1, key) as addresses:
        remote = _remote(addresses, key, cfg)
        remote.open_round(3, assignment, start, auth)
        ident = ChannelIdentity(run_id=RUN, round=3, client_id="a", token=auth.issue(3, "a"))
        ch = GrpcChannel(address=remote.address_for("a"), identity=ident)
        ref = InMemoryChannel(server=local, identity=ident)
        for h, y in _batches("a", local.sample_shape):
            torch.testing.assert_close(ch.train_step(h, y).grad, ref.train_step(h, y).grad)
        ch.close()
        results = remote.collect()
        remote.close()
    local.merge_replicas()
    want, got = local.state_tensors(), remote.merge(results, start)
    moved = [k for k in want if k.startswith("segment.") and not torch.equal(want[k], start[k])]
    assert moved, "the round trained the segment"
    for k in moved:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_split_server_refuses_adapters_for_another_frozen_base():
    """A LoRA segment is its adapters plus a frozen base every node builds itself: a split server
    that built another base (other weights, another transformers) refuses the round."""
    pytest.importorskip("peft")
    from fsl.experiment import base_digests, server_side

    cfg = load_experiment(
        "quickstart",
        [
            "model.name=bert",
            "model.cut=bert.encoder.layer.0",
            "model.options={num_layers=2, hidden_size=32, num_heads=2, max_length=16}",
            "model.lora.r=2",
        ],
    )
    shape, classes = (16,), 10
    model = build_model_for(cfg, shape, classes)
    client, side = server_side(cfg, model, shape)
    digest = base_digests(client, side.segment)["server"]
    assert digest  # the server segment has a frozen base
    state = {"segment." + k: v for k, v in side.segment.state_dict().items() if ".lora_" in k or "classifier" in k}
    key, auth = ControlKey(b"k" * 32), RoundAuthority(RUN)

    def remote(addresses, base):
        return RemoteSegments(
            addresses,
            key,
            run_id=RUN,
            experiment=config_to_json(cfg),
            input_shape=shape,
            num_classes=classes,
            timeout_s=60,
            base_digest=base,
        )

    with _hosts(1, key) as addresses:
        ok = remote(addresses, digest)
        ok.open_round(1, {"a": ""}, state, auth)  # the same base: accepted
        ok.close()
        forged = remote(addresses, "0" * 64)
        with pytest.raises(RuntimeError, match="frozen base of the server segment differs"):
            forged.open_round(2, {"a": ""}, state, auth)
        forged.close()
