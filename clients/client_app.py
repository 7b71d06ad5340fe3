"""The Flower ClientApp: trains and evaluates the client's part of the model.

Everything a round needs arrives in the round's message: the client's part of
the model (``arrays``: the client segment; bottom and top segments in a U-shaped
split; the whole model for the ``fl`` baseline) and a config record with the
resolved experiment, the split server's address and this client's data-plane
credential for the round. The node's own config says which data partition it
holds (``partition-id``, ``num-partitions``; optionally ``data-path``,
``threads`` and a declared ``capability`` used by hybrid grouping).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.resources import client_memory_check, node_batch_size, peak_rss_mb
from clients.splitguard import HijackingDetected, SplitGuard
from clients.trainer import evaluate_split, evaluate_split_u, train_segment, train_segment_u
from fsl.channel import ChannelIdentity
from fsl.config import ExperimentConfig
from fsl.data import Partition
from fsl.experiment import base_digests, client_part, config_from_json, local_partition
from fsl.grpc_channel import GrpcChannel
from fsl.lora import carried_state, check_base, load_carried
from fsl.models import model_spec
from fsl.plugins import resolve
from fsl.privacy.client import client_arrays, client_privacy, private_labels, secagg_setup_reply, wire_dtype_for
from fsl.training import TrainHooks, TrainOptions, TrainStats, evaluate_model, train_local

app = ClientApp()


def _local_data(cfg: ExperimentConfig, context: Context) -> tuple[Any, Partition]:
    """The dataset and the partition this node holds (its node config says which)."""
    pid = int(context.node_config.get("partition-id", 0))
    nparts = int(context.node_config.get("num-partitions", cfg.clients))
    data_path = str(context.node_config.get("data-path", "")) or None
    return local_partition(cfg, pid, nparts, data_path)


class _Round:
    """One message's worth of client state: config, data, model part and data-plane channel."""

    def __init__(self, msg: Message, context: Context) -> None:
        conf: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
        self.conf = conf
        self.cfg: ExperimentConfig = config_from_json(str(conf["experiment"]))
        torch.set_num_threads(int(context.node_config.get("threads", self.cfg.simulation.client_threads)))
        pid = int(context.node_config.get("partition-id", 0))
        self.ds, self.part = _local_data(self.cfg, context)
        self.module, self.detail = client_part(self.cfg, self.ds.input_shape, self.ds.num_classes)
        self.partition_id = pid
        self.node_id = context.node_id
        self.node_config = context.node_config
        self.round = int(conf.get("server-round", 0))  # type: ignore[arg-type]
        if str(conf.get("base-digest", "")):  # adapters (LoRA) only mean something on the base they were trained on
            check_base({"client": str(conf["base-digest"])}, base_digests(self.module), f"node {self.node_id}")
        if "arrays" in msg.content:
            arrays: ArrayRecord = msg.content["arrays"]  # type: ignore[assignment]
            load_carried(self.module, arrays.to_torch_state_dict(), "client segment")

    @property
    def partition(self) -> Partition:
        return self.part

    def channel(self) -> GrpcChannel:
        conf, cfg = self.conf, self.cfg
        roots = str(conf.get("dataplane-root-certificates", "")) or None
        return GrpcChannel(
            identity=ChannelIdentity(
                run_id=str(conf["run-id"]),
                round=int(conf["server-round"]),  # type: ignore[arg-type]
                client_id=str(self.node_id),
                token=str(conf.get("dataplane-token", "")),
            ),
            wire_dtype=wire_dtype_for(cfg),  # train.wire_dtype, or the compressed format privacy asks for
            address=str(conf["dataplane-address"]),
            root_certificates=roots.encode() if roots else None,
            max_message_bytes=cfg.server.max_message_mb * 1024 * 1024,
            timeout_s=cfg.server.request_timeout_s,  # a dead link ends this client's round
            retries=cfg.server.request_retries,  # a reset link is retried
        )

    def options(self) -> TrainOptions:
        """This round's training options: the experiment's, this node's batch size, a per-round seed."""
        # by data partition, not node id: Flower's node ids are random per run, and a run must repeat
        # with its seed
        seed = self.cfg.seed * 100_003 + self.round * 1_009 + self.partition_id
        options = TrainOptions.from_config(
            self.cfg,
            seed=seed,
            rnd=self.round,
            proximal_mu=float(self.conf.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        )
        return dataclasses.replace(options, batch_size=node_batch_size(self.node_config, options.batch_size))

    def plugin_hooks(self) -> TrainHooks | None:
        """The hooks the experiment plugs in by import string: the data owner's ground-truth capture, on
        rounds the ServerApp records (``record-dir`` in the round's config)."""
        spec = self.cfg.record.ground_truth
        if not spec or not str(self.conf.get("record-dir", "")):
            return None
        hooks: TrainHooks | None = resolve(spec)(self.cfg, self.conf, str(self.node_id))
        return hooks


GUARD_TENSORS, GUARD_NUMBERS, GUARD_VERDICT = "splitguard-tensors", "splitguard-numbers", "splitguard-verdict"


def _guard(cfg: ExperimentConfig, context: Context, num_classes: int) -> SplitGuard | None:
    """This node's SplitGuard as the experiment sets it, with what it learnt in earlier rounds; raises
    :class:`HijackingDetected` at once when it fired in an earlier round of the run: the client
    never trains with that server again."""
    if not cfg.privacy.splitguard:
        return None
    if GUARD_VERDICT in context.state:
        verdict: ConfigRecord = context.state[GUARD_VERDICT]  # type: ignore[assignment]
        raise HijackingDetected(f"refusing to train: in round {verdict['round']!s} {verdict['reason']!s}")
    p = cfg.privacy
    guard = SplitGuard(
        num_classes=num_classes,
        p_fake=p.splitguard_p_fake,
        window=p.splitguard_window,
        threshold=p.splitguard_threshold,
        seed=cfg.seed * 100_003 + int(context.node_config.get("partition-id", 0)),
    )
    if GUARD_NUMBERS in context.state:
        tensors: ArrayRecord = context.state[GUARD_TENSORS]  # type: ignore[assignment]
        numbers: ConfigRecord = context.state[GUARD_NUMBERS]  # type: ignore[assignment]
        guard.restore(tensors.to_torch_state_dict(), dict(numbers))
    return guard


def _keep_guard(guard: SplitGuard, context: Context) -> None:
    tensors, numbers = guard.state()
    context.state[GUARD_TENSORS] = ArrayRecord(tensors)
    context.state[GUARD_NUMBERS] = ConfigRecord(numbers)  # type: ignore[arg-type]


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    t0 = time.perf_counter()
    r = _Round(msg, context)
    cfg, part = r.cfg, r.part
    options = r.options()
    # refuse a round that would not fit the device's declared memory before any work starts
    client_memory_check(cfg, r.detail, r.module, r.ds.input_shape, context.node_config, options.batch_size)
    privacy = client_privacy(cfg, r.module, len(part.y_train), options, r.partition_id)
    options, hooks = privacy.options, privacy.hooks.merged(r.plugin_hooks())
    stats: TrainStats
    x_train = part.x_train
    y_train = private_labels(cfg, part.y_train, r.ds.num_classes, r.partition_id)
    # before any connection: a node whose detector fired in an earlier round does not dial the server
    guard = _guard(cfg, context, r.ds.num_classes)
    if cfg.mode == "fl":
        stats = train_local(r.module, x_train, y_train, options, hooks)
    else:
        with r.channel() as channel:
            if cfg.model.ushaped:
                d = r.detail
                stats = train_segment_u(d.bottom, d.top, x_train, y_train, channel, options, hooks)
            else:
                try:
                    stats = train_segment(r.module, x_train, y_train, channel, options, hooks, guard=guard)
                except HijackingDetected as e:  # this round fails with the reason, and every later one
                    context.state[GUARD_VERDICT] = ConfigRecord({"round": r.round, "reason": str(e)})
                    raise
                finally:
                    if guard is not None:
                        _keep_guard(guard, context)
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
            "started_at": started,
            "finished_at": time.time(),
            "peak_rss_mb": peak_rss_mb(),  # this process's peak resident memory (VmHWM)
            **privacy.metrics(),  # (sigma, q, steps) for the server's DP accountant
        }
    )
    # what trained, and only that (a frozen LoRA base stays here); masked under secure aggregation
    arrays = client_arrays(carried_state(r.module), r.conf, context, stats.examples)
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    r = _Round(msg, context)
    cfg, part = r.cfg, r.part
    bs = cfg.train.eval_batch_size
    up = down = 0
    x_val, task = part.x_val, model_spec(cfg.model.name).task
    if cfg.mode == "fl":
        ev = evaluate_model(r.module, x_val, part.y_val, bs, task)
    else:
        with r.channel() as channel:
            if cfg.model.ushaped:
                ev = evaluate_split_u(r.detail.bottom, r.detail.top, x_val, part.y_val, channel, bs, task)
            else:
                ev = evaluate_split(r.module, x_val, part.y_val, channel, bs, task=task)
            up, down = channel.bytes_up, channel.bytes_down
    metrics = MetricRecord(
        {
            "num-examples": ev.examples,
            "eval_loss": ev.loss,
            "eval_accuracy": ev.accuracy,
            "eval_targets": ev.targets,  # what the two means are over (tokens for a language model)
            "bytes_up": up,
            "bytes_down": down,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """What this node holds, for the ServerApp's planning (hybrid grouping, progress)."""
    setup = secagg_setup_reply(msg, context)  # secure aggregation's key setup is a query of its own
    if setup is not None:
        return setup  # type: ignore[no-any-return]
    # asked of every node once per run (thousands in a large simulation): only the data, no model
    cfg = config_from_json(str(msg.content["config"]["experiment"]))
    _, part = _local_data(cfg, context)
    metrics = MetricRecord(
        {
            "num-examples": len(part.y_train),
            "capability": float(context.node_config.get("capability", 1.0)),
            "partition-id": int(context.node_config.get("partition-id", 0)),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
