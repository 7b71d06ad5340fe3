"""A U-shaped causal language model over the real data plane: what the split server receives.

The experiment's own split (``experiments/transformers-lm.toml``: GPT-2 cut after its first block and
before its last, embeddings, last block, final norm and output layer on the client), shrunk, trains
one epoch and evaluates over gRPC on 127.0.0.1. Every request the server received is read back from
its raw bytes: only float hidden states of the expected shapes (and the attention mask the client
derived) may arrive; no token id, no next-token label, no integer tensor, no label-carrying call.
"""

import copy

import pytest
import torch

from clients.trainer import TrainOptions, evaluate_split_u, train_segment_u
from fsl import tasks
from fsl.channel import InMemoryChannel
from fsl.config import load_experiment
from fsl.experiment import build_model_for, usplit_for
from fsl.grpc_channel import GrpcChannel
from fsl.models import run_model
from fsl.textdata import next_token_labels
from fsl.wire import dataplane_pb2 as pb
from fsl.wire import frame
from helpers import RequestRecorder, authority_and_identity, params
from server.split_server import SplitServer, SplitServerState

T, H, V = 12, 16, 30522  # tokens per sequence, width, the MiniLM vocabulary the zoo's gpt2 uses
TINY = [
    f"model.options.hidden_size={H}",
    "model.options.num_heads=2",
    f"model.options.max_length={T}",
    f"data.options.max_length={T}",
]
REQUESTS = {"Forward": pb.ForwardRequest, "Backward": pb.BackwardRequest, "Infer": pb.InferRequest}


