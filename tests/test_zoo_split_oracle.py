"""Every zoo model, split at every legal cut, steps exactly as the unsplit model.

The cuts are the ones ``fsl cuts`` lists (:func:`fsl.graphsplit.cut_table`), all of them for every
model but two whose cut lists are long and whose steps are dear on a 2-core CPU: MobileNet (about 150
legal cuts) is checked at every block-level cut and an even sample of the deeper ones, 30 in all,
and the pretrained MiniLM (the same BertForSequenceClassification graph as ``bert``, every cut of
which is checked) at 8. At each, one SGD step
through the segments (each crossing value arriving as a fresh leaf, as over the wire) gives the unsplit
model's loss, gradients and updated weights. At each model's default cut the same step also runs
through a real split server over gRPC on 127.0.0.1: named tensors up, their gradients down.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_graphsplit import _backward, _run_split

from fsl import tasks
from fsl.graphsplit import cut_table, split_traced, trace
from fsl.models import MODELS, build_module, model_spec, run_model
from fsl.zoo_hf import TOKEN_VOCAB

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
GPT_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# small sizes keep a step cheap; dropout off so that a training-mode step is deterministic
OPTIONS: dict[str, dict[str, object]] = {
    "bert": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, **NO_DROPOUT},
    "minilm": NO_DROPOUT,
    "gpt2": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, **GPT_NO_DROPOUT},
    "gpt2-classify": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, **GPT_NO_DROPOUT},
    "mobilenet": {"classifier_dropout_prob": 0.0},
}
IMAGE = {
    "cnn": (1, 28, 28),
    "resnet": (3, 16, 16),
    "regnet": (1, 28, 28),
    "hf-resnet": (1, 28, 28),
    "mobilenet": (3, 32, 32),
}
SEQ = 12


def _model(name: str) -> tuple[torch.nn.Module, object, dict, dict, torch.Tensor]:
    spec = model_spec(name)
    torch.manual_seed(0)
    if spec.input_kind == "tokens":
        model = build_module(name, (SEQ,), 3, seed=0, options=OPTIONS.get(name))
        ids = torch.randint(1000, 2000, (3, SEQ))
        mask = torch.ones_like(ids)
        mask[1, SEQ // 2 :] = 0  # a padded sequence
        x: object = {"input_ids": ids, "attention_mask": mask}
        dyn = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
        if spec.task == "causal-lm":
            y = torch.cat([ids[:, 1:], torch.full((3, 1), tasks.IGNORE)], 1)
            y[1, SEQ // 2 - 1 :] = tasks.IGNORE
        else:
            y = torch.tensor([0, 1, 2])
        return model, x, dyn, {"seq": (2, 64)}, y
    shape = IMAGE.get(name, spec.input_shape)
    model = build_module(name, shape, 10, seed=0, options=OPTIONS.get(name))
    return model, torch.rand(4, *shape), {}, {}, torch.randint(0, 10, (4,))


def _reference(model: torch.nn.Module, x: object, y: torch.Tensor, task: str):
    whole = copy.deepcopy(model).train()
    loss = tasks.loss(task, run_model(whole, x), y)
    loss.backward()
    torch.optim.SGD(whole.parameters(), lr=0.1).step()
    grads = {n: p.grad for n, p in whole.named_parameters(remove_duplicate=False) if p.grad is not None}
    return float(loss.detach()), grads, whole.state_dict()


def _close(got: dict, ref: dict, what: str) -> None:
    assert set(got) == set(ref), what
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=2e-4, atol=2e-6, msg=lambda m, k=k: f"{what} {k}: {m}")


ZOO = sorted(MODELS)
MAX_CUTS = {"mobilenet": 30, "minilm": 8}


def _sample(rows: list, limit: int) -> list:
    """Every block-level cut (at most two dots deep) and an even sample of the deeper ones, ``limit`` in all."""
    if len(rows) <= limit:
        return rows
    blocks = [r for r in rows if r.cut.count(".") <= 2][:limit]
    deeper = [r for r in rows if r not in blocks]
    k = limit - len(blocks)
    return blocks + ([deeper[round(i * (len(deeper) - 1) / max(1, k - 1))] for i in range(k)] if k > 0 else [])


@pytest.mark.parametrize("name", ZOO)
def test_every_legal_cut_steps_as_the_unsplit_model(name: str) -> None:
    model, x, dyn, bounds, y = _model(name)
    task = model_spec(name).task
    ref_loss, ref_grads, ref_state = _reference(model, x, y, task)
    traced = trace(copy.deepcopy(model), x, dyn, bounds)
    rows, refused = cut_table(traced, x)
    assert rows, f"{name}: no legal cut ({list(refused.items())[:3]})"
    for row in _sample(rows, MAX_CUTS.get(name, len(rows))):
        parted = copy.deepcopy(model)
        traced.model = parted  # the trace reads parameters by name: a fresh copy for each cut
        sp = split_traced(traced, [row.cut])
        for s in sp.segments:
            s.train()
        pred, pairs = _run_split(sp, x)
        loss = tasks.loss(task, pred, y)
        assert abs(float(loss) - ref_loss) < 1e-4, (name, row.cut)
        _backward(loss, pairs)
        grads = {
            n: p.grad for s in sp.segments for n, p in s.named_parameters(remove_duplicate=False) if p.grad is not None
        }
        _close(grads, ref_grads, f"{name} at {row.cut}: gradient of")
        params = {id(p): p for s in sp.segments for p in s.parameters()}
        torch.optim.SGD(list(params.values()), lr=0.1).step()
        _close({k: v for s in sp.segments for k, v in s.state_dict().items()}, ref_state, f"{name} at {row.cut}:")


@pytest.mark.integration
@pytest.mark.parametrize("name", [m for m in ZOO if MODELS[m].graph])
def test_default_cut_over_grpc_steps_as_the_unsplit_model(name: str) -> None:
    from fsl.channel import ChannelIdentity
    from fsl.grpc_channel import GrpcChannel
    from server.split_server import SplitServer, SplitServerState

    model, x, dyn, bounds, y = _model(name)
    spec = model_spec(name)
    _, ref_grads, ref_state = _reference(model, x, y, spec.task)
    parted = copy.deepcopy(model)
    sp = split_traced(trace(parted, x, dyn, bounds), [spec.default_cut])
    client, server_seg = sp.segments
    state = SplitServerState(
        server_seg.train(),
        sample_shape=(),
        signature=sp.signature(1),
        task=spec.task,
        num_classes=TOKEN_VOCAB if spec.task == "causal-lm" else 3 if spec.input_kind == "tokens" else 10,
        lr=0.1,
        momentum=0.0,
        device="cpu",
        logit_adjust=False,
    )
    server = SplitServer(state, "127.0.0.1:0").start()
    ch = GrpcChannel(address=server.address, identity=ChannelIdentity())
    try:
        client.train()
        h = client(x)
        res = ch.train_step({k: v.detach() for k, v in h.items()}, y)
        assert isinstance(res.grad, dict)
        assert set(res.grad) == {c.name for c in sp.crossings if c.grad}, "gradients travel for the floats only"
        torch.autograd.backward([h[k] for k in res.grad], [res.grad[k] for k in res.grad])
    finally:
        ch.close()
        server.stop(grace=None)
    grads = {n: p.grad for n, p in client.named_parameters(remove_duplicate=False) if p.grad is not None}
    _close(grads, {k: v for k, v in ref_grads.items() if k in grads}, f"{name} client gradient of")
    assert set(grads) == {n for n, _ in client.named_parameters(remove_duplicate=False)} & set(ref_grads)
    torch.optim.SGD(client.parameters(), lr=0.1).step()
    after = {**client.state_dict(), **state.segment.state_dict()}
    _close(after, ref_state, f"{name} over gRPC:")
