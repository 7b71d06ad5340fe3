"""Split inference: deadline-aware batching on the server, early exits on the device, `fsl serve`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from clients.predictor import SplitPredictor
from clients.trainer import TrainOptions, train_local
from clocks import Holds, ManualClock
from fsl.channel import ChannelIdentity, InMemoryChannel
from fsl.config import ExperimentConfig, from_dict, to_toml
from fsl.exits import add_exits
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl.models import build_model, cut_shape, split_model
from fsl.rundir import Checkpoint, RunDir
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from server.infer_batching import InferBatcher, ServiceModel
from server.serve import serving_authority
from server.split_server import InvalidRequest, SplitServerState
from server.timeline import Timeline

ROOT = Path(__file__).resolve().parents[1]


_MODELS: dict = {}


def _trained(digits, exits=False):
    """Trained once per test session (a copy each call: tests must not share modules)."""
    if exits not in _MODELS:
        _MODELS[exits] = _train(digits, exits)
    return copy.deepcopy(_MODELS[exits])


def _train(digits, exits):
    torch.manual_seed(0)
    model = build_model("cnn", digits.input_shape, seed=0)
    if exits:
        model = add_exits(model, digits.input_shape, 10, ("conv1", "conv2", "fc1"), seed=0)
    train_local(model, digits.x_train, digits.y_train, TrainOptions(epochs=3, lr=0.05))
    return model


def _state(split, digits, **kw):
    return SplitServerState(
        split.server, sample_shape=cut_shape(split.client, digits.input_shape), num_classes=10, device="cpu", **kw
    )


def _request(h, budget_ms=0.0):
    req = pb.InferRequest(header=pb.Header(client_id="c"), budget_ms=budget_ms)
    codec.encode_into(req.activations, h)
    return req


def test_service_model_learns_a_linear_cost():
    m = ServiceModel()
    for n in (1, 4, 16, 64, 8, 32):
        m.update(n, 2.0 + 0.5 * n)
    assert m.predict(100) == pytest.approx(52.0, rel=0.02)


def test_concurrent_requests_share_batches_and_get_their_own_rows(digits):
    split = split_model(_trained(digits), "conv1")
    state = _state(split, digits)
    # the clock stands still: the batch is held until it is full, however the requests are spread
    batcher = InferBatcher(state, max_samples=16, max_wait_ms=50.0, timeline=Timeline(ManualClock()))
    x = digits.x_test[:16]
    with torch.no_grad():
        h = split.client.eval()(x)  # (16, 16, 4, 4)
        expected = split.server.eval()(h)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: batcher.infer(_request(h[i : i + 1], budget_ms=200.0)), range(16)))
    batcher.close()
    got = torch.cat([codec.decode(r.logits) for r in replies])
    assert torch.allclose(got, expected, atol=1e-5)  # every request got its own rows
    assert batcher.requests == 16 and batcher.batches == 1  # and they were served together
    assert all(r.batch == 16 for r in replies)


def test_a_request_is_held_for_company_only_as_long_as_its_budget_allows(digits):
    split = split_model(_trained(digits), "conv1")
    clock, holds = ManualClock(10.0), Holds()
    batcher = InferBatcher(
        _state(split, digits), max_samples=64, max_wait_ms=1000.0, margin_ms=1.0, timeline=Timeline(clock, holds)
    )
    with torch.no_grad():
        h = split.client.eval()(digits.x_test[:1])

    def held(budget_ms):
        """Send one request alone; return (planned release - arrival, queue_ms) in ms."""
        arrival = clock()
        service_ms = batcher.service.predict(2)  # what the batcher expects a batch with one more to take
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(batcher.infer, _request(h, budget_ms=budget_ms))
            release = holds.next()
            clock.set(release + 1e-9)  # the clock passes the planned release: the worker lets the batch go
            batcher.wake()
            got = reply.result(timeout=30)
        holds.clear()  # re-plans while the clock stood still
        return (release - arrival) * 1000.0, got.queue_ms, service_ms

    # held (there might be company), but released in time for its deadline: budget - service - margin
    wait, queued, service = held(300.0)
    assert wait == pytest.approx(300.0 - service - 1.0) and queued == pytest.approx(wait, abs=1e-5)
    wait, queued, service = held(5.0)  # a tight budget is held only for what it can spare
    assert wait == pytest.approx(5.0 - service - 1.0) and wait < 5.0 and queued == pytest.approx(wait, abs=1e-5)
    wait, queued, service = held(0.0)  # no budget: at most max_wait_ms
    assert wait == pytest.approx(1000.0 - service - 1.0) and queued == pytest.approx(wait, abs=1e-5)
    batcher.close()


def test_bad_requests_fail_alone(digits):
    split = split_model(_trained(digits), "conv1")
    batcher = InferBatcher(_state(split, digits), max_samples=64, max_wait_ms=1.0)
    with pytest.raises(InvalidRequest, match="do not fit"):
        batcher.infer(_request(torch.zeros(2, 3, 3, 3)))
    with torch.no_grad():
        h = split.client.eval()(digits.x_test[:2])
    assert codec.decode(batcher.infer(_request(h)).logits).shape == (2, 10)
    batcher.close()


def test_early_exit_answers_on_the_device(digits):
    model = _trained(digits, exits=True)
    split = split_model(model, "conv1")
    state = _state(split, digits)
    x, y = digits.x_test, digits.y_test
    never = SplitPredictor(split.client, InMemoryChannel(server=state), exit_threshold=1.01)
    always = SplitPredictor(split.client, InMemoryChannel(server=state), exit_threshold=0.0)
    some = SplitPredictor(split.client, InMemoryChannel(server=state), exit_threshold=0.9)
    p_never, p_always, p_some = never.predict(x), always.predict(x), some.predict(x)
    with torch.no_grad():
        full = model.eval()(x)
    assert not p_never.exited.any() and torch.allclose(p_never.logits, full, atol=1e-5)
    assert p_always.exited.all() and always.channel.requests == 0 and p_always.wire_ms == 0.0
    frac = float(p_some.exited.float().mean())
    assert 0.2 < frac < 1.0, frac
    acc = {k: float((p.logits.argmax(1) == y).float().mean()) for k, p in [("full", p_never), ("some", p_some)]}
    assert acc["some"] > acc["full"] - 0.05, acc  # confident device answers are mostly right
    assert some.channel.bytes_up < 0.8 * never.channel.bytes_up  # and their activations never travelled


def test_predictor_needs_exits_for_a_threshold(digits):
    split = split_model(_trained(digits), "conv1")
    with pytest.raises(ValueError, match="no exits"):
        SplitPredictor(split.client, InMemoryChannel(server=_state(split, digits)), exit_threshold=0.5).predict(
            digits.x_test[:2]
        )


def test_inference_only_state_refuses_training(digits):
    split = split_model(_trained(digits), "conv1")
    state = _state(split, digits, inference_only=True)
    req = pb.TrainRequest(header=pb.Header(client_id="c"))
    with pytest.raises(InvalidRequest, match="inference only"):
        state.train(req)


def _run_dir(tmp_path, digits, model):
    cfg = from_dict(ExperimentConfig, {"name": "served", "data": {"name": "digits"}, "model": {"cut": "conv1"}})
    run = RunDir.create(tmp_path, "served")
    run.write_config(to_toml(cfg))
    split = split_model(model, "conv1")
    server = {f"segment.{k}": v for k, v in split.server.state_dict().items()}
    run.save_checkpoint(Checkpoint(round=3, client=split.client.state_dict(), server=server, extra={}))
    return run.path


def test_fsl_serve_end_to_end(tmp_path, digits):
    model = _trained(digits)
    run_dir = _run_dir(tmp_path, digits, model)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fsl_cli", "serve", str(run_dir), "--address", "127.0.0.1:0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert info["round"] == 3 and info["batching"] and info["device"] == "cpu"
        auth = serving_authority(run_dir, 0, create=False)
        run_id = f"serve:{Path(run_dir).resolve().name}"
        ident = ChannelIdentity(run_id=run_id, round=0, client_id="pi-1", token=auth.issue(0, "pi-1"))
        split = split_model(model, "conv1")
        with torch.no_grad():
            h = split.client.eval()(digits.x_test)
            expected = split.server.eval()(h).argmax(1)
        ch = GrpcChannel(address=info["address"], identity=ident)
        got = ch.infer(h, budget_ms=100.0).argmax(1)
        assert torch.equal(got, expected)
        with pytest.raises(DataPlaneError) as e:
            ch.train_step(h[:4], digits.y_test[:4])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        ch.close()
        forged = GrpcChannel(
            address=info["address"], identity=ChannelIdentity(run_id=run_id, round=0, client_id="x", token="00")
        )
        with pytest.raises(DataPlaneError) as e:
            forged.infer(h[:1])
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        forged.close()
        stale = ChannelIdentity(run_id=run_id, round=1, client_id="pi-1", token=auth.issue(1, "pi-1"))
        old = GrpcChannel(address=info["address"], identity=stale)
        with pytest.raises(DataPlaneError) as e:
            old.infer(h[:1])
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        old.close()
        # the client CLI against the same server
        token = subprocess.run(
            [sys.executable, "-m", "fsl_cli", "serve-token", str(run_dir), "cli-client"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout.strip()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "fsl_cli",
                "predict",
                str(run_dir),
                "--server",
                info["address"],
                "--client",
                "cli-client",
                "--token",
                token,
                "--n",
                "200",
                "--batch-size",
                "8",
                "--budget-ms",
                "50",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout.strip().splitlines()[-1])
        ref = float((expected[:200] == digits.y_test[:200]).float().mean())
        assert res["samples"] == 200 and res["accuracy"] == pytest.approx(ref)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
