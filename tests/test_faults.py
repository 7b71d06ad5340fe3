"""Faults against a live split server on 127.0.0.1.

* fuzz: thousands of malformed requests (random bytes, wrong dtype, shape mismatch, negative or
  huge dimensions, NaN/Inf, truncated or padded buffers, bad labels, unknown client, wrong round,
  wrong run): each gets a clear status, the server stays up, the server segment is bit-identical;
* load: 32 concurrent clients for a full round, every request answered with its own step
  (latency under load is measured by benchmarks/bench_batching.py, not here);
* a client process SIGKILLed in the middle of its steps: the server stays consistent (finite
  parameters, other clients keep training), and the same client joins the next round.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from fsl.channel import ChannelIdentity
from fsl.grpc_channel import GrpcChannel
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import dataplane_pb2_grpc as pb_grpc
from fsl.wire.frame import Framed
from helpers import authority_and_identity, make_state, params
from server.split_server import SplitServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 14, 14)  # cnn at cut conv1
CLEAR = {  # a status that tells the client what was wrong; INTERNAL/UNKNOWN would be a server bug
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@pytest.fixture
def served():
    auth, _ = authority_and_identity()
    _, _, state = make_state("cnn", "conv1", authority=auth, max_batch=64, max_message_bytes=8 * 1024 * 1024)
    server = SplitServer(state, "127.0.0.1:0").start()
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    yield auth, state, server, channel
    channel.close()
    server.stop(grace=None)


def _valid(auth, rng: random.Random, client: str = "7", round_: int = 1) -> pb.TrainRequest:
    b = rng.randint(1, 8)
    return pb.TrainRequest(
        header=pb.Header(
            run_id="run-test",
            round=round_,
            client_id=client,
            step=rng.randint(1, 10**6),
            token=auth.issue(round_, client),
        ),  # fmt: skip
        activations=codec.encode(torch.rand(b, *SHAPE)),
        labels=codec.encode(torch.randint(0, 10, (b,))),
    )


def _break(req: pb.TrainRequest, auth, rng: random.Random) -> str:
    """Make ``req`` invalid in one of many ways; return the way."""
    a, y, hdr = req.activations, req.labels, req.header
    kind = rng.choice(
        [
            "dtype",
            "rank",
            "dims",
            "negative",
            "huge",
            "zero-batch",
            "truncate",
            "pad",
            "nan",
            "inf",
            "label-range",
            "label-dtype",
            "label-count",
            "label-truncate",
            "unknown-client",
            "forged-token",
            "wrong-round",
            "wrong-run",
            "no-token",
            "batch-limit",
            "empty",
        ]  # fmt: skip
    )
    if kind == "dtype":
        a.dtype = rng.choice(["object", "float64", "int64", "", "float32\0", "complex64", "x" * 300])
    elif kind == "rank":
        del a.shape[rng.randrange(len(a.shape))]
    elif kind == "dims":
        a.shape[rng.randrange(1, len(a.shape))] += rng.choice([-3, -1, 1, 7])
    elif kind == "negative":
        a.shape[rng.randrange(len(a.shape))] = -rng.randint(1, 2**40)
    elif kind == "huge":
        a.shape[0] = rng.choice([2**31, 2**40, 2**62])
    elif kind == "zero-batch":
        a.shape[0] = 0
    elif kind == "truncate":
        a.data = a.data[: rng.randrange(len(a.data))]
    elif kind == "pad":
        a.data = a.data + os.urandom(rng.randint(1, 64))
    elif kind in ("nan", "inf"):
        x = codec.decode(a).clone()
        x.view(-1)[rng.randrange(x.numel())] = float("nan") if kind == "nan" else rng.choice([1, -1]) * float("inf")
        a.CopyFrom(codec.encode(x))
    elif kind == "label-range":
        z = codec.decode(y).clone()
        z[rng.randrange(z.numel())] = rng.choice([-1, 10, 2**40])
        y.CopyFrom(codec.encode(z))
    elif kind == "label-dtype":
        y.CopyFrom(codec.encode(codec.decode(y).float()))
    elif kind == "label-count":
        y.CopyFrom(codec.encode(torch.zeros(a.shape[0] + rng.randint(1, 5), dtype=torch.int64)))
    elif kind == "label-truncate":
        y.data = y.data[:-1]
    elif kind == "unknown-client":
        hdr.client_id = f"intruder-{rng.randrange(10**6)}"  # the token is for client 7
    elif kind == "forged-token":
        hdr.token = "".join(rng.choice("0123456789abcdef") for _ in range(64))
    elif kind == "wrong-round":
        hdr.round = rng.choice([0, 2, 3, -1, 2**40])
        hdr.token = auth.issue(hdr.round, hdr.client_id)  # a real token, for a round that is not open
    elif kind == "wrong-run":
        hdr.run_id = "another-run"
    elif kind == "no-token":
        hdr.token = ""
    elif kind == "batch-limit":
        req.activations.CopyFrom(codec.encode(torch.rand(65, *SHAPE)))
        req.labels.CopyFrom(codec.encode(torch.zeros(65, dtype=torch.int64)))
    elif kind == "empty":
        req.Clear()
    return kind


def _framed(req: Any) -> Framed:
    """``req`` with its activations' bytes moved beside the message, as a frame carries them."""
    out = Framed(type(req)())
    out.msg.CopyFrom(req)
    t = out.msg.activations
    if req.HasField("activations") and t.data and not t.indices:
        out.payloads["activations"] = np.frombuffer(t.data, dtype=np.uint8)
        t.ClearField("data")
    return out


