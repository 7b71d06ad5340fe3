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
