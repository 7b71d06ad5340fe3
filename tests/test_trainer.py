"""The client trainer learns through the split (in-memory channel, real codec)."""

import pytest
import torch

from clients.trainer import TrainOptions, evaluate_model, evaluate_split, train_segment
from fsl.channel import InMemoryChannel
from fsl.data import client_partition
from fsl.models import build_model, join_segments
from helpers import make_state


def test_split_training_learns_digits(digits):
    _, split, state = make_state("cnn", "conv1", input_shape=digits.input_shape, lr=0.05, momentum=0.9)
    part = client_partition(digits, 0, 1, seed=0)
    ch = InMemoryChannel(server=state)
    before = evaluate_split(split.client, digits.x_test, digits.y_test, ch)
    stats = train_segment(split.client, part.x_train, part.y_train, ch, TrainOptions(epochs=6, batch_size=32, lr=0.05))
    after = evaluate_split(split.client, digits.x_test, digits.y_test, ch)
    assert before.accuracy < 0.3
    assert after.accuracy > 0.9, after
    assert stats.examples == 6 * len(part.y_train) and stats.bytes_up > 0 and stats.bytes_down > 0
    # split inference and the joined model agree
    whole = evaluate_model(join_segments(split.client, state.segment), digits.x_test, digits.y_test)
    assert abs(whole.accuracy - after.accuracy) < 1e-9


def test_fedprox_term_pulls_towards_the_start(digits):
    torch.manual_seed(0)
    dist = {}
    for mu in (0.0, 10.0):
        _, split, state = make_state("cnn", "conv1", input_shape=digits.input_shape, lr=0.05)
        start = [p.detach().clone() for p in split.client.parameters()]
        part = client_partition(digits, 0, 1, seed=0)
        ch = InMemoryChannel(server=state)
        train_segment(split.client, part.x_train, part.y_train, ch, TrainOptions(epochs=1, proximal_mu=mu))
        dist[mu] = sum(float((p - s).norm()) for p, s in zip(split.client.parameters(), start, strict=True))
    assert dist[10.0] < 0.8 * dist[0.0]


def test_the_client_sgd_is_torchs_sgd_bit_for_bit():
    from fsl.optim import SGD

    for momentum, wd in ((0.0, 0.0), (0.9, 0.0), (0.9, 5e-4)):
        a, b = build_model("cnn", seed=0), build_model("cnn", seed=0)
        ours = SGD(a.parameters(), lr=0.05, momentum=momentum, weight_decay=wd)
        ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=momentum, weight_decay=wd)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            for model, opt in ((a, ours), (b, ref)):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), (momentum, wd)
    with pytest.raises(ValueError):
        SGD(a.parameters(), lr=-1.0)


def test_training_flushes_denormals_in_its_own_thread(digits):
    """Decayed momentum holds denormal floats, slow on CPUs (fsl/fastmath.py): the client loop and the
    split server's step flush them to zero in the thread that trains (the setting is per thread)."""
    import threading

    from helpers import channel_to

    torch.set_flush_denormal(False)  # this thread, and the threads started from here, keep IEEE denormals
    tiny = torch.tensor([1e-39])  # a float32 denormal; tiny * 1.0 is 0.0 only with denormals flushed
    seen: dict[str, float] = {}

    def in_thread(name, fn=lambda: None):
        def run():
            fn()
            seen[name] = float(tiny * 1.0)

        t = threading.Thread(target=run)
        t.start()
        t.join()

    _, split, state = make_state("cnn", "conv1", input_shape=digits.input_shape)
    part = client_partition(digits, 0, 1, seed=0)
    x, y = part.x_train[:64], part.y_train[:64]
    in_thread("untouched")
    in_thread(
        "client", lambda: train_segment(split.client, x, y, InMemoryChannel(server=state), TrainOptions(epochs=1))
    )

    def exchange(hdr, h, y_, grad):  # runs in the split server's gRPC worker thread, right after its step
        seen["server"] = float(tiny * 1.0)

    state.exchange_observer = exchange
    with channel_to(state, "grpc") as ch:  # started from this thread: its workers start with denormals kept
        ch.train_step(split.client(x[:8]).detach(), y[:8])
    assert seen["untouched"] > 0.0, "denormals were already flushed: the test would prove nothing"
    assert seen["client"] == 0.0
    assert seen["server"] == 0.0


def test_one_loop_three_steps_train_the_same_model(digits):
    """Whole-model, split and U-shaped training run the same loop (shuffling, SGD with momentum and weight
    decay, statistics, cartography): from the same weights and seed they reach the same model."""
    from clients.trainer import TrainHooks, train_local, train_segment_u
    from fsl.models import build_model, cut_shape, split_model, split_model_u
    from server.split_server import SplitServerState

    x, y = digits.x_train[:96], digits.y_train[:96]
    opts = TrainOptions(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, seed=3)
    shape = digits.input_shape

    def server(segment, cut_of, ushaped=False):
        return SplitServerState(
            segment,
            sample_shape=cut_shape(cut_of, shape),
            num_classes=10,
            lr=opts.lr,
            momentum=opts.momentum,
            weight_decay=opts.weight_decay,
            device="cpu",
            ushaped=ushaped,
        )

    confidences: dict[str, list[torch.Tensor]] = {"local": [], "split": [], "ushaped": []}

    def hooks(name):
        return TrainHooks(cartography=lambda idx, p, epoch: confidences[name].append(p))

    local = build_model("cnn", shape, seed=0)
    s_local = train_local(local, x, y, opts, hooks("local"))
    whole = build_model("cnn", shape, seed=0)
    sp = split_model(whole, "conv1")
    s_split = train_segment(sp.client, x, y, InMemoryChannel(server=server(sp.server, sp.client)), opts, hooks("split"))
    joined_u = build_model("cnn", shape, seed=0)
    u = split_model_u(joined_u, "conv1", "fc1")
    ch = InMemoryChannel(server=server(u.middle, u.bottom, ushaped=True))
    s_u = train_segment_u(u.bottom, u.top, x, y, ch, opts, hooks("ushaped"))

    for name, model in (("split", whole), ("ushaped", joined_u)):
        for (k, a), b in zip(local.state_dict().items(), model.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        torch.testing.assert_close(torch.cat(confidences[name]), torch.cat(confidences["local"]), rtol=1e-4, atol=1e-5)
    for s in (s_local, s_split, s_u):
        assert (s.examples, s.batches) == (2 * 96, 2 * 6)
        assert s.loss == pytest.approx(s_local.loss, rel=1e-4) and s.accuracy == s_local.accuracy
    assert s_local.bytes_up == 0 and s_split.bytes_up > 0 and s_u.bytes_up > 0


def test_hooks_merge_observers_and_refuse_two_that_change_training():
    from fsl.training import TrainHooks, train_local

    seen: list[str] = []
    a = TrainHooks(on_batch=lambda n: seen.append(f"a{n}"), release=lambda h: h)
    b = TrainHooks(on_batch=lambda n: seen.append(f"b{n}"))
    both = a.merged(b)
    assert both.release is a.release and both.merged(None) is both
    both.on_batch(4)
    assert seen == ["a4", "b4"]
    with pytest.raises(ValueError, match="release"):
        a.merged(TrainHooks(release=lambda h: h))
    with pytest.raises(ValueError, match="cut"):  # a whole model has no activations to release
        train_local(build_model("cnn", seed=0), torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), hooks=a)