def test_fuzz_thousands_of_malformed_requests_leave_the_server_up_and_the_model_bit_identical(served):
    auth, state, server, channel = served
    rng = random.Random(1234)
    stub = pb_grpc.SplitDataPlaneStub(channel)
    raw = {  # the methods with raw bytes in, so that undecodable protobuf reaches the server too
        m: channel.unary_unary(f"/fsl.dataplane.v1.SplitDataPlane/{m}", request_serializer=None)
        for m in ("Train", "TrainFrame", "Forward", "Backward", "Infer", "InferFrame")
    }
    before = params(state.segment)
    codes: dict[str, set[grpc.StatusCode]] = {}
    n = 0
    for i in range(3000):
        if i % 5 == 0:  # random bytes to a random method
            method = rng.choice(sorted(raw))
            payload = os.urandom(rng.randint(0, 2048))
            kind, call = f"bytes->{method}", (lambda p=payload, m=method: raw[m](p, timeout=10))
        else:
            req = _valid(auth, rng)
            kind = _break(req, auth, rng)
            if rng.random() < 0.2:  # the same garbage on the U-shaped / inference methods
                which = rng.choice(["Forward", "Infer"])
                if which == "Forward":
                    other = pb.ForwardRequest(header=req.header, activations=req.activations)
                    kind, call = f"forward:{kind}", (lambda r=other: stub.Forward(r, timeout=10))
                elif rng.random() < 0.5:
                    other = pb.InferRequest(header=req.header, activations=req.activations)
                    kind, call = f"infer:{kind}", (lambda r=other: stub.Infer(r, timeout=10))
                else:  # framed, as GrpcChannel.infer sends it
                    other = pb.InferRequest(header=req.header, activations=req.activations)
                    data = frame.frame_bytes(_framed(other))
                    kind, call = f"infer:frame:{kind}", (lambda d=data: raw["InferFrame"](d, timeout=10))
            elif rng.random() < 0.3:  # the same garbage framed (fsl/wire/frame.py), as GrpcChannel sends it
                kind, data = f"frame:{kind}", frame.frame_bytes(_framed(req))
                call = lambda d=data: raw["TrainFrame"](d, timeout=10)  # noqa: E731
            else:
                call = lambda r=req: stub.Train(r, timeout=10)  # noqa: E731
        try:
            call()
        except grpc.RpcError as e:
            codes.setdefault(kind, set()).add(e.code())
            assert e.code() in CLEAR, (kind, e.code(), e.details())
            assert e.details(), kind  # a message that says what was wrong
        else:
            if not kind.startswith(("infer:", "bytes->Infer")) and "label" not in kind:
                raise AssertionError(f"{kind} was accepted")
            codes.setdefault(kind, set()).add(grpc.StatusCode.OK)
        n += 1
    assert n == 3000 and len(codes) > 25  # every way of breaking a request was tried
    for k, v in params(state.segment).items():
        assert torch.equal(v, before[k]), f"the fuzz changed {k}"
    assert state.steps == 0
    # the server is still up and trains on a good request
    reply = stub.Train(_valid(auth, rng), timeout=10)
    assert reply.server_step == 1 and torch.isfinite(codec.decode(reply.grad)).all()


