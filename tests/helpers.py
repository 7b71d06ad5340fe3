"""Small builders shared by the tests (real components, no mocks)."""

from __future__ import annotations

import contextlib
import copy

import grpc
import torch

from fsl.auth import RoundAuthority
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.grpc_channel import GrpcChannel
from fsl.models import build_model, cut_shape, model_spec, split_model
from server.split_server import SplitServer, SplitServerState


def make_state(model_name="cnn", cut="conv1", input_shape=None, lr=0.1, momentum=0.0, authority=None, seed=0, **kw):
    shape = input_shape or model_spec(model_name).input_shape
    model = build_model(model_name, input_shape=shape, seed=seed)
    reference = copy.deepcopy(model)
    split = split_model(model, cut)
    state = split_state(
        split, shape, lr=lr, momentum=momentum, authority=authority, model_name=model_name, cut=cut, **kw
    )
    return reference, split, state


def split_state(split, input_shape, *, lr=0.05, momentum=0.9, **kw):
    """The split server for ``split`` of a 10-class model on ``input_shape``, on the CPU."""
    return SplitServerState(
        split.server,
        sample_shape=cut_shape(split.client, input_shape),
        num_classes=10,
        lr=lr,
        momentum=momentum,
        device="cpu",
        **kw,
    )


@contextlib.contextmanager
def channel_to(state, kind, identity=None, wire_dtype=torch.float32):
    """An in-memory channel, or a real gRPC server on 127.0.0.1 and a channel to it."""
    identity = identity or ChannelIdentity()
    if kind == "memory":
        yield InMemoryChannel(server=state, identity=identity, wire_dtype=wire_dtype)
        return
    server = SplitServer(state, "127.0.0.1:0").start()
    ch = GrpcChannel(address=server.address, identity=identity, wire_dtype=wire_dtype)
    try:
        yield ch
    finally:
        ch.close()
        server.stop(grace=None)


def authority_and_identity(round_=1, client="7", run_id="run-test"):
    auth = RoundAuthority(run_id)
    auth.open_round(round_)
    return auth, ChannelIdentity(run_id=run_id, round=round_, client_id=client, token=auth.issue(round_, client))


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RequestRecorder(grpc.ServerInterceptor):
    """Keeps the raw bytes of every request that reaches a gRPC server (what a split server received):
    ``requests`` is a list of (method path, raw request bytes) in arrival order."""

    def __init__(self):
        self.requests = []

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, deserialize = details.method, handler.request_deserializer

        def wrapped_deserialize(raw):
            self.requests.append((method, raw))
            return deserialize(raw)

        return grpc.unary_unary_rpc_method_handler(
            handler.unary_unary,
            request_deserializer=wrapped_deserialize,
            response_serializer=handler.response_serializer,
        )


def flower_message(conf, arrays, node_id=5):
    """A train message as the ServerApp sends it: the client's arrays and the round's config."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}),
        dst_node_id=node_id,
        message_type=MessageType.TRAIN,
    )


def padded_tokens(n: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` right-padded texts of ``t`` token slots and different lengths (3 to ``t - 1`` real
    tokens, ids 1000-1999, pads 0), with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.int64)
    for i in range(n):
        real = 3 + i % (t - 3)
        ids[i, real:], mask[i, real:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}
