"""The Flower ClientApp: trains and evaluates the client segment through the data plane.

Everything a round needs arrives in the round's message: the client segment
(``arrays``) and a config record with the resolved experiment, the split
server's address and this client's data-plane credential for the round. The
node's own config says which data partition it holds (``partition-id``,
``num-partitions``; optionally ``data-path``).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import evaluate_split, train_segment
from fsl.channel import ChannelIdentity
from fsl.config import ExperimentConfig
from fsl.data import Partition
from fsl.experiment import build_split, config_from_json, local_partition
from fsl.grpc_channel import GrpcChannel
from fsl.models import Split
from fsl.wire.codec import DTYPES

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[ExperimentConfig, ConfigRecord, Split, Partition, GrpcChannel]:
    conf: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    cfg = config_from_json(str(conf["experiment"]))
    torch.set_num_threads(int(context.node_config.get("threads", cfg.simulation.client_threads)))
    pid = int(context.node_config.get("partition-id", 0))
    nparts = int(context.node_config.get("num-partitions", cfg.clients))
    data_path = str(context.node_config.get("data-path", "")) or None
    ds, part = local_partition(cfg, pid, nparts, data_path)
    split = build_split(cfg, ds.input_shape, ds.num_classes)
    arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
    split.client.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    roots = str(conf.get("dataplane-root-certificates", "")) or None
    channel = GrpcChannel(
        identity=ChannelIdentity(
            run_id=str(conf["run-id"]),
            round=int(conf["server-round"]),  # type: ignore[arg-type]
            client_id=str(context.node_id),
            token=str(conf.get("dataplane-token", "")),
        ),
        wire_dtype=DTYPES[cfg.train.wire_dtype],
        address=str(conf["dataplane-address"]),
        root_certificates=roots.encode() if roots else None,
        max_message_bytes=cfg.server.max_message_mb * 1024 * 1024,
    )
    return cfg, conf, split, part, channel


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    cfg, conf, split, part, channel = _setup(msg, context)
    rnd = int(conf["server-round"])  # type: ignore[arg-type]
    with channel:
        stats = train_segment(
            split.client,
            part.x_train,
            part.y_train,
            channel,
            epochs=cfg.train.local_epochs,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
            proximal_mu=float(conf.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            seed=cfg.seed * 100_003 + rnd * 1_009 + context.node_id % 1_000_003,
        )
    metrics = MetricRecord(
        {
            "num-examples": stats.examples,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "compute_s": stats.compute_s,
            "wire_s": stats.wire_s,
            "total_s": time.perf_counter() - t0,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(split.client.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, _conf, split, part, channel = _setup(msg, context)
    with channel:
        ev = evaluate_split(split.client, part.x_val, part.y_val, channel, cfg.train.eval_batch_size)
        up, down = channel.bytes_up, channel.bytes_down
    metrics = MetricRecord(
        {
            "num-examples": ev.examples,
            "eval_loss": ev.loss,
            "eval_accuracy": ev.accuracy,
            "bytes_up": up,
            "bytes_down": down,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