def _valid_named(auth, rng: random.Random) -> Framed:
    """A good multi-tensor request (hidden states, a skip connection, a bool mask, int64 positions)."""
    from test_multitensor import VOCAB, ClientSeg

    b, t = rng.randint(1, 6), rng.randint(1, 12)
    torch.manual_seed(rng.randrange(10**6))
    with torch.no_grad():
        d = ClientSeg()(torch.randint(1, VOCAB, (b, t)))
    req = Framed(
        pb.TrainRequest(
            header=pb.Header(
                run_id="run-test", round=1, client_id="7", step=rng.randint(1, 10**6), token=auth.issue(1, "7")
            )
        )
    )
    req.add_all("tensors", d, rng.choice([None, torch.float16, torch.bfloat16]))
    codec.encode_into(req.msg.labels, torch.randint(0, 5, (b,)))
    return req


def _break_named(req: Framed, rng: random.Random) -> str:
    """Make a multi-tensor request invalid in one of many ways; return the way."""
    items = req.msg.tensors
    i = rng.randrange(len(items))
    nt = items[i]
    key = ("tensors", i)
    kind = rng.choice(
        [
            "drop", "extra", "rename", "duplicate", "dtype", "rank", "dim", "negative", "huge", "seq",
            "bounds", "batch", "nan", "truncate", "pad", "bool-byte", "int-scale", "int-sparse", "both",
            "label-count", "no-name",
        ]
    )  # fmt: skip
    if kind == "drop":
        rest = [x for j, x in enumerate(items) if j != i]
        payloads = {k: v for k, v in req.payloads.items() if k != key}
        del items[:]
        items.extend(rest)
        req.payloads = {(("tensors", k[1] - (k[1] > i)) if isinstance(k, tuple) else k): v for k, v in payloads.items()}
    elif kind == "extra":
        req.add("tensors", rng.choice(["extra", "h2", "labels"]), torch.zeros(int(nt.tensor.shape[0]), 2))
    elif kind == "rename":
        nt.name = rng.choice(["", "H", "hidden", nt.name + " ", "x" * 200])
    elif kind == "duplicate":
        req.add("tensors", nt.name, torch.zeros(1))
    elif kind == "dtype":
        nt.tensor.dtype = rng.choice(
            [d for d in ("float64", "int32", "bool", "int64", "float32", "object", "") if d != nt.tensor.dtype]
        )
    elif kind == "rank":
        del nt.tensor.shape[rng.randrange(len(nt.tensor.shape))]
    elif kind == "dim":
        nt.tensor.shape[rng.randrange(1, len(nt.tensor.shape))] += rng.choice([-1, 1, 5])
    elif kind == "negative":
        nt.tensor.shape[rng.randrange(len(nt.tensor.shape))] = -rng.randint(1, 2**40)
    elif kind == "huge":
        nt.tensor.shape[rng.randrange(len(nt.tensor.shape))] = rng.choice([2**31, 2**40])
    elif kind in ("seq", "bounds"):  # a symbolic size that disagrees, or leaves [1, 16]
        name = rng.choice(["h", "skip", "pos"])
        j = [x.name for x in items].index(name)
        items[j].tensor.shape[1] = items[j].tensor.shape[1] + 1 if kind == "seq" else rng.choice([0, 17, 1000])
    elif kind == "batch":
        nt.tensor.shape[0] += rng.choice([-1, 1]) if nt.tensor.shape[0] > 1 else 1
    elif kind == "nan":
        j = [x.name for x in items].index(rng.choice(["h", "skip"]))
        x = req.tensor(("tensors", j)).float().clone()
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("nan"), float("inf")])
        req.payloads[("tensors", j)] = x.numpy()
        items[j].tensor.dtype, items[j].tensor.scale = "float32", 0.0
    elif kind == "truncate":
        raw = np.frombuffer(bytes(req.data(key)), dtype=np.uint8)
        req.payloads[key] = raw[: rng.randrange(max(1, len(raw)))]
    elif kind == "pad":
        req.payloads[key] = np.frombuffer(bytes(req.data(key)) + os.urandom(rng.randint(1, 16)), dtype=np.uint8)
    elif kind == "bool-byte":
        j = [x.name for x in items].index("mask")
        raw = np.frombuffer(bytes(req.data(("tensors", j))), dtype=np.uint8).copy()
        raw[rng.randrange(len(raw))] = rng.randint(2, 255)
        req.payloads[("tensors", j)] = raw
    elif kind == "int-scale":
        items[[x.name for x in items].index("pos")].tensor.scale = rng.choice([0.5, 3.0, float("nan")])
    elif kind == "int-sparse":
        j = [x.name for x in items].index("pos")
        req.payloads.pop(("tensors", j), None)
        items[j].tensor.indices = np.arange(1, dtype="<u4").tobytes()
        items[j].tensor.data = np.zeros(1, dtype="<i8").tobytes()
    elif kind == "both":
        req.set("activations", torch.zeros(int(nt.tensor.shape[0]), 2))
    elif kind == "label-count":
        codec.encode_into(req.msg.labels, torch.zeros(int(nt.tensor.shape[0]) + 1, dtype=torch.int64))
    elif kind == "no-name":
        nt.ClearField("name")
    return kind


