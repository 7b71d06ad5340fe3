"""The benchmarks' own machinery and the data-plane speed helpers (correctness only, never speed)."""

import pytest
import torch

from benchmarks.bench_batching import sflv1_copies
from benchmarks.bench_dataplane import EchoState, RawEcho, raw_round_trip, wire_overhead
from fsl.grpc_channel import GrpcChannel
from fsl.wire import codec
from fsl.wire import dataplane_pb2 as pb
from server.split_server import SplitServer


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (3, 5), (32, 16, 14, 14)])
def test_message_size_equals_bytesize(dtype, shape):
    req = pb.TrainRequest(header=pb.Header(run_id="r", round=300, client_id="c", step=2**40, token="t" * 64))
    codec.encode_into(req.activations, torch.randn(shape), dtype)
    codec.encode_into(req.labels, torch.arange(shape[0]))
    rep = pb.TrainReply(loss=0.25, correct=7, server_step=123456)
    codec.encode_into(rep.grad, torch.randn(shape), dtype)
    for msg in (req, rep, pb.TrainReply(), pb.InfoReply(model="cnn", sample_shape=[16, 14, 14], dtypes=["a", "b"])):
        assert codec.message_size(msg) == msg.ByteSize()


def test_encode_into_equals_encode_and_all_finite():
    x = torch.randn(4, 6) * 1e-5
    for dt in (None, torch.float16, torch.bfloat16):
        assert codec.encode_into(pb.Tensor(), x, dt) == codec.encode(x, dt)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        y = x.to(dt)
        assert codec.all_finite(y)
        for bad in (float("nan"), float("inf"), float("-inf")):
            z = y.clone()
            z[1, 2] = bad
            assert not codec.all_finite(z)


def test_float16_scaling_matches_torch_reference():
    x = torch.randn(1000) * 3e-6
    t = codec.encode(x, torch.float16)
    amax = float(x.abs().max())
    import math

    scale = 2.0 ** (math.ceil(math.log2(amax)) - 15)
    assert t.scale == scale
    assert torch.equal(codec.decode(t), (x / scale).to(torch.float16).float() * scale)


@pytest.mark.integration
def test_dataplane_benchmark_round_trips_are_exact_and_overhead_is_counted():
    server = SplitServer(EchoState(), "127.0.0.1:0").start()
    ch = GrpcChannel(address=server.address)
    raw = RawEcho()
    sock = raw.client()
    try:
        h, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        assert torch.equal(ch.train_step(h, y).grad, h)
        assert torch.equal(raw_round_trip(sock, h, y, bytearray(1 << 20)), h)
        ov = wire_overhead(server.port, h, y, calls=2)
        assert ov["tensor_bytes"] == 2 * 32 * 64 * 4 + 32 * 8 and ov["wire_bytes"] > ov["tensor_bytes"]
    finally:
        sock.close()
        raw.close()
        ch.close()
        server.stop(grace=None)


def test_sflv1_vmap_over_copies_equals_the_loop():
    assert sflv1_copies("fc1", 3, "cpu", repeat=1)["equal"]


@pytest.mark.integration
def test_the_breakdown_counts_every_batch_of_every_client():
    from benchmarks.bench_breakdown import shared

    row = shared(2, 6)
    assert row["server_steps"] == 12  # each client's 6 batches, warm-up excluded
    assert 0 < row["server_locked_ms"] < row["server_cpu_ms"]  # the locked step is part of the server's CPU
    assert row["client_cpu_ms"] > 0 and row["client_fwd_ms"] > 0 and row["client_bwd_ms"] > 0  # (wall times)


@pytest.mark.integration
def test_the_scaling_benchmark_writes_its_rows_and_the_overhead(tmp_path, monkeypatch):
    import json

    from benchmarks import bench_scaling, common

    monkeypatch.setattr(common, "RESULTS", tmp_path)  # not over the committed results
    bench_scaling.run(quick=True)
    out = json.loads((tmp_path / "scaling.json").read_text())
    rows = {(r["clients"], r["batching"]): r for r in out["rows"]}
    assert set(rows) == {(k, b) for k in (1, 4) for b in (False, True)}
    for r in rows.values():
        assert {"samples_per_s", "p50_ms", "p99_ms"} <= set(r) and r["requests"] == r["clients"] * max(
            4, 16 // r["clients"]
        )
    assert rows[(1, False)]["requests_per_step"] == 1  # unbatched: one step per request
    assert isinstance(out["server_overhead_ms_per_request"], float)
    assert set(out["stages_without_grpc_ms"]) >= {"admit_ms", "commit_ms", "train_step_ms", "ours_ms"}
