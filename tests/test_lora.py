"""LoRA on a split model (peft): only adapters and the head train and travel, the frozen base is
checked, checkpoints hold adapters apart, and serving merges them into the base."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fsl.config import ConfigError, LoraConfig, load_experiment
from fsl.textdata import FORTUNES_DIR
from helpers import flower_message

pytest.importorskip("peft")

needs_fortunes = pytest.mark.skipif(
    not (FORTUNES_DIR / "people").exists(), reason="apt-get install -y fortunes (.ci/run installs it)"
)

TINY = [
    "model.name=bert",
    "model.cut=bert.encoder.layer.0",
    "model.options={num_layers=2, hidden_size=32, num_heads=2}",
    "data.name=fortunes",
    "data.options={max_length=16}",
    "data.train_limit=100",
    "data.test_limit=50",
    "clients=2",
    "train.batch_size=32",
    "train.lr=0.1",
    "train.server_lr=0.1",
    "model.lora.r=2",
    "model.lora.alpha=4.0",
    "model.lora.dropout=0.1",  # the adapters' dropout is traced into the training graph only
]


def _tiny(*extra):
    return load_experiment("quickstart", [*TINY, *extra])


def test_the_lora_section_is_checked():
    assert not LoraConfig().enabled and LoraConfig(r=4).enabled
    assert LoraConfig(r=2, targets="query, value").targets == ("query", "value")  # Flower's flat run config
    for bad, match in (
        ({"r": -1}, "r must"),
        ({"r": 2, "segments": "middle"}, "segments"),
        ({"dropout": 1.0}, "dropout"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_experiment("quickstart", [f"model.lora.{k}={json.dumps(v)}" for k, v in bad.items()])


def _tiny_model(segments="both"):
    from fsl.experiment import build_model_for, server_side

    cfg = _tiny(f"model.lora.segments={segments}")
    model = build_model_for(cfg, (16,), 5)
    return cfg, model, *server_side(cfg, model, (16,))


def test_adapters_go_where_segments_says_and_the_rest_freezes():
    """On the CNN (a Sequential: no trace), cut after conv2, adapters on both convolutions and fc1."""
    from fsl.experiment import build_model_for, server_side
    from fsl.lora import adapter_names, carried_state

    lora = ["model.lora.r=2", "model.lora.targets=conv1.0,conv2.0,fc1.1", "model.lora.trainable=fc2", "model.cut=conv2"]
    for segments in ("both", "client", "server"):
        cfg = load_experiment("quickstart", [*lora, f"model.lora.segments={segments}"])
        model = build_model_for(cfg, (1, 28, 28), 10)
        client, side = server_side(cfg, model, (1, 28, 28))
        adapters = adapter_names(model)
        adapted = {n.split(".lora_")[0] for n in adapters}
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        head = {"fc2.weight", "fc2.bias"}
        assert head <= trained and not trained & {n for n in dict(model.named_parameters()) if ".base_layer." in n}
        if segments == "both":
            assert adapted == {"conv1.0", "conv2.0", "fc1.1"} and trained == adapters | head
        elif segments == "client":  # the server segment trains in full, without adapters
            assert adapted == {"conv1.0", "conv2.0"} and trained == adapters | head | {"fc1.1.weight", "fc1.1.bias"}
        else:
            assert adapted == {"fc1.1"} and trained == adapters | head | {
                f"{m}.{w}" for m in ("conv1.0", "conv2.0") for w in ("weight", "bias")
            }
        assert set(carried_state(client)) == {n for n, _ in client.named_parameters()} & trained
        x = torch.randn(3, 1, 28, 28)
        assert side.segment(client(x)).shape == (3, 10)  # the adapted model still splits at its block


def test_a_head_that_is_not_there_is_refused():
    from fsl.experiment import build_model_for

    with pytest.raises(ValueError, match="no module 'score'"):
        build_model_for(_tiny("model.lora.trainable=score"), (16,), 5)
    with pytest.raises(ValueError, match="match no module"):
        build_model_for(_tiny("model.lora.targets=nosuch"), (16,), 5)


@pytest.mark.integration
@needs_fortunes
def test_a_split_round_trains_only_adapters_and_flower_carries_only_them(flower_task):
    """The ClientApp's train over a real gRPC split server: Flower's arrays both ways are the client
    segment's adapters, the server stepped its adapters and head only, the base stayed bit-identical
    on both sides, and a node whose frozen base differs refuses the round."""
    from flwr.app import ArrayRecord, Context, RecordDict

    import clients.client_app as client_app
    from clients.trainer import train_segment
    from fsl.auth import RoundAuthority
    from fsl.channel import ChannelIdentity
    from fsl.experiment import base_digests, config_to_json, local_partition
    from fsl.grpc_channel import GrpcChannel
    from fsl.lora import BaseMismatch, adapter_names, carried_state, frozen_names
    from server.split_server import SplitServer, SplitServerState

    cfg, model, client, side = _tiny_model()
    auth = RoundAuthority("run-lora")
    auth.open_round(1)
    state = SplitServerState(
        side.segment,
        sample_shape=side.sample_shape,
        signature=side.signature,
        num_classes=5,
        lr=0.1,
        device="cpu",
        authority=auth,
    )
    trained_server = [p for p in side.segment.parameters() if p.requires_grad]
    assert [p for g in state.optimizer.param_groups for p in g["params"]] == trained_server
    before = {k: v.clone() for k, v in model.state_dict().items()}
    server = SplitServer(state, "127.0.0.1:0").start()
    try:
        sent = ArrayRecord(carried_state(client))
        client_adapters = adapter_names(model) & {n for n, _ in client.named_parameters()}
        assert set(sent.keys()) == client_adapters and len(client_adapters) == 4  # query, value: A and B
        conf = {
            "experiment": config_to_json(cfg),
            "run-id": "run-lora",
            "dataplane-address": server.address,
            "server-round": 1,
            "dataplane-token": auth.issue(1, "5"),
            "base-digest": base_digests(client)["client"],
        }
        ctx = Context(
            run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={}
        )
        reply = client_app.train(flower_message(conf, sent), ctx)
        back = reply.content["arrays"].to_torch_state_dict()
        assert set(back) == client_adapters  # the control plane carries the adapters and nothing else
        assert reply.content["arrays"].count_bytes() < 0.01 * sum(v.nbytes for v in client.state_dict().values())
        assert any(not torch.equal(back[k], before[k]) for k in back if ".lora_B." in k)  # and they trained
        after = model.state_dict()  # the server segment's tensors are the model's own
        changed = {k for k, _ in side.segment.named_parameters() if not torch.equal(before[k], after[k])}
        assert (
            {"classifier.weight", "classifier.bias"}
            < changed
            <= {"classifier.weight", "classifier.bias"} | {k for k in changed if ".lora_" in k}
        )
        assert all(torch.equal(before[k], after[k]) for k in frozen_names(side.segment))

        # the client side of the same step, kept here: its base is bit-identical after training
        ds, part = local_partition(cfg, 1, 2)
        identity = ChannelIdentity(run_id="run-lora", round=1, client_id="6", token=auth.issue(1, "6"))
        with GrpcChannel(address=server.address, identity=identity) as channel:
            train_segment(client, part.x_train, part.y_train, channel)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in frozen_names(client))
        assert any(not torch.equal(before[k], after[k]) for k in client_adapters)

        with pytest.raises(BaseMismatch, match="frozen base of the client segment differs"):
            client_app.train(flower_message({**conf, "base-digest": "0" * 64}, sent), ctx)
    finally:
        server.stop(grace=None)


def test_merging_gives_the_adapted_models_outputs_with_the_plain_names():
    from fsl.experiment import build_model_for, without_lora
    from fsl.lora import merge_lora

    cfg = _tiny("model.lora.targets=all-linear")
    plain_keys = set(build_model_for(without_lora(cfg), (16,), 5).state_dict())
    model = build_model_for(cfg, (16,), 5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: give the adapters something to add
                p.normal_(0, 0.5)
    x = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    x["attention_mask"][0, 8:] = 0
    with torch.no_grad():
        adapted = model(**x).logits
        plain = build_model_for(without_lora(cfg), (16,), 5).eval()(**x).logits
        merged = merge_lora(model)(**x).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters change the outputs ...
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)  # ... and the merged weights do the same
    assert set(model.state_dict()) == plain_keys


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.xdist_group("ray")
@needs_fortunes
def test_a_lora_run_checkpoints_adapters_apart_and_serves_merged(tmp_path):
    """`fsl run` of the tiny BERT with LoRA through Flower's simulation engine: the control plane
    moves adapter bytes only, checkpoints hold adapters and the base's fingerprint, a changed base
    is refused, and `fsl serve`'s loader merges the adapters into a model that predicts what the
    unmerged one does. (Resuming from such a checkpoint is the loader's path too: the adapters go
    into a freshly built base; tests/test_e2e_simulation.py resumes runs in general.)"""
    from fsl.config import to_toml
    from fsl.lora import BaseMismatch, carried_state
    from fsl.rundir import RunDir
    from server.serve import load_served_model

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    run = tmp_path / "lora"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(_tiny("train.rounds=2", "name=lora", f"output_dir={tmp_path}")))
    cmd = [sys.executable, "-m", "fsl_cli", "run", "--resume", str(run), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    ckpt = RunDir(run).latest_checkpoint()
    assert ckpt is not None and ckpt.round == 2
    assert ckpt.client and all(".lora_" in k for k in ckpt.client)
    segment = {k for k in ckpt.server if k.startswith("segment.")}
    assert segment and all(".lora_" in k or k.startswith("segment.classifier.") for k in segment)
    assert set(ckpt.extra["base_digest"]) == {"client", "server"}
    adapter_bytes = sum(v.nbytes for v in ckpt.client.values())
    for r in rows:  # two clients: the adapters down and back for training, and down again for evaluation
        assert adapter_bytes * 2 <= r["control_bytes_up"] <= adapter_bytes * 2 + 4_000
        assert adapter_bytes * 4 <= r["control_bytes_down"] <= adapter_bytes * 4 + 8_000

    unmerged = load_served_model(run, merge=False)
    merged = load_served_model(run)
    assert not any(".lora_" in k for k in merged.server.state_dict()) and carried_state(unmerged.client)
    x = {"input_ids": torch.randint(1000, 2000, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(
            merged.server(merged.client(x)), unmerged.server(unmerged.client(x)), atol=1e-5, rtol=1e-4
        )

    # a checkpoint's adapters belong to the base it fingerprints: another base is refused (on resume
    # too: the ServerApp checks with the same function)
    state = json.loads((run / "checkpoints" / "round-0002" / "state.json").read_text())
    state["base_digest"]["server"] = "0" * 64
    (run / "checkpoints" / "round-0002" / "state.json").write_text(json.dumps(state))
    with pytest.raises(BaseMismatch, match="frozen base of the server segment differs"):
        load_served_model(run)


def test_the_lora_experiment_loads_and_its_central_run_differs_only_in_mode():
    from experiments.transformers_lora import lora_configs

    split, central = lora_configs(["train.rounds=1"])
    assert split.model.lora.enabled and split.mode == "fsl" and central.mode == "central"
    assert (central.model, central.data, central.train) == (split.model, split.data, split.train)