@pytest.fixture
def served_named():
    from test_multitensor import SIG, ServerSeg

    from server.state import SplitServerState

    auth, _ = authority_and_identity()
    torch.manual_seed(0)
    state = SplitServerState(ServerSeg(), (), 5, device="cpu", signature=SIG, authority=auth, max_batch=16)
    server = SplitServer(state, "127.0.0.1:0").start()
    channel = grpc.insecure_channel(server.address)
    yield auth, state, server, channel
    channel.close()
    server.stop(grace=None)


def test_fuzz_malformed_multi_tensor_requests_leave_the_model_bit_identical(served_named):
    auth, state, server, channel = served_named
    rng = random.Random(99)
    raw = {
        m: channel.unary_unary(f"/fsl.dataplane.v1.SplitDataPlane/{m}", request_serializer=None)
        for m in ("Train", "TrainFrame", "Infer", "InferFrame")
    }
    before = params(state.segment)
    codes: dict[str, set[grpc.StatusCode]] = {}
    for i in range(800):
        req = _valid_named(auth, rng)
        kind = _break_named(req, rng)
        method = rng.choice(["TrainFrame", "TrainFrame", "Train", "InferFrame"])
        if method.startswith("Infer"):
            other = Framed(pb.InferRequest(header=req.msg.header), dict(req.payloads))
            other.msg.tensors.extend(req.msg.tensors)
            if req.msg.HasField("activations"):
                other.msg.activations.CopyFrom(req.msg.activations)
            req = other
        data = frame.frame_bytes(req) if method.endswith("Frame") else req.message().SerializeToString()
        if method.endswith("Frame") and i % 7 == 0 and req.payloads:  # a table entry naming an entry that is not there
            count = int.from_bytes(data[8:12], "little")
            e = 12 + rng.randrange(count) * 16
            data = data[: e + 4] + rng.choice([2**31, 64, 4096]).to_bytes(4, "little") + data[e + 8 :]
            kind = "frame-index"
        try:
            raw[method](data, timeout=10)
        except grpc.RpcError as e:
            codes.setdefault(kind, set()).add(e.code())
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, method, e.code(), e.details())
            assert e.details(), kind
        else:
            # only inference may accept a request whose one fault was in its labels (it reads none)
            assert method.startswith("Infer") and kind == "label-count", (kind, method)
            codes.setdefault(kind, set()).add(grpc.StatusCode.OK)
    assert len(codes) >= 20, sorted(codes)
    for k, v in params(state.segment).items():
        assert torch.equal(v, before[k]), f"the fuzz changed {k}"
    assert state.steps == 0
    reply = frame.parse(pb.TrainReply, raw["TrainFrame"](frame.frame_bytes(_valid_named(auth, rng)), timeout=10))
    assert reply.msg.server_step == 1 and set(reply.named("grads")) == {"h", "skip"}


