"""Several named tensors at the cut: a float hidden state and a skip connection that take gradients,
a bool attention mask and int64 position ids that take none.

A hand-written pair of segments stands in for a graph split: one step through the split (in memory
and over real gRPC on 127.0.0.1) must give the unsplit model's gradients and updated weights; every
malformed multi-tensor request gets INVALID_ARGUMENT with a message that names the tensor, and
leaves the server segment bit-identical; single-tensor requests keep working.
"""

from __future__ import annotations

import copy
import threading

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from fsl.channel import InMemoryChannel
from fsl.cutvalues import Signature, SignatureError, TensorSpec, concat, split
from fsl.grpc_channel import DataPlaneError
from fsl.training import TrainHooks, TrainOptions
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from helpers import authority_and_identity, channel_to, make_state, params
from server.batching import RequestBatcher
from server.split_server import SplitServer
from server.state import SplitServerState
from server.validation import InvalidRequest

VOCAB, H, C, T, B = 11, 8, 5, 6, 4
LR = 0.1

SIG = Signature(
    (
        TensorSpec("h", "float32", ("seq", H), grad=True),
        TensorSpec("skip", "float32", ("seq", H), grad=True),
        TensorSpec("mask", "bool", (1, "seq", "seq")),
        TensorSpec("pos", "int64", ("seq",)),
    ),
    {"seq": (1, 16)},
)


class ClientSeg(nn.Module):
    """Tokens (B, T) -> the four tensors that cross the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, H)
        self.lin = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = x.shape
        e = self.emb(x)
        pad = x != 0  # token 0 is padding
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return {
            "h": torch.tanh(self.lin(e)),
            "skip": e.clone(),  # its own node: its gradient is what the server sends for it
            "mask": (causal & pad[:, None, :]).unsqueeze(1),  # (B, 1, T, T)
            "pos": torch.arange(t).expand(b, t),
        }


class ServerSeg(nn.Module):
    """The cut's dict -> logits (B, C): masked attention, a skip connection, position embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(16, H)
        self.q = nn.Linear(H, H)
        self.head = nn.Linear(H, C)

    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        h = d["h"] + self.pos(d["pos"])
        scores = self.q(h) @ d["skip"].transpose(1, 2) / H**0.5  # (B, T, T)
        scores = scores.masked_fill(~d["mask"][:, 0], -1e4)
        out = torch.softmax(scores, -1) @ h + d["skip"]
        return self.head(out.mean(1))


def _models(seed: int = 0) -> tuple[ClientSeg, ServerSeg]:
    torch.manual_seed(seed)
    return ClientSeg(), ServerSeg()


def _batch(t: int = T, b: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (b, t), generator=g)
    x[0, -2:] = 0  # some padding
    return x, torch.randint(0, C, (b,), generator=g)


def _state(server: nn.Module, **kw) -> SplitServerState:
    return SplitServerState(server, (), C, lr=LR, momentum=0.0, device="cpu", signature=SIG, **kw)


