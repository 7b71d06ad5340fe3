"""Client resource controls (clients/resources.py): memory budget, batch size, peak RSS."""

from __future__ import annotations

import pytest

from clients.resources import (
    MemoryBudgetError,
    check_memory_budget,
    client_memory_check,
    estimate_training_memory,
    node_batch_size,
    peak_rss_mb,
    rss_mb,
)
from fsl.config import load_experiment
from fsl.experiment import client_part
from fsl.models import build_model, split_model


def _client(cut: str):
    return split_model(build_model("cnn", (1, 28, 28), 10), cut).client


def test_estimate_grows_with_the_batch_and_with_the_depth_of_the_cut():
    e32 = estimate_training_memory([_client("conv1")], (1, 28, 28), 32)
    e64 = estimate_training_memory([_client("conv1")], (1, 28, 28), 64)
    assert e64.activations_mb == pytest.approx(2 * e32.activations_mb)
    deep = estimate_training_memory([_client("fc1")], (1, 28, 28), 32)
    assert deep.params_mb > e32.params_mb and deep.activations_mb > e32.activations_mb
    # conv1 keeps at least input + conv output + ReLU + pooled output: (1 + 3*16*... ) floats per sample
    assert e32.activations_mb * 1024 * 1024 / 32 >= 4 * (28 * 28 + 16 * 28 * 28 + 16 * 14 * 14)


def test_budget_refusal_says_what_fits():
    est = estimate_training_memory([_client("fc1")], (1, 28, 28), 256)
    check_memory_budget(est, 0, "x")  # no budget
    check_memory_budget(est, est.total_mb + 1, "x")
    fits = est.resident_mb + 96 + (est.training_mb - 96) / 2
    with pytest.raises(MemoryBudgetError, match=r"cnn cut at fc1 with batch size 256 .*batch-size=1\d\d") as err:
        check_memory_budget(est, fits, "cnn cut at fc1")
    assert "Nothing was trained" in str(err.value)
    with pytest.raises(MemoryBudgetError, match="no batch size fits"):
        check_memory_budget(est, est.resident_mb / 2, "cnn cut at fc1")


def test_client_memory_check_covers_every_kind_of_client_part():
    for overrides in ([], ["mode=ushaped"], ["mode=fl"]):
        cfg = load_experiment("quickstart", overrides)
        module, detail = client_part(cfg, (1, 28, 28), 10)
        assert client_memory_check(cfg, detail, module, (1, 28, 28), {}, 32) is None  # no budget set
        est = client_memory_check(cfg, detail, module, (1, 28, 28), {"memory-mb": 100_000.0}, 32)
        assert est is not None and est.total_mb > est.resident_mb
        with pytest.raises(MemoryBudgetError):
            client_memory_check(cfg, detail, module, (1, 28, 28), {"memory-mb": 1.0}, 32)


def test_node_batch_size_and_rss():
    assert node_batch_size({}, 32) == 32
    assert node_batch_size({"batch-size": 8}, 32) == 8
    with pytest.raises(ValueError):
        node_batch_size({"batch-size": -1}, 32)
    assert 10 < rss_mb() <= peak_rss_mb() < 100_000


def test_the_client_role_imports_nothing_server_or_simulation_only():
    """What `pip install .[client]` lacks must not be needed by the ClientApp or the `fsl supernode` command."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys
BLOCK = {"safetensors", "matplotlib", "sklearn", "mlxtend", "ray", "skimage", "opacus", "hypothesis"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError("server/simulation-only package imported by the client: " + name)
sys.meta_path.insert(0, Block())
import clients.client_app, clients.resources, fsl_cli.deploy, fsl.grpc_channel
from fsl_cli import main
assert main(["supernode", "--superlink", "h:1", "--root-certificates", "ca.pem", "--partition-id", "0",
             "--num-partitions", "2", "--dry-run"]) == 0
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "flower-supernode" in proc.stdout


def test_a_client_trains_without_importing_torchs_compiler():
    """torch.optim imports torch._dynamo and sympy (~75 MB resident); the client's SGD must not."""
    import subprocess
    import sys

    from fsl.models import build_model, cut_shape, split_model
    from server.split_server import SplitServer, SplitServerState

    code = """
import sys, torch
from clients.trainer import TrainOptions, train_local, train_segment
from fsl.grpc_channel import GrpcChannel
from fsl.models import build_model, split_model
x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
with GrpcChannel(address=sys.argv[1]) as ch:
    st = train_segment(split_model(build_model("cnn", seed=0), "conv1").client, x, y, ch, TrainOptions(batch_size=32))
assert st.batches == 2
assert "torch._dynamo" not in sys.modules and "sympy" not in sys.modules, "split client"
train_local(build_model("cnn", seed=0), x, y, TrainOptions(batch_size=32))
assert "torch._dynamo" not in sys.modules and "sympy" not in sys.modules, "fl client"
"""
    split = split_model(build_model("cnn", seed=0), "conv1")
    state = SplitServerState(split.server, cut_shape(split.client, (1, 28, 28)), 10, device="cpu")
    server = SplitServer(state, "127.0.0.1:0").start()
    try:
        proc = subprocess.run([sys.executable, "-c", code, server.address], capture_output=True, text=True, timeout=120)
    finally:
        server.stop(grace=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