def test_32_concurrent_clients_for_a_full_round(served):
    auth, state, server, _ = served
    n_clients, steps, batch = 32, 8, 16
    errors: list[BaseException] = []
    start = threading.Barrier(n_clients)

    def client(i: int) -> None:
        try:
            ident = ChannelIdentity(run_id="run-test", round=1, client_id=f"c{i}", token=auth.issue(1, f"c{i}"))
            with GrpcChannel(address=server.address, identity=ident) as ch:
                start.wait()
                for _ in range(steps):
                    r = ch.train_step(torch.rand(batch, *SHAPE), torch.randint(0, 10, (batch,)))
                    assert torch.isfinite(r.grad).all()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert state.steps == n_clients * steps
    assert all(s.train_requests == steps for s in state.traffic().values()) and len(state.traffic()) == n_clients
    assert all(torch.isfinite(v).all() for v in params(state.segment).values())


_VICTIM = textwrap.dedent(
    """
    import sys, torch
    from fsl.channel import ChannelIdentity
    from fsl.grpc_channel import GrpcChannel
    address, token = sys.argv[1], sys.argv[2]
    ident = ChannelIdentity(run_id="run-test", round=1, client_id="victim", token=token)
    with GrpcChannel(address=address, identity=ident) as ch:
        step = 0
        while True:  # until it is killed
            ch.train_step(torch.rand(32, 16, 14, 14), torch.randint(0, 10, (32,)))
            step += 1
            print(step, flush=True)
    """
)


def test_a_client_killed_mid_round_leaves_the_server_consistent_and_rejoins_next_round(served):
    auth, state, server, _ = served
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, server.address, auth.issue(1, "victim")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        done = 0
        deadline = time.monotonic() + 120
        while done < 5 and time.monotonic() < deadline:  # it is in the middle of its round
            line = victim.stdout.readline()
            assert line, "the victim client exited on its own"
            done = int(line)
        os.killpg(victim.pid, signal.SIGKILL)  # no goodbye, possibly mid-request
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    # the others go on training on the same server
    ident = ChannelIdentity(run_id="run-test", round=1, client_id="survivor", token=auth.issue(1, "survivor"))
    x, y = torch.rand(32, *SHAPE), torch.randint(0, 10, (32,))
    with GrpcChannel(address=server.address, identity=ident) as ch:
        losses = [ch.train_step(x, y).loss for _ in range(15)]
    assert all(torch.isfinite(v).all() for v in params(state.segment).values())
    assert losses[-1] < losses[0]  # the shared segment still learns (same batch: the loss must fall)
    victim_steps = state.traffic()["victim"].train_requests
    assert victim_steps >= 5
    # next round: the killed client joins with the new round's credential; the old one is refused
    auth.open_round(2)
    old = ChannelIdentity(run_id="run-test", round=1, client_id="victim", token=auth.issue(1, "victim"))
    with GrpcChannel(address=server.address, identity=old) as ch, pytest.raises(Exception, match="not valid now"):
        ch.train_step(x, y)
    new = ChannelIdentity(run_id="run-test", round=2, client_id="victim", token=auth.issue(2, "victim"))
    with GrpcChannel(address=server.address, identity=new) as ch:
        r = ch.train_step(x, y)
    assert torch.isfinite(r.grad).all() and state.traffic()["victim"].train_requests == victim_steps + 1
