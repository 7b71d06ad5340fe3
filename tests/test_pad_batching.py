"""Requests of different sequence lengths in one batched server step (`server.pad_lengths`).

A tiny BERT and a tiny GPT-2 (from `transformers` configs, no download, dropout off) are split by
their graph; three clients send hidden states of lengths 5, 5 and 8 (with padding inside some
texts). Batched with padding, the three share one step, and each client gets exactly the loss and
the cut gradients it gets when its request runs alone from the same weights, at its own length;
the one step moves the weights by the sum of the three lone steps (the batching semantics of
server/batching.py). Without padding the lengths run as separate steps.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fsl.config import load_experiment
from fsl.cutvalues import Signature, TensorSpec, pad_to, pad_value
from fsl.wire import codec, frame
from fsl.wire import dataplane_pb2 as pb
from fsl.wire.frame import Framed
from server.batching import RequestBatcher
from server.state import SplitServerState

pytest.importorskip("transformers")

LENGTHS = (5, 5, 8)
B = 3
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _split(name: str):
    from fsl.experiment import build_model_for, server_side

    if name == "bert":
        opts = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_length": 16, **NO_DROPOUT}
        cut, classes = "bert.encoder.layer.0", 5
    else:
        opts = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "max_length": 16, **GPT2_NO_DROPOUT}
        cut, classes = "transformer.h.0", 50
    options = "{" + ", ".join(f"{k}={v}" for k, v in opts.items()) + "}"
    cfg = load_experiment("quickstart", [f"model.name={name}", f"model.cut={cut}", f"model.options={options}"])
    model = build_model_for(cfg, (16,), classes)
    model.eval()  # nothing random on either side
    client, side = server_side(cfg, model, (16,))
    return client, side, classes


def _requests(name: str, client, classes: int) -> list[Framed]:
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i, t in enumerate(LENGTHS):
        ids = torch.randint(5, 40, (B, t), generator=g)
        mask = torch.ones(B, t, dtype=torch.long)
        mask[0, -2:] = 0  # a text shorter than its batch: padding inside the request too
        with torch.no_grad():
            cut = client({"input_ids": ids, "attention_mask": mask})
        if name == "bert":
            y = torch.randint(0, classes, (B,), generator=g)
        else:  # next-token targets, the padded ones ignored
            y = torch.where(mask.bool(), torch.randint(0, classes, (B, t), generator=g), torch.tensor(-100))
        req = Framed(pb.TrainRequest(header=pb.Header(step=i + 1, client_id=f"c{i}")))
        req.add_all("tensors", {k: v.contiguous() for k, v in cut.items()})
        codec.encode_into(req.msg.labels, y)
        reqs.append(req)
    return reqs


def _state(segment, side, classes: int) -> SplitServerState:
    return SplitServerState(
        segment, (), classes, lr=0.5, momentum=0.0, device="cpu", signature=side.signature, task=side.task
    )


def _send(target, req: Framed) -> Framed:
    return target.train(frame.parse(pb.TrainRequest, frame.frame_bytes(req)))


def _batched(batcher: RequestBatcher, reqs: list[Framed]) -> list[Framed]:
    replies: dict[int, Framed] = {}

    def send(i: int) -> None:
        replies[i] = _send(batcher, reqs[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [replies[i] for i in range(len(reqs))]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_padded_requests_share_a_step_and_each_gets_its_lone_gradient(name):
    client, side, classes = _split(name)
    reqs = _requests(name, client, classes)
    start = {k: v.clone() for k, v in side.segment.state_dict().items()}

    lone, moved = [], {k: torch.zeros_like(v) for k, v in start.items() if v.is_floating_point()}
    for req in reqs:  # each alone, from the same weights
        seg = copy.deepcopy(side.segment)
        lone.append(_send(_state(seg, side, classes), req))
        for k, v in seg.state_dict().items():
            if k in moved:
                moved[k] += v - start[k]

    state = _state(side.segment, side, classes)
    # the batch leaves when all three are in (max_requests), long before the wait runs out
    batcher = RequestBatcher(state, max_requests=len(reqs), max_wait_ms=120_000.0, adaptive=False, pad_lengths=True)
    replies = _batched(batcher, reqs)
    assert batcher.batches == 1 and state.steps == 1  # lengths 5, 5 and 8 in one step

    for t, got, want in zip(LENGTHS, replies, lone, strict=True):
        assert got.msg.loss == pytest.approx(want.msg.loss, rel=1e-5, abs=1e-6)
        assert got.msg.correct == want.msg.correct
        g, w = got.named("grads"), want.named("grads")
        assert g.keys() == w.keys() and g
        for n in g:
            assert g[n].shape == w[n].shape and g[n].shape[1] == t  # back at its own length
            torch.testing.assert_close(g[n], w[n], atol=2e-6, rtol=1e-4)
    for k, v in side.segment.state_dict().items():  # one step of the summed gradients
        if k in moved:
            torch.testing.assert_close(v - start[k], moved[k], atol=2e-6, rtol=1e-4)


def test_without_padding_each_length_is_its_own_step():
    client, side, classes = _split("bert")
    reqs = _requests("bert", client, classes)
    state = _state(side.segment, side, classes)
    batcher = RequestBatcher(state, max_requests=3, max_wait_ms=200.0, adaptive=False)
    _batched(batcher, reqs)
    assert batcher.batches >= 2 and state.steps == batcher.batches


def test_padding_marks_padded_positions_absent_and_keeps_values():
    sig = Signature(
        (
            TensorSpec("h", "float32", ("seq", 4), grad=True),
            TensorSpec("additive", "float32", (1, "seq", "seq")),
            TensorSpec("keep", "bool", ("seq",)),
            TensorSpec("pos", "int64", ("seq",)),
        ),
        {"seq": (1, 16)},
    )
    v = {
        "h": torch.rand(2, 3, 4),
        "additive": torch.zeros(2, 1, 3, 3),
        "keep": torch.ones(2, 3, dtype=torch.bool),
        "pos": torch.arange(3).expand(2, 3),
    }
    p = pad_to(v, sig, {"seq": 5})
    assert {k: tuple(t.shape) for k, t in p.items()} == {
        "h": (2, 5, 4),
        "additive": (2, 1, 5, 5),
        "keep": (2, 5),
        "pos": (2, 5),
    }
    for k in v:  # the real positions are the request's own values
        assert torch.equal(p[k][tuple(slice(0, n) for n in v[k].shape)], v[k])
    assert (p["h"][:, 3:] == 0).all() and not p["keep"][:, 3:].any()
    assert (p["additive"][..., 3:] == torch.finfo(torch.float32).min).all()  # padded keys: no attention
    assert torch.isfinite(p["additive"]).all()
    assert pad_value(sig.spec("h")) == 0 and pad_to(v, sig, {"seq": 3}) is not v  # a dict, the same tensors
    assert all(pad_to(v, sig, {"seq": 3})[k] is v[k] for k in v)
