"""The round loop of every split-learning architecture: configure → train → aggregate → evaluate → record.

:class:`RoundRunner` turns a mode into a :class:`server.plan.RoundPlan` each round and executes it
on a Flower grid. **configure**: the strategy selects clients (Flower's ``configure_train``), the
plan says who trains in which order, the data plane opens the round (a fresh credential per
client, server-segment replicas where the mode has them). **train**: each client gets its client
segment and the round's config, all at once or one after another. **aggregate**: the strategy's
``aggregate_train`` FedAvgs the returned segments (or the last one is kept, or each client keeps
its own); server replicas are merged by the split server. **evaluate**: clients evaluate by split
inference on their own held-out data, and the joined model is evaluated on the test set.
**record**: the ``metrics.jsonl`` row and a checkpoint of both segments. Secure aggregation, the
privacy ledger and the observation recorder plug in as :mod:`server.round_hooks`.

A run directory with checkpoints resumes where it stopped. Runs are reproducible where the mode
allows it: a round's selection depends only on the seed and the round, clients are ordered by the
data partition they hold (Flower's node ids are random per run), and replies are aggregated in plan
order, so a sequential mode (``sl``, ``sflv2``) resumed after a crash gives the same numbers as an
uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fsl.auth import RoundAuthority
from fsl.config import ExperimentConfig, to_toml
from fsl.endpoint import advertised_address, dataplane_tls
from fsl.experiment import ServerSide, base_digests, build_model_for, config_to_json, experiment_dataset, server_side
from fsl.lora import carried_state, check_base, load_carried
from fsl.memory import peak_rss_mb
from fsl.models import model_spec
from fsl.privacy.server import ServerPrivacy
from fsl.rundir import Checkpoint, RunDir
from fsl.training import evaluate_model
from server.plan import NodeInfo, RoundPlan, round_plan
from server.recorder import ObservationRecorder, attach_recorder
from server.remote import RemoteSegments
from server.results import LogReporter, Reporter, RoundNumbers, metrics_row, run_title, summarize_run
from server.round_hooks import (
    CrashAfterRound,
    ObservationHook,
    PhaseMarker,
    PrivacyReport,
    Round,
    RoundHook,
    SecureAggregation,
    TensorBoardLog,
)
from server.split_server import ClientStats, SplitServer, SplitServerState
from server.strategy import make_strategy

__all__ = ["PartitionOrder", "RoundRunner"]

log = logging.getLogger("fsl.server")


class PartitionOrder:
    """A grid that lists its nodes by the data partition each declared, then by node id.

    Flower's strategies sample from ``get_node_ids()`` in list order, and node ids are random per
    run; listed by partition, the same seed selects the same data in the same order in every run.
    """

    def __init__(self, grid: Grid, info: dict[int, NodeInfo]) -> None:
        self._grid, self._info = grid, info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _key(self, node: int) -> tuple[int, int, int]:
        part = self._info[node].partition if node in self._info else None
        return (part is None, part or 0, node)

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=self._key)


@dataclass
class Evaluation:
    """The evaluate phase's results."""

    accuracy: float
    loss: float
    per_client: list[float]
    fed_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_failures: int = 0
    control_down: int = 0  # bytes of the client segments sent for federated evaluation
    exit_accuracies: dict[str, float] = field(default_factory=dict)  # multi-exit models: test accuracy by exit


