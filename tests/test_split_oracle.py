"""Splitting must not change the math.

One training step through the split (client forward -> wire -> server forward,
loss, backward, SGD step -> wire -> client backward, SGD step) must give the
same gradients and the same updated weights as the same step on the unsplit
model, at every cut point, for several batch sizes, through the in-memory
channel and through real gRPC on 127.0.0.1.
"""

import pytest
import torch
from torch import nn

from fsl.models import MODELS, cut_points, model_spec, split_model
from helpers import channel_to, make_state

CASES = [(m, c) for m in sorted(MODELS) if not MODELS[m].graph for c in cut_points(m)]


def _rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _step(model_name, cut, batch, kind, wire_dtype=torch.float32, lr=0.1):
    torch.manual_seed(batch)
    reference, split, state = make_state(model_name, cut, lr=lr)
    x = torch.rand(batch, *model_spec(model_name).input_shape)
    y = torch.randint(0, 10, (batch,))

    # unsplit reference step
    reference.train()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    ref_opt.zero_grad()
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_client_grads = {
        n: p.grad.clone() for n, p in reference.named_parameters() if n in dict(split.client.named_parameters())
    }
    ref_opt.step()

    # the same step through the split
    split.client.train()
    opt = torch.optim.SGD(split.client.parameters(), lr=lr)
    with channel_to(state, kind, wire_dtype=wire_dtype) as ch:
        h = split.client(x)  # (B, ...) smashed
        result = ch.train_step(h.detach(), y)
        opt.zero_grad()
        h.backward(result.grad)
    client_grads = {n: p.grad.clone() for n, p in split.client.named_parameters()}
    opt.step()
    after = {**split.client.state_dict(), **state.segment.state_dict()}
    return reference, ref_client_grads, client_grads, after


@pytest.mark.parametrize("kind", ["memory", "grpc"])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("model_name,cut", CASES)
def test_split_step_equals_unsplit_step(model_name, cut, batch, kind):
    reference, ref_grads, grads, after = _step(model_name, cut, batch, kind)
    assert set(grads) == set(ref_grads) and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6)
    # every weight and buffer (BatchNorm statistics included) matches after the update
    for name, v in reference.state_dict().items():
        torch.testing.assert_close(after[name], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("wire_dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("kind", ["memory", "grpc"])
def test_half_precision_wire_stays_within_dtype_tolerance(wire_dtype, tol, kind):
    """With a narrower wire dtype the only change is rounding on the wire.

    The reference rounds the cut activations to the wire dtype in its forward
    pass (and passes gradients straight through): ReLU/max-pool make the
    gradient at the cut jump under any perturbation of the activations, so the
    fair comparison isolates what the wire itself does.
    """
    torch.manual_seed(0)
    reference, split, state = make_state("cnn", "conv1", lr=0.1)
    ref_split = split_model(reference, "conv1")
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    h_ref = ref_split.client(x)
    h_q = h_ref + (h_ref.detach().to(wire_dtype).float() - h_ref).detach()  # rounded forward, identity backward
    nn.functional.cross_entropy(ref_split.server(h_q), y).backward()
    with channel_to(state, kind, wire_dtype=wire_dtype) as ch:
        h = split.client(x)
        h.backward(ch.train_step(h.detach(), y).grad)
    errs = {n: _rel_err(p.grad, dict(reference.named_parameters())[n].grad) for n, p in split.client.named_parameters()}
    assert all(e < tol for e in errs.values()), errs
    assert any(e > 0 for e in errs.values()), "the wire should have rounded the gradient"


U_CASES = [
    ("cnn", "conv1", "fc1"),
    ("cnn", "conv2", "fc1"),
    ("resnet", "stem", "layer3"),
    ("resnet", "layer1", "layer2"),
]


@pytest.mark.parametrize("kind", ["memory", "grpc"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("model_name,cut,top_cut", U_CASES)
def test_ushaped_step_equals_unsplit_step(model_name, cut, top_cut, batch, kind):
    import copy

    from clients.trainer import TrainOptions, train_segment_u
    from fsl.models import build_model, cut_shape, split_model_u
    from server.split_server import SplitServerState

    torch.manual_seed(batch)
    shape = model_spec(model_name).input_shape
    model = build_model(model_name, seed=0)
    reference = copy.deepcopy(model)
    u = split_model_u(model, cut, top_cut)
    state = SplitServerState(
        u.middle,
        sample_shape=cut_shape(u.bottom, shape),
        num_classes=10,
        lr=0.1,
        momentum=0.0,
        device="cpu",
        ushaped=True,
    )
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.0)
    ref_opt.zero_grad()
    nn.functional.cross_entropy(reference.train()(x), y).backward()
    ref_opt.step()
    with channel_to(state, kind) as ch:
        train_segment_u(u.bottom, u.top, x, y, ch, TrainOptions(epochs=1, batch_size=batch, lr=0.1, momentum=0.0))
    after = {**u.bottom.state_dict(), **state.segment.state_dict(), **u.top.state_dict()}
    for name, v in reference.state_dict().items():
        torch.testing.assert_close(after[name], v, rtol=1e-4, atol=1e-6)