def _unsplit_step(client: nn.Module, server: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One SGD step of the joined model; returns the cut gradients of the float tensors."""
    d = client(x)
    for t in (d["h"], d["skip"]):
        t.retain_grad()
    loss = nn.functional.cross_entropy(server(d), y)
    loss.backward()
    with torch.no_grad():
        for p in list(client.parameters()) + list(server.parameters()):
            p -= LR * p.grad
    return {"h": d["h"].grad, "skip": d["skip"].grad}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), f"{what}: {k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.mark.parametrize("kind", ["memory", pytest.param("grpc", marks=pytest.mark.integration)])
def test_one_split_step_equals_the_unsplit_model(kind):
    from clients.trainer import split_step

    client, server = _models()
    ref_c, ref_s = copy.deepcopy(client), copy.deepcopy(server)
    x, y = _batch()
    ref_grads = _unsplit_step(ref_c, ref_s, x, y)

    state = _state(server)
    seen: list[tuple] = []
    state.exchange_observer = lambda hdr, h, yy, g: seen.append((h, g))
    opt = torch.optim.SGD(client.parameters(), lr=LR)
    with channel_to(state, kind) as channel:
        # the step the client's training loop runs: segment forward, the server's step, backprop
        res = channel.train_step({k: v.detach() for k, v in client(x).items()}, y)
        assert isinstance(res.grad, dict) and set(res.grad) == {"h", "skip"}  # none for the mask and ids
        _close(res.grad, ref_grads, "cut gradients")
        # the server took its step on that request; reset it and run the real split_step instead
        state.load_state_tensors({f"segment.{k}": v for k, v in params(_models()[1]).items()})
        opt.zero_grad()
        step = split_step(client, channel, TrainOptions(momentum=0.0), TrainHooks())
        step(x, y)
        opt.step()
    _close(params(client), params(ref_c), "client weights")
    _close(params(state.segment), params(ref_s), "server weights")
    h, g = seen[-1]
    assert set(h) == {"h", "skip", "mask", "pos"} and h["mask"].dtype == torch.bool and h["pos"].dtype == torch.int64
    assert set(g) == {"h", "skip"}


def test_info_reports_the_signature_and_a_client_checks_against_it():
    state = _state(_models()[1])
    info = state.info()
    assert [t.name for t in info.signature] == ["h", "skip", "mask", "pos"]
    assert list(info.signature[2].dims) == ["1", "seq", "seq"] and info.signature[2].dtype == "bool"
    assert [(b.name, b.low, b.high) for b in info.bounds] == [("seq", 1, 16)]
    sig = codec.decode_signature(info)
    assert sig == SIG
    client, _ = _models()
    assert sig.check(client(_batch()[0])) == B
    with pytest.raises(SignatureError, match="'seq' = 17"):
        sig.check(client(_batch(t=17)[0]))
    # a server from before signatures: its one tensor, from sample_shape
    assert codec.decode_signature(pb.InfoReply(sample_shape=[16, 14, 14])) == Signature.single((16, 14, 14))


def test_signature_refuses_a_gradient_for_an_integer_tensor():
    with pytest.raises(SignatureError, match="int64 tensor has no gradient"):
        TensorSpec("pos", "int64", ("seq",), grad=True)


def _good(x: torch.Tensor) -> dict[str, torch.Tensor]:
    client, _ = _models()
    with torch.no_grad():
        return client(x)


def _request(d: dict[str, torch.Tensor], y: torch.Tensor, *, fmt=None) -> Framed:
    req = Framed(pb.TrainRequest(header=pb.Header(step=1)))
    req.add_all("tensors", d, fmt)
    codec.encode_into(req.msg.labels, y)
    return req


def _malformed() -> list[tuple[str, Framed, str]]:
    """(what, request, a piece of the message that must say what was wrong)."""
    x, y = _batch()
    d = _good(x)
    out: list[tuple[str, Framed, str]] = []

    def add(what, dd, match, yy=y, **kw):
        out.append((what, _request(dd, yy, **kw), match))

    add("missing", {k: v for k, v in d.items() if k != "pos"}, "missing tensor(s) ['pos']")
    add("extra", d | {"extra": torch.zeros(B, 3)}, "unknown tensor(s) ['extra']")
    add("renamed", {("hidden" if k == "h" else k): v for k, v in d.items()}, "unknown tensor(s) ['hidden']")
    add("mask dtype", d | {"mask": d["mask"].float()}, "mask: dtype 'float32', expected bool")
    add("pos dtype", d | {"pos": d["pos"].to(torch.uint8)}, "pos: dtype 'uint8', expected int64")
    add("float dtype", d | {"h": d["h"].to(torch.int64)}, "h: dtype 'int64'")
    add("rank", d | {"pos": d["pos"][:, :, None]}, "pos: shape [4, 6, 1] has 3 dims")
    add("static dim", d | {"h": torch.zeros(B, T, H + 1)}, "h: dim 2 is 9, expected 8")
    add("seq disagrees", d | {"skip": torch.zeros(B, T + 1, H)}, "skip: 'seq' = 7 (dim 1), but 'h' has 'seq' = 6")
    add("seq inside one tensor", d | {"mask": torch.ones(B, 1, T, T + 1, dtype=torch.bool)}, "'seq' = 7")
    xl, yl = _batch(t=17)
    add("seq out of bounds", _good(xl), "'seq' = 17 (dim 1) outside its bounds [1, 16]", yy=yl)
    add("batch", d | {"pos": d["pos"][:2]}, "pos: batch size 2, but 'h' has 4")
    nan = d["h"].clone()
    nan[1, 2, 3] = float("nan")
    add("nan", d | {"h": nan}, "tensor 'h' contains NaN or Inf")
    inf = d["skip"].clone()
    inf[0, 0, 0] = float("inf")
    add("inf", d | {"skip": inf}, "tensor 'skip' contains NaN or Inf")
    add("labels", d, "labels of shape [3]", yy=y[:3])
    add("label range", d, "labels must lie in [0, 5)", yy=y + C)
    add("compressed int", d, "", fmt=None)  # replaced below: pos sent scaled
    req = out[-1][1]
    i = [nt.name for nt in req.msg.tensors].index("pos")
    req.msg.tensors[i].tensor.scale = 0.5
    out[-1] = ("scaled int", req, "a int64 tensor travels exact")
    dup = _request(d, y)
    dup.add("tensors", "h", d["h"])
    out.append(("duplicate", dup, "tensor 'h' sent twice"))
    both = _request(d, y)
    both.set("activations", d["h"])
    out.append(("both fields", both, "not both"))
    single = Framed(pb.TrainRequest(header=pb.Header(step=1)))
    single.set("activations", d["h"])
    codec.encode_into(single.msg.labels, y)
    out.append(("one tensor to a dict cut", single, "send them as named tensors"))
    bad_bool = _request(d, y)
    j = [nt.name for nt in bad_bool.msg.tensors].index("mask")
    raw = np.array(bad_bool.payloads[("tensors", j)], copy=True)
    raw.view(np.uint8)[0] = 2
    bad_bool.payloads[("tensors", j)] = raw
    out.append(("bool byte 2", bad_bool, "bool tensor holds bytes other than 0 and 1"))
    return out


def test_every_malformed_request_is_refused_in_memory_and_leaves_the_segment_bit_identical():
    state = _state(_models()[1])
    before = params(state.segment)
    for what, req, match in _malformed():
        sent = frame.parse(pb.TrainRequest, frame.frame_bytes(req))  # as the wire carries it
        with pytest.raises((InvalidRequest, codec.WireError)) as e:
            state.train(sent)
        assert match in str(e.value), (what, str(e.value))
    assert state.steps == 0
    for k, v in params(state.segment).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.integration
def test_every_malformed_request_gets_invalid_argument_over_grpc():
    state = _state(_models()[1])
    before = params(state.segment)
    server = SplitServer(state, "127.0.0.1:0").start()
    channel = grpc.insecure_channel(server.address)
    try:
        raw = channel.unary_unary("/fsl.dataplane.v1.SplitDataPlane/TrainFrame", request_serializer=None)
        plain = channel.unary_unary("/fsl.dataplane.v1.SplitDataPlane/Train", request_serializer=None)
        for what, req, match in _malformed():
            for call, data in ((raw, frame.frame_bytes(req)), (plain, req.message().SerializeToString())):
                with pytest.raises(grpc.RpcError) as e:
                    call(data, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value.code())
                assert match in e.value.details(), (what, e.value.details())
        assert state.steps == 0
        for k, v in params(state.segment).items():
            assert torch.equal(v, before[k]), k
        # still up: a good request trains
        x, y = _batch()
        reply = frame.parse(pb.TrainReply, raw(frame.frame_bytes(_request(_good(x), y)), timeout=10))
        assert reply.msg.server_step == 1 and set(reply.named("grads")) == {"h", "skip"}
    finally:
        channel.close()
        server.stop(grace=None)


@pytest.mark.parametrize("kind", ["memory", pytest.param("grpc", marks=pytest.mark.integration)])
def test_single_tensor_requests_still_work_against_a_single_tensor_server(kind):
    _, _, state = make_state("cnn", "conv1")
    assert state.signature == Signature.single(state.sample_shape) and state.signature.positional
    x = torch.rand(3, *state.sample_shape)
    y = torch.tensor([1, 2, 3])
    with channel_to(state, kind) as ch:
        res = ch.train_step(x, y)  # the one `activations` field, as old clients send it
        assert isinstance(res.grad, torch.Tensor) and res.grad.shape == x.shape
        named = ch.train_step({"activations": x}, y)  # a dict with the one tensor: by name
        assert isinstance(named.grad, dict) and named.grad["activations"].shape == x.shape
    assert state.steps == 2
    # an old client's plain protobuf request, no frame
    req = pb.TrainRequest(header=pb.Header(step=9), activations=codec.encode(x), labels=codec.encode(y))
    rep = state.train(req)
    assert isinstance(rep, pb.TrainReply) and tuple(rep.grad.shape) == tuple(x.shape) and not rep.grads


def test_compression_applies_to_floats_only_and_gradients_travel_in_their_format():
    client, server = _models()
    state = _state(server)
    x, y = _batch()
    d = {k: v.detach() for k, v in client(x).items()}
    seen: list[dict[str, torch.Tensor]] = []
    state.observer = lambda hdr, h, yy: seen.append(h)  # the tensors as the server decoded them
    ch = InMemoryChannel(server=state, wire_dtype=torch.float16)
    res = ch.train_step(d, y)
    got = seen[0]
    assert got["mask"].dtype == torch.bool and got["pos"].dtype == torch.int64
    for n in ("h", "skip"):  # float16 on the wire: rounded, not exact
        assert not torch.equal(got[n].float(), d[n]) and torch.allclose(got[n].float(), d[n], atol=1e-3)
    assert torch.equal(seen[0]["pos"], d["pos"]) and torch.equal(seen[0]["mask"], d["mask"])  # exact
    assert set(res.grad) == {"h", "skip"} and res.grad["h"].dtype == torch.float32


def test_the_batcher_runs_different_sequence_lengths_as_separate_steps():
    client, server = _models()
    state = _state(server)
    batcher = RequestBatcher(state, max_requests=4, max_wait_ms=200.0, adaptive=False)
    reqs = []
    for i, t in enumerate((5, 5, 7)):
        x, y = _batch(t=t, seed=i)
        req = _request(_good(x), y)
        req.msg.header.step = i + 1
        req.msg.header.client_id = f"c{i}"
        reqs.append(req)
    replies: dict[int, Framed] = {}

    def send(i: int) -> None:
        replies[i] = batcher.train(frame.parse(pb.TrainRequest, frame.frame_bytes(reqs[i])))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(replies) == 3 and state.steps == batcher.batches
    assert batcher.batches >= 2  # the length-7 request never shares a step with the length-5 ones
    for i, t in enumerate((5, 5, 7)):
        assert replies[i].named("grads")["h"].shape == (B, t, H)


def test_concat_and_split_are_inverse():
    a = {"h": torch.rand(2, 3), "m": torch.ones(2, 1, dtype=torch.bool)}
    b = {"h": torch.rand(3, 3), "m": torch.zeros(3, 1, dtype=torch.bool)}
    joined = concat([a, b])
    assert isinstance(joined, dict) and joined["h"].shape == (5, 3)
    back = split(joined, [2, 3])
    for orig, got in zip((a, b), back, strict=True):
        assert all(torch.equal(orig[k], got[k]) for k in orig)


class Middle(nn.Module):
    """A U-shaped middle that takes the cut's dict and returns a dict (a float and a mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = d["mask"][:, 0].float()  # (B, T, T)
        return {"z": torch.tanh(self.lin(m @ d["h"] + d["skip"])), "mask": d["mask"]}


class Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(H, C)

    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = d["mask"][:, 0].any(-1, keepdim=True).float()  # (B, T, 1)
        return self.head((d["z"] * keep).mean(1))


@pytest.mark.parametrize("kind", ["memory", pytest.param("grpc", marks=pytest.mark.integration)])
def test_ushaped_step_with_named_tensors_equals_the_unsplit_model(kind):
    from clients.trainer import ushaped_step

    torch.manual_seed(3)
    bottom, middle, top = ClientSeg(), Middle(), Top()
    rb, rm, rt = copy.deepcopy(bottom), copy.deepcopy(middle), copy.deepcopy(top)
    x, y = _batch()
    loss = nn.functional.cross_entropy(rt(rm(rb(x))), y)
    loss.backward()
    with torch.no_grad():
        for p in [*rb.parameters(), *rm.parameters(), *rt.parameters()]:
            p -= LR * p.grad

    auth, identity = authority_and_identity()
    state = SplitServerState(
        middle, (), C, lr=LR, momentum=0.0, device="cpu", signature=SIG, ushaped=True, authority=auth
    )
    assert state.out_shape == {"z": (1, H), "mask": (1, 1, 1)}
    opt = torch.optim.SGD([*bottom.parameters(), *top.parameters()], lr=LR)
    with channel_to(state, kind, identity) as ch:
        step = ushaped_step(bottom, top, ch, TrainOptions(momentum=0.0), TrainHooks())
        step(x, y)
        opt.step()
        # a Backward that sends a gradient for the mask (which has none) is refused, unchanged
        before = params(state.segment)
        out, fwd = ch.forward({k: v.detach() for k, v in bottom(x).items()})
        assert set(out) == {"z", "mask"} and out["mask"].dtype == torch.bool
        with pytest.raises((InvalidRequest, DataPlaneError), match=r"unknown tensor\(s\) \['mask'\]"):
            ch.backward({"z": torch.zeros_like(out["z"]), "mask": torch.zeros(out["mask"].shape)}, fwd)
        assert all(torch.equal(v, before[k]) for k, v in params(state.segment).items())
    _close(params(bottom), params(rb), "bottom")
    _close(params(top), params(rt), "top")
    _close({k: v for k, v in params(state.segment).items()}, params(rm), "middle")