class RoundRunner:
    """Runs (or resumes) one experiment on a Flower grid."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunDir, reporter: Reporter | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.reporter = reporter or LogReporter()
        self.mode = cfg.architecture
        if cfg.server.threads:
            torch.set_num_threads(cfg.server.threads)
        self.ds = experiment_dataset(cfg)
        self.task = model_spec(cfg.model.name).task
        model = build_model_for(cfg, self.ds.input_shape, self.ds.num_classes)
        self.eval_model: nn.Module = copy.deepcopy(model)  # CPU copy for central evaluation
        self.run_id = run.path.name
        self.authority = RoundAuthority(self.run_id)
        self.state: SplitServerState | None = None
        if self.mode == "fl":
            client_part: nn.Module = model
            self.digests = base_digests(client_part)
        else:
            client_part, side = server_side(cfg, model, self.ds.input_shape)
            self.digests = base_digests(client_part, side.segment)
            self.state = self._state(side, ushaped=cfg.model.ushaped)
        # what trains, and only that, goes to the clients and comes back (a frozen LoRA base stays home)
        self.arrays = ArrayRecord(carried_state(client_part))
        # server.endpoints: the segment copies train on standalone split servers, merged here
        self.remote: RemoteSegments | None = None
        if self.state is not None and cfg.server.endpoints:
            self.remote = RemoteSegments.from_config(
                cfg.server,
                run_id=self.run_id,
                experiment=config_to_json(cfg),
                input_shape=self.ds.input_shape,
                num_classes=self.ds.num_classes,
                base_digest=self.digests.get("server", ""),
            )
        privacy = ServerPrivacy(cfg)
        privacy.validate(client_part)  # a segment DP-SGD cannot train is refused before any round
        self.init_arrays = self.arrays
        self.own: dict[str, ArrayRecord] = {}  # psl: each client's own segment, by :meth:`_owner`
        self.info: dict[int, NodeInfo] = {}
        self.grid: Any = PartitionOrder(grid, self.info)
        self.strategy = make_strategy(cfg)
        self.history: list[dict[str, Any]] = []
        self.base: dict[str, Any] = {}
        self.start_round, self.wall_before = 1, 0.0
        self.hooks = self._hooks(privacy)
        replacing = [h for h in self.hooks if h.replaces_aggregation]
        self._aggregate_clients: Callable[[Round, ArrayRecord], ArrayRecord | None] = (
            replacing[-1].aggregate_train if replacing else self._fedavg
        )
        self._resume()

    def _state(self, side: ServerSide, *, ushaped: bool) -> SplitServerState:
        c = self.cfg
        return SplitServerState(
            side.segment,
            sample_shape=side.sample_shape,
            signature=side.signature,
            task=side.task,
            num_classes=self.ds.num_classes,
            lr=c.train.server_lr,
            momentum=c.train.momentum,
            clip_norm=c.clip_norm,
            weight_decay=c.train.weight_decay,
            device=c.server.device,
            max_batch=c.server.max_batch,
            authority=self.authority,
            model_name=c.model.name,
            cut=c.model.cut,
            mode=c.mode,
            ushaped=ushaped,
            max_message_bytes=c.server.max_message_mb * 1024 * 1024,
            exit_weight=c.model.exit_weight,
            logit_adjust=c.train.logit_adjust,
        )

    def _hooks(self, privacy: ServerPrivacy) -> list[RoundHook]:
        """The round hooks this experiment asks for; the progress marker first, so a phase is announced
        before any hook acts in it, and an injected crash last."""
        hooks: list[RoundHook] = [PhaseMarker(self.run.path), PrivacyReport(privacy)]
        if privacy.secagg:
            hooks.append(SecureAggregation(privacy, self.grid, self.cfg.train.round_timeout_s))
        if self.state is not None:
            recorder = attach_recorder(self.cfg, self.run, self.state, self.ds.input_shape)
            if isinstance(recorder, ObservationRecorder):
                hooks.append(ObservationHook(recorder, self.state, self.run))
        if self.cfg.log.tensorboard:
            hooks.append(TensorBoardLog(self.run.path))
        crash = CrashAfterRound.from_env()
        if crash is not None:
            hooks.append(crash)
        return hooks

    # ------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            self.run.write_config(to_toml(self.cfg))
            return
        check_base(ckpt.extra.get("base_digest"), self.digests, str(self.run.path))
        own: dict[str, dict[str, torch.Tensor]] = {}
        shared: dict[str, torch.Tensor] = {}
        for k, v in ckpt.client.items():
            if k.startswith(("node/", "partition/")):
                kind, ident, key = k.split("/", 2)
                own.setdefault(f"{kind}/{ident}", {})[key] = v
            else:
                shared[k] = v
        self.arrays = ArrayRecord(shared)
        self.own = {n: ArrayRecord(sd) for n, sd in own.items()}
        if self.state is not None:
            self.state.load_state_tensors(ckpt.server)
        self.start_round = ckpt.round + 1
        self.wall_before = float(ckpt.extra.get("wall_s", 0.0))
        for h in self.hooks:
            if h.name:
                h.load_state_dict(ckpt.extra.get(h.name))
        self.history = self.run.read_metrics(ckpt.round)
        self.run.rewrite_metrics(self.history)  # drop rows of a round that did not finish
        log.info("resuming %s after round %d", self.run.path, ckpt.round)

    def _checkpoint(self, rnd: int, t_start: float) -> None:
        client = dict(self.arrays.to_torch_state_dict())
        for owner, rec in self.own.items():
            client.update({f"{owner}/{k}": v for k, v in rec.to_torch_state_dict().items()})
        extra: dict[str, Any] = {"wall_s": self.wall_before + time.perf_counter() - t_start, "run_id": self.run_id}
        if any(self.digests.values()):  # the checkpoint holds adapters only: the base they adapt, by fingerprint
            extra["base_digest"] = self.digests
        extra.update({h.name: h.state_dict() for h in self.hooks if h.name})
        server = self.state.state_tensors() if self.state is not None else {}
        self.run.save_checkpoint(Checkpoint(round=rnd, client=client, server=server, extra=extra))

    # --------------------------------------------------------------- messages
    def _message(self, node: int, arrays: ArrayRecord, conf: dict[str, Any], rnd: int, kind: str) -> Message:
        conf = {**conf, **self.base, "server-round": rnd}
        if self.state is not None:
            conf["dataplane-token"] = self.authority.issue(rnd, str(node))
        if self.remote is not None:
            conf["dataplane-address"] = self.remote.address_for(str(node))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(conf)})
        return Message(content=content, dst_node_id=node, message_type=kind)

    def _query_nodes(self) -> None:
        """Ask every connected client what it holds (samples, partition, declared capability)."""
        nodes = list(self.grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord(dict(self.base))}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in nodes
        ]
        # bounded: a client that cannot say what it holds in 5 minutes is only missing from the plan
        for m in self.grid.send_and_receive(msgs, timeout=min(self.cfg.train.round_timeout_s, 300.0)):
            if m.has_error():
                continue
            met = m.content["metrics"]
            node = m.metadata.src_node_id
            part = int(met["partition-id"]) if "partition-id" in met else None
            self.info[node] = NodeInfo(node, int(met["num-examples"]), float(met["capability"]), part)

    def _seed_sampling(self, rnd: int, purpose: str) -> None:
        # Flower's strategies sample nodes with the `random` module; seeded per round and purpose, round
        # N selects the same clients whether or not the run was resumed before it
        random.seed(f"{self.cfg.seed}/{rnd}/{purpose}")

    def _phase(self, rnd: int, phase: str) -> None:
        for h in self.hooks:
            h.on_phase(rnd, phase)

    def _owner(self, node: int) -> str:
        """Whose own segment (psl) a node trains: its data partition's, which outlives a restart (a node id
        need not: Flower gives simulated nodes new random ids every run)."""
        info = self.info.get(node)
        return f"partition/{info.partition}" if info is not None and info.partition is not None else f"node/{node}"

    def _segment_for(self, node: int, plan: RoundPlan) -> ArrayRecord:
        return self.own.get(self._owner(node), self.init_arrays) if plan.own_segments else self.arrays

    # ------------------------------------------------------------------ round
    def run_round(self, rnd: int, t_start: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        traffic0 = self._traffic()
        r = self.configure_train(rnd)
        self.train(r)
        self.aggregate_train(r)
        t_train = time.perf_counter() - t0
        ev = self.evaluate(r)
        return self.record(r, ev, traffic0, t0, t_train, t_start)

    def configure_train(self, rnd: int) -> Round:
        """Open the round, select its clients (the strategy samples and adds its config) and plan it."""
        self._phase(rnd, "configure")
        cfg, state = self.cfg, self.state
        self.authority.open_round(rnd)
        n_train = sum(i.examples for i in self.info.values()) or int(len(self.ds.y_train) * (1 - cfg.data.val_fraction))
        samples0 = self._traffic_samples()
        self.reporter.round_start(
            rnd,
            cfg.train.rounds,
            int(n_train * cfg.train.fraction_train * cfg.train.local_epochs),
            lambda: self._traffic_samples() - samples0,
        )
        self._seed_sampling(rnd, "train")
        sampled = list(self.strategy.configure_train(rnd, self.arrays, ConfigRecord({}), self.grid))
        conf = dict(sampled[0].content["config"]) if sampled else {}
        selected = [m.metadata.dst_node_id for m in sampled]
        plan = round_plan(self.mode, selected, info=self.info, groups=cfg.hybrid.groups, group_by=cfg.hybrid.group_by)
        if self.remote is not None and state is not None:
            self.remote.open_round(
                rnd, {str(n): r for n, r in plan.replicas.items()}, state.state_tensors(), self.authority
            )
        elif state is not None:
            state.set_lr(cfg.train.server_lr * cfg.train.lr_factor(rnd))
            state.open_replicas({str(n): rid for n, rid in plan.replicas.items()})
        r = Round(rnd, plan, conf, sent=self.arrays)
        for h in self.hooks:
            h.on_configure(r)
        return r

    def train(self, r: Round) -> None:
        """Send every planned client its segment and the round's config; collect the replies in plan order."""
        self._phase(r.number, "train")
        r.replies = self._train_in_turn(r) if r.plan.sequential else self._train_at_once(r)
        if self.remote is not None and self.state is not None:
            r.extra["split_servers"] = self.remote.collect_into(self.state)
        elif self.state is not None:
            self.state.merge_replicas()
        for h in self.hooks:
            h.on_replies(r)
        for m in r.replies:
            if m.has_error():
                log.warning("training failed on node %s: %s", m.metadata.src_node_id, m.error.reason)
        answered = {m.metadata.src_node_id for m in r.replies}
        for n in r.plan.order:
            if n not in answered:  # e.g. its SuperNode died mid-round: nothing of its segment is aggregated
                log.warning(
                    "node %s did not answer round %s within %.0f s", n, r.number, self.cfg.train.round_timeout_s
                )

    def _train_in_turn(self, r: Round) -> list[Message]:
        """One client after another; in ``sl`` each starts from the segment the previous one returned."""
        replies: list[Message] = []
        current = self.arrays
        for n in r.plan.order:
            msg = self._message(n, current if r.plan.handoff else self.arrays, r.conf, r.number, MessageType.TRAIN)
            rep = list(self.grid.send_and_receive([msg], timeout=self.cfg.train.round_timeout_s))
            replies += rep
            if r.plan.handoff and rep and not rep[0].has_error():
                current = rep[0].content["arrays"]
        return replies

    def _train_at_once(self, r: Round) -> list[Message]:
        plan = r.plan
        msgs = [self._message(n, self._segment_for(n, plan), r.conf, r.number, MessageType.TRAIN) for n in plan.order]
        rank = {n: i for i, n in enumerate(plan.order)}
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.train.round_timeout_s)
        # arrival order is a race; aggregating in plan order keeps the sum's rounding the same every run
        return sorted(replies, key=lambda m: rank.get(m.metadata.src_node_id, len(rank)))

    def _fedavg(self, r: Round, current: ArrayRecord) -> ArrayRecord | None:
        new_arrays, _ = self.strategy.aggregate_train(r.number, r.ok)
        out: ArrayRecord | None = new_arrays
        return out

    def aggregate_train(self, r: Round) -> None:
        """What the plan keeps of the returned client segments: their aggregate, the last one, or each its own."""
        self._phase(r.number, "aggregate")
        plan, ok = r.plan, r.ok
        if not ok:
            return
        if plan.aggregate_clients:
            new_arrays = self._aggregate_clients(r, self.arrays)
            if new_arrays is not None:
                self.arrays = new_arrays
        elif plan.handoff:
            self.arrays = ok[-1].content["arrays"]  # type: ignore[assignment]
        elif plan.own_segments:
            for m in ok:
                self.own[self._owner(m.metadata.src_node_id)] = m.content["arrays"]  # type: ignore[assignment]

    def evaluate(self, r: Round) -> Evaluation:
        """Federated evaluation (split inference on each client's own held-out data), then the round's close on
        the data plane, then central evaluation of the joined model on the test set."""
        self._phase(r.number, "evaluate")
        fed_rows, failures, control_down = self._evaluate_federated(r)
        self.authority.close_all()
        if self.remote is not None and self.state is not None:
            self.remote.finish_round(self.state)
        if self.state is not None:
            self.state.end_round()
        accuracy, loss, per_client, exits = self._evaluate_central(r.plan.own_segments)
        return Evaluation(accuracy, loss, per_client, fed_rows, failures, control_down, exits)

    def _evaluate_federated(self, r: Round) -> tuple[list[dict[str, Any]], int, int]:
        if self.cfg.train.fraction_evaluate <= 0:
            return [], 0, 0
        self._seed_sampling(r.number, "evaluate")
        chosen = self.strategy.configure_evaluate(r.number, self.arrays, ConfigRecord({}), self.grid)
        nodes = [m.metadata.dst_node_id for m in chosen]
        if self.remote is not None and self.state is not None:  # the merged segment serves the evaluation
            self.remote.open_evaluation(r.number, [str(n) for n in nodes], self.state.state_tensors(), self.authority)
        msgs = [self._message(n, self._segment_for(n, r.plan), {}, r.number, MessageType.EVALUATE) for n in nodes]
        rank = {n: i for i, n in enumerate(nodes)}
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.train.round_timeout_s)
        rows: list[dict[str, Any]] = []
        failures = 0
        for m in sorted(replies, key=lambda m: rank.get(m.metadata.src_node_id, len(rank))):  # not arrival order
            if m.has_error():
                failures += 1
                log.warning("federated evaluation failed on node %s: %s", m.metadata.src_node_id, m.error.reason)
                continue
            met = m.content["metrics"]
            rows.append(
                {
                    "node_id": m.metadata.src_node_id,
                    "examples": int(met["num-examples"]),
                    "accuracy": float(met["eval_accuracy"]),
                    "loss": float(met["eval_loss"]),
                    # the means above are over targets (a language model's tokens), so they weigh by them
                    "targets": int(met["eval_targets"]) if "eval_targets" in met else int(met["num-examples"]),
                }
            )
        return rows, failures, self.arrays.count_bytes() * len(msgs)

    def _evaluate_central(self, own_segments: bool) -> tuple[float, float, list[float], dict[str, float]]:
        """The joined model on the test set: accuracy, loss, each client's own (``psl``), and the
        accuracy of each exit of a multi-exit model (a mean over the clients' own, like the accuracy)."""
        server_sd = self.state.segment_state_dict() if self.state is not None else {}
        bs = self.cfg.train.eval_batch_size
        if own_segments and self.own:
            evs = []
            for _, rec in sorted(self.own.items()):  # by owner: the same order in a resumed run
                load_carried(self.eval_model, {**rec.to_torch_state_dict(), **server_sd}, "model")
                evs.append(evaluate_model(self.eval_model, self.ds.x_test, self.ds.y_test, bs, self.task))
            exits = {k: statistics.fmean(e.exit_accuracies[k] for e in evs) for k in evs[0].exit_accuracies}
            accs = [e.accuracy for e in evs]
            return statistics.fmean(accs), statistics.fmean(e.loss for e in evs), accs, exits
        load_carried(self.eval_model, {**self.arrays.to_torch_state_dict(), **server_sd}, "model")
        ev = evaluate_model(self.eval_model, self.ds.x_test, self.ds.y_test, bs, self.task)
        return ev.accuracy, ev.loss, [], ev.exit_accuracies

    def record(
        self, r: Round, ev: Evaluation, traffic0: ClientStats, t0: float, t_train: float, t_start: float
    ) -> dict[str, Any]:
        """The round's metrics row (round hooks add theirs), appended to ``metrics.jsonl``, then a checkpoint."""
        self._phase(r.number, "record")
        traffic1 = self._traffic()
        ok = r.ok
        for h in self.hooks:
            h.on_record(r)
        numbers = RoundNumbers(
            rnd=r.number,
            mode=self.cfg.mode,
            accuracy=ev.accuracy,
            loss=ev.loss,
            per_client=ev.per_client,
            exit_accuracies=ev.exit_accuracies,
            fed_rows=ev.fed_rows,
            eval_failures=ev.eval_failures,
            train_metrics=[m.content["metrics"] for m in ok],
            selected=len(r.plan.order),
            answered=len(r.replies),
            sequential=r.plan.sequential,
            replicas=len(r.plan.groups),
            dataplane_up=traffic1.bytes_up - traffic0.bytes_up,
            dataplane_down=traffic1.bytes_down - traffic0.bytes_down,
            control_up=sum(m.content["arrays"].count_bytes() for m in ok),
            control_down=r.sent.count_bytes() * len(r.plan.order) + ev.control_down,
            train_s=t_train,
            seconds=time.perf_counter() - t0,
            extra=r.extra,
            task=self.task,
        )
        row = metrics_row(numbers)
        self.history.append(row)
        self.run.append_metrics(row)
        self._checkpoint(r.number, t_start)
        self.reporter.round_end(row)
        for h in self.hooks:
            h.on_round_end(r.number)
        return row

    def _traffic(self) -> ClientStats:
        """The data plane's traffic over the run, summed over clients: a round's is the difference
        across it (the per-client table holds only the open round's clients)."""
        return self.state.traffic_total() if self.state is not None else ClientStats()

    def _traffic_samples(self) -> int:
        return self._traffic().samples

    # -------------------------------------------------------------------- run
    def _start_dataplane(self, tls: dict[str, Any]) -> SplitServer | None:
        """The split server on the configured address (a port the OS picks by default), batching if asked."""
        if self.state is None:
            return None
        sc = self.cfg.server
        batcher = None
        if sc.batching:  # concurrent Train requests share one forward/backward
            from server.batching import RequestBatcher

            batcher = RequestBatcher(
                self.state,
                max_requests=sc.max_batch_requests,
                max_wait_ms=sc.max_batch_wait_ms,
                pad_lengths=sc.pad_lengths,
            )
        return SplitServer(self.state, sc.address, batcher=batcher, **tls).start()

    def run_all(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        tls, tls_conf = dataplane_tls(self.cfg.server)  # tls_conf: the CA PEM the clients need, in every message
        server = self._start_dataplane(tls) if self.remote is None else None
        if self.remote is not None:
            tls_conf = {**tls_conf, **self.remote.client_conf()}
        self.base = {
            "experiment": config_to_json(self.cfg),
            "run-id": self.run_id,
            "dataplane-address": advertised_address(self.cfg.server, server.address) if server is not None else "",
            # the client's frozen base (LoRA), which it builds itself: a node whose base differs refuses
            "base-digest": self.digests["client"],
            **tls_conf,
        }
        for h in self.hooks:
            h.on_start(self.base)
        try:
            self._query_nodes()
            for rnd in range(self.start_round, self.cfg.train.rounds + 1):
                self.run_round(rnd, t_start)
        finally:
            if server is not None:
                server.stop()
            if self.remote is not None:
                self.remote.close()
        device = str(self.state.torch_device) if self.state is not None else "cpu"
        wall_s = self.wall_before + time.perf_counter() - t_start
        result = summarize_run(self.cfg, self.history, device, wall_s, self.run)
        # this process's peak: the ServerApp, and in simulation the engine and the split server with it
        result["serverapp_peak_rss_mb"] = peak_rss_mb()
        if self.state is not None:  # per-client tables after the last round's end: all empty
            result["split_server_held_clients"] = self.state.held_clients()
        for h in self.hooks:
            h.on_summary(result)
        self.run.write_summary(result)
        self.run.plot(self.history, run_title(self.cfg))
        return result