def _tokens(n: int) -> dict[str, torch.Tensor]:
    """``n`` sequences of distinctive token ids (no id below 1000, so none reads as a small float),
    padded to different lengths as a tokenizer pads them."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1000, V, (n, T), generator=g)
    lengths = torch.tensor([T, T - 3, T - 5, 6] * (n // 4))
    mask = (torch.arange(T) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _received(method: str, raw: bytes) -> tuple[str, object, dict[str, torch.Tensor]]:
    """(the call's name, its message, every tensor in it by field or name), decoded as the server does."""
    name = method.rsplit("/", 1)[1]
    framed = name.endswith("Frame")
    call = name.removesuffix("Frame")
    msg_type = REQUESTS[call]  # any other call (Train, which carries labels) fails here
    req = frame.parse(msg_type, raw) if framed else frame.Framed(msg_type.FromString(raw))
    tensors: dict[str, torch.Tensor] = {}
    for field, _ in req.msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.name == "Tensor":
            tensors[field.name] = req.tensor(field.name)
        elif field.message_type.name == "NamedTensor":
            tensors.update(req.named(field.name))
    return call, req.msg, tensors


def test_a_ushaped_step_of_the_tied_language_model_is_the_unsplit_models_step():
    """Through the trainer (routing, the mask both the middle and the top read, the tied embedding and
    output layer in both client segments, stepped once) one SGD step equals the unsplit model's."""
    no_dropout = ["model.options.resid_pdrop=0.0", "model.options.embd_pdrop=0.0", "model.options.attn_pdrop=0.0"]
    cfg = load_experiment("transformers-lm", [*TINY, *no_dropout])
    model = build_model_for(cfg, (T,), V)
    ref = copy.deepcopy(model).train()
    u = usplit_for(cfg, model, (T,))
    x = _tokens(4)
    y = next_token_labels(x)
    lr = 0.5
    tasks.loss("causal-lm", run_model(ref, x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    auth, identity = authority_and_identity()
    state = SplitServerState(
        u.middle, (), V, signature=u.graph.signature(1), task="causal-lm", lr=lr, momentum=0.0, device="cpu",
        ushaped=True, authority=auth,
    )  # fmt: skip
    ch = InMemoryChannel(server=state, identity=identity)
    train_segment_u(u.bottom, u.top, x, y, ch, TrainOptions(batch_size=4, lr=lr, momentum=0.0, task="causal-lm"))
    want = dict(ref.named_parameters(remove_duplicate=False))
    top, bottom = (dict(m.named_parameters(remove_duplicate=False)) for m in (u.top, u.bottom))
    assert top["lm_head.weight"] is bottom["transformer.wte.weight"]  # one tied weight in both segments
    for seg in (u.bottom, u.middle, u.top):
        for k, v in seg.named_parameters(remove_duplicate=False):
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.integration
def test_a_ushaped_language_model_sends_only_float_hidden_states():
    cfg = load_experiment("transformers-lm", TINY)
    assert cfg.model.ushaped and cfg.mode == "ushaped"
    model = build_model_for(cfg, (T,), V)
    u = usplit_for(cfg, model, (T,))
    assert u.graph is not None
    top_keys = set(u.top.state_dict())
    assert {"lm_head.weight", "transformer.ln_f.weight", "transformer.wte.weight"} <= top_keys  # the head stays
    assert not any(k.startswith(("lm_head", "transformer.wte", "transformer.ln_f")) for k in u.middle.state_dict())
    middle_before = params(u.middle)

    x = _tokens(8)
    y = next_token_labels(x)
    auth, identity = authority_and_identity(client="lm")
    sig = u.graph.signature(1)
    state = SplitServerState(
        u.middle, (), V, signature=sig, task="causal-lm", lr=0.1, momentum=0.0, device="cpu", ushaped=True,
        authority=auth,
    )  # fmt: skip
    rec = RequestRecorder()
    server = SplitServer(state, "127.0.0.1:0", interceptors=[rec]).start()
    try:
        with GrpcChannel(address=server.address, identity=identity) as ch:
            stats = train_segment_u(u.bottom, u.top, x, y, ch, TrainOptions(batch_size=4, lr=0.1, task="causal-lm"))
            ev = evaluate_split_u(u.bottom, u.top, x, y, ch, batch_size=8, task="causal-lm")
    finally:
        server.stop(grace=None)

    # it trained: two steps on the server's middle, the loss over the real tokens
    assert state.steps == 2 and stats.examples == 8
    assert any(not torch.equal(v, middle_before[k]) for k, v in params(u.middle).items())
    assert ev.targets == int((y != -100).sum()) and 0 < ev.loss < 11

    calls = [_received(m, raw) for m, raw in rec.requests]
    assert [c for c, _, _ in calls].count("Forward") == 2 and [c for c, _, _ in calls].count("Backward") == 2
    assert "Infer" in [c for c, _, _ in calls]
    up = {s.name: s for s in sig.tensors}  # what the middle takes: the first block's output and the mask
    assert set(up) == {"transformer.h.0", "transformer:where"} and not up["transformer:where"].grad
    # what must never cross: each sequence's token ids, its labels and its mask, as integers or floats
    rows = [r for t in (x["input_ids"], y, x["attention_mask"]) for r in t]
    secret = [r.to(dt).numpy().tobytes() for r in rows for dt in (torch.int64, torch.int32, torch.float32)]
    raw_all = b"".join(raw for _, raw in rec.requests)
    assert not any(sb in raw_all for sb in secret)
    for call, msg, tensors in calls:
        assert tensors, call
        assert not any(f.name in ("labels", "label_counts") for f, _ in msg.ListFields()), call
        if call == "Backward":  # only the gradient at the second cut goes up
            assert list(tensors) == ["transformer.h.1"], list(tensors)
        for name, t in tensors.items():
            assert t.is_floating_point(), (call, name, t.dtype)  # no integer tensor of any kind
            assert t.shape[0] == (8 if call == "Infer" else 4), (call, name, t.shape)
            if name == "transformer:where":  # the additive attention mask: 0 or the dtype's minimum
                assert call != "Backward" and t.shape[1] == 1 and t.shape[2] == t.shape[3] <= T
                assert bool(((t == 0) | (t == torch.finfo(t.dtype).min)).all())
            else:  # a hidden state (B, seq, H): the first block's output, or the gradient at the second cut
                assert name in ("transformer.h.0", "transformer.h.1"), (call, name)
                assert t.dim() == 3 and t.shape[1] <= T and t.shape[2] == H, (call, name, t.shape)
