"""Server-segment replicas (SplitFed v1, hybrid): separate copies during a round, FedAvg after."""

import torch

from fsl.channel import ChannelIdentity, InMemoryChannel
from helpers import make_state, params


def _ch(state, client):
    return InMemoryChannel(server=state, identity=ChannelIdentity(client_id=client, round=1))


def test_each_replica_trains_alone_and_the_merge_is_a_weighted_average():
    torch.manual_seed(0)
    _, _, state = make_state("cnn", "conv1", lr=0.1, momentum=0.0)
    start = params(state.segment)
    state.open_replicas({"a": "g0", "b": "g1"})
    batches = {"a": 8, "b": 24}
    for client, n in batches.items():
        _ch(state, client).train_step(torch.rand(n, 16, 14, 14), torch.randint(0, 10, (n,)))
    # during the round the global segment is untouched; each copy moved on its own
    assert all(torch.equal(v, start[k]) for k, v in params(state.segment).items())
    reps = {rid: params(r.segment) for rid, r in state.replicas().items()}
    assert not torch.equal(reps["g0"]["fc2.weight"], reps["g1"]["fc2.weight"])
    weights = state.merge_replicas()
    assert weights == {"g0": 8, "g1": 24}
    for k, v in params(state.segment).items():
        torch.testing.assert_close(v, 0.25 * reps["g0"][k] + 0.75 * reps["g1"][k])
    assert state.steps == 2


def test_a_single_replica_means_the_global_segment_itself():
    _, _, state = make_state("cnn", "conv1", lr=0.1)
    state.open_replicas({"a": "g0", "b": "g0"})
    before = params(state.segment)
    _ch(state, "a").train_step(torch.rand(4, 16, 14, 14), torch.randint(0, 10, (4,)))
    assert any(not torch.equal(v, before[k]) for k, v in params(state.segment).items())
    after = params(state.segment)
    state.merge_replicas()
    assert all(torch.equal(v, after[k]) for k, v in params(state.segment).items())


def test_momentum_is_carried_into_the_copies_and_averaged_back():
    _, _, state = make_state("cnn", "conv1", lr=0.1, momentum=0.9)
    _ch(state, "warm").train_step(torch.rand(4, 16, 14, 14), torch.randint(0, 10, (4,)))
    buf = {id(p): state.optimizer.state[p]["momentum_buffer"].clone() for p in state.segment.parameters()}
    state.open_replicas({"a": "g0", "b": "g1"})
    for rep in state.replicas().values():
        for p, q in zip(state.segment.parameters(), rep.segment.parameters(), strict=True):
            torch.testing.assert_close(rep.optimizer.state[q]["momentum_buffer"], buf[id(p)])
    state.merge_replicas()  # no one trained: the average of identical buffers is the buffer
    for p in state.segment.parameters():
        torch.testing.assert_close(state.optimizer.state[p]["momentum_buffer"], buf[id(p)])


def test_a_new_learning_rate_reaches_the_global_segment_and_every_copy():
    _, _, state = make_state("cnn", "conv1", lr=0.1, momentum=0.0)
    state.open_replicas({"a": "g0", "b": "g1"})
    state.set_lr(0.025)  # a live copy takes it from its next step
    state.merge_replicas()
    state.open_replicas({"a": "g0", "b": "g1"})  # and so does every copy opened later
    for rep in [state.global_replica, *state.replicas().values()]:
        assert [g["lr"] for g in rep.optimizer.param_groups] == [0.025]
    # and the step it takes is that rate's: w - 0.025 * grad
    before = params(state.replicas()["g0"].segment)
    h, y = torch.rand(4, 16, 14, 14), torch.randint(0, 10, (4,))
    _ch(state, "a").train_step(h, y)
    seg = state.replicas()["g0"].segment
    for name, p in seg.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.025 * p.grad, msg=name)
