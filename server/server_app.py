"""The Flower ServerApp: owns the round loop of every split-learning architecture.

Per round it selects clients (a Flower strategy's ``configure_train``), turns the
mode into a :class:`server.plan.RoundPlan`, opens the round on the data plane (a
fresh credential per selected client, server-segment replicas where the mode
has them), sends each client its client segment and the round's config — all
at once or one after another — aggregates what comes back (the strategy's
``aggregate_train``; server replicas FedAvg'd by the split server), asks
clients for federated evaluation by split inference, evaluates the joined
model on the held-out test set, and writes metrics and a checkpoint of both
segments. The split server runs in this process on a port the OS picks. A run
directory with checkpoints resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as fl_strategy
from torch import nn

from fsl.auth import RoundAuthority
from fsl.config import ExperimentConfig, load_experiment, to_toml
from fsl.endpoint import advertised_address, dataplane_tls
from fsl.experiment import build_model_for, config_to_json, experiment_dataset
from fsl.models import cut_shape, split_model, split_model_u
from fsl.privacy.server import ServerPrivacy  # privacy: issue 5
from fsl.rundir import Checkpoint, RunDir
from fsl.training import evaluate_model
from server.plan import NodeInfo, RoundPlan, round_plan
from server.recorder import NullRecorder, attach_recorder, recorder_config, updates_from_replies  # attacks: issue 6
from server.split_server import SplitServer, SplitServerState

__all__ = ["Reporter", "app", "make_server_app", "make_strategy", "run_rounds"]

log = logging.getLogger("fsl.server")


class Reporter(Protocol):
    """Receives progress of a run (the CLI shows it; the default logs it)."""

    def round_start(self, rnd: int, rounds: int, expected_samples: int, done: Callable[[], int]) -> None: ...

    def round_end(self, row: dict[str, Any]) -> None: ...


class LogReporter:
    def round_start(self, rnd: int, rounds: int, expected_samples: int, done: Callable[[], int]) -> None:
        log.info("round %d/%d: training on ~%d samples", rnd, rounds, expected_samples)

    def round_end(self, row: dict[str, Any]) -> None:
        log.info(
            "round %d: accuracy %.4f loss %.4f (%.1fs)", row["round"], row["accuracy"], row["loss"], row["seconds"]
        )


def make_strategy(cfg: ExperimentConfig) -> Any:
    """The Flower strategy named by ``cfg.train.strategy``, sampling as configured, wrapped in Flower's
    server-side fixed-clipping central-DP strategy when ``privacy.central_dp_clip`` is set."""
    base = _base_strategy(cfg)
    p = cfg.privacy
    if not p.central_dp:
        return base
    sampled = max(1, min(cfg.train.min_clients, cfg.clients), int(cfg.clients * cfg.train.fraction_train))
    return fl_strategy.DifferentialPrivacyServerSideFixedClipping(
        base, noise_multiplier=p.central_dp_noise, clipping_norm=p.central_dp_clip, num_sampled_clients=sampled
    )


def _base_strategy(cfg: ExperimentConfig) -> fl_strategy.FedAvg:
    n = cfg.clients
    common: dict[str, Any] = {
        "fraction_train": cfg.train.fraction_train,
        "fraction_evaluate": cfg.train.fraction_evaluate,
        "min_train_nodes": max(1, min(cfg.train.min_clients, n)),
        "min_evaluate_nodes": 1 if cfg.train.fraction_evaluate > 0 else 0,
        "min_available_nodes": max(1, min(cfg.train.min_clients, n)),
    }
    name = cfg.train.strategy
    if name == "fedavg":
        return fl_strategy.FedAvg(**common)
    if name == "fedavgm":
        return fl_strategy.FedAvgM(**common, server_momentum=0.9)
    if name == "fedprox":
        return fl_strategy.FedProx(**common, proximal_mu=cfg.train.proximal_mu)
    if name == "fedadam":
        return fl_strategy.FedAdam(**common)
    if name == "fedyogi":
        return fl_strategy.FedYogi(**common)
    if name == "fedadagrad":
        return fl_strategy.FedAdagrad(**common)
    if name == "fedmedian":
        return fl_strategy.FedMedian(**common)
    if name == "fedtrimmedavg":
        return fl_strategy.FedTrimmedAvg(**common)
    raise ValueError(f"unknown strategy {name!r}")  # the config validator makes this unreachable


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


class RoundRunner:
    """Runs (or resumes) one experiment on a Flower grid."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunDir, reporter: Reporter | None = None) -> None:
        self.grid, self.cfg, self.run = grid, cfg, run
        self.reporter = reporter or LogReporter()
        self.mode = cfg.architecture
        random.seed(cfg.seed)  # Flower's node sampling draws from `random`
        if cfg.server.threads:
            torch.set_num_threads(cfg.server.threads)
        self.ds = experiment_dataset(cfg)
        model = build_model_for(cfg, self.ds.input_shape, self.ds.num_classes)
        self.eval_model: nn.Module = copy.deepcopy(model)  # CPU copy for central evaluation
        self.run_id = run.path.name
        self.authority = RoundAuthority(self.run_id)
        self.state: SplitServerState | None = None
        if self.mode == "fl":
            client_part: nn.Module = model
        elif cfg.model.ushaped:
            u = split_model_u(model, cfg.model.cut, cfg.model.top_cut)
            client_part = u.client_modules
            self.state = self._state(u.middle, cut_shape(u.bottom, self.ds.input_shape), ushaped=True)
        else:
            s = split_model(model, cfg.model.cut)
            client_part = s.client
            self.state = self._state(s.server, cut_shape(s.client, self.ds.input_shape), ushaped=False)
        self.arrays = ArrayRecord(client_part.state_dict())
        self.privacy = ServerPrivacy(cfg)  # privacy: validation, DP accounting, results (issue 5)
        self.privacy.validate(client_part)
        self.init_arrays = self.arrays
        self.own: dict[int, ArrayRecord] = {}  # psl: each client's own segment
        self.info: dict[int, NodeInfo] = {}
        self.strategy = make_strategy(cfg)
        self.history: list[dict[str, Any]] = []
        self.start_round, self.wall_before = 1, 0.0
        self._resume()
        # attacks: the opt-in observation recorder (record.enabled); a no-op NullRecorder otherwise
        self.recorder = attach_recorder(cfg, run, self.state, self.ds.input_shape) if self.state else NullRecorder()

    def _state(self, segment: nn.Module, sample_shape: tuple[int, ...], *, ushaped: bool) -> SplitServerState:
        c = self.cfg
        return SplitServerState(
            segment,
            sample_shape=sample_shape,
            num_classes=self.ds.num_classes,
            lr=c.train.server_lr,
            momentum=c.train.momentum,
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
        )

    # ------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            self.run.write_config(to_toml(self.cfg))
            return
        own: dict[int, dict[str, torch.Tensor]] = {}
        shared: dict[str, torch.Tensor] = {}
        for k, v in ckpt.client.items():
            if k.startswith("node/"):
                _, node, key = k.split("/", 2)
                own.setdefault(int(node), {})[key] = v
            else:
                shared[k] = v
        self.arrays = ArrayRecord(shared)
        self.own = {n: ArrayRecord(sd) for n, sd in own.items()}
        if self.state is not None:
            self.state.load_state_tensors(ckpt.server)
        self.start_round = ckpt.round + 1
        self.wall_before = float(ckpt.extra.get("wall_s", 0.0))
        self.privacy.load(ckpt.extra.get("privacy"))  # privacy: the accountant state survives a restart
        self.history = self.run.read_metrics(ckpt.round)
        self.run.rewrite_metrics(self.history)  # drop rows of a round that did not finish
        log.info("resuming %s after round %d", self.run.path, ckpt.round)

    def _checkpoint(self, rnd: int, t_start: float) -> None:
        client = dict(self.arrays.to_torch_state_dict())
        for node, rec in self.own.items():
            client.update({f"node/{node}/{k}": v for k, v in rec.to_torch_state_dict().items()})
        self.run.save_checkpoint(
            Checkpoint(
                round=rnd,
                client=client,
                server=self.state.state_tensors() if self.state is not None else {},
                extra={
                    "wall_s": self.wall_before + time.perf_counter() - t_start,
                    "run_id": self.run_id,
                    "privacy": self.privacy.state(),  # privacy: accountant state (issue 5)
                },
            )
        )

    # --------------------------------------------------------------- messages
    def _message(self, node: int, arrays: ArrayRecord, conf: dict[str, Any], rnd: int, kind: str) -> Message:
        conf = {**conf, **self.base, "server-round": rnd}
        if self.state is not None:
            conf["dataplane-token"] = self.authority.issue(rnd, str(node))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(conf)})
        return Message(content=content, dst_node_id=node, message_type=kind)

    def _query_nodes(self) -> None:
        """Ask every connected client what it holds (samples, declared capability)."""
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
            self.info[node] = NodeInfo(node, int(met["num-examples"]), float(met["capability"]))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ round
    def _train(self, rnd: int, plan: RoundPlan, conf: dict[str, Any]) -> list[Message]:
        timeout = self.cfg.train.round_timeout_s
        kind = MessageType.TRAIN
        if not plan.sequential:
            msgs = [
                self._message(
                    n, self.own.get(n, self.init_arrays) if plan.own_segments else self.arrays, conf, rnd, kind
                )
                for n in plan.order
            ]
            return list(self.grid.send_and_receive(msgs, timeout=timeout))
        replies: list[Message] = []
        current = self.arrays
        for n in plan.order:  # one client after another
            rep = list(
                self.grid.send_and_receive(
                    [self._message(n, current if plan.handoff else self.arrays, conf, rnd, kind)], timeout=timeout
                )
            )
            replies += rep
            if plan.handoff and rep and not rep[0].has_error():
                current = rep[0].content["arrays"]  # type: ignore[assignment]
        return replies

    def _central_eval(self, plan_own: bool) -> tuple[float, float, list[float]]:
        server_sd = self.state.segment_state_dict() if self.state is not None else {}
        cfg = self.cfg
        if plan_own and self.own:
            accs, losses = [], []
            for rec in self.own.values():
                self.eval_model.load_state_dict({**rec.to_torch_state_dict(), **server_sd})
                ev = evaluate_model(self.eval_model, self.ds.x_test, self.ds.y_test, cfg.train.eval_batch_size)
                accs.append(ev.accuracy)
                losses.append(ev.loss)
            return statistics.fmean(accs), statistics.fmean(losses), accs
        self.eval_model.load_state_dict({**self.arrays.to_torch_state_dict(), **server_sd})
        ev = evaluate_model(self.eval_model, self.ds.x_test, self.ds.y_test, cfg.train.eval_batch_size)
        return ev.accuracy, ev.loss, []

    def run_round(self, rnd: int, t_start: float) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        self.authority.open_round(rnd)
        traffic0 = state.traffic() if state is not None else {}
        samples0 = sum(s.samples for s in traffic0.values())
        n_train = sum(i.examples for i in self.info.values()) or int(len(self.ds.y_train) * (1 - cfg.data.val_fraction))
        self.reporter.round_start(
            rnd,
            cfg.train.rounds,
            int(n_train * cfg.train.fraction_train * cfg.train.local_epochs),
            (lambda s0=samples0: sum(s.samples for s in state.traffic().values()) - s0)
            if state is not None
            else (lambda: 0),
        )
        # ---- selection (the strategy samples and adds its config), then the mode's plan
        sampled = list(self.strategy.configure_train(rnd, self.arrays, ConfigRecord({}), self.grid))
        conf = dict(sampled[0].content["config"]) if sampled else {}
        plan = round_plan(
            self.mode,
            [m.metadata.dst_node_id for m in sampled],
            info=self.info,
            groups=cfg.hybrid.groups,
            group_by=cfg.hybrid.group_by,
        )
        if state is not None:
            state.open_replicas({str(n): rid for n, rid in plan.replicas.items()})
        keys = self.privacy.secagg_setup(self.grid, rnd, plan.order, self.base, cfg.train.round_timeout_s)  # privacy
        conf.update(keys)  # privacy: every participant's public key for pairwise masks (issue 5)
        replies = self._train(rnd, plan, conf)
        if state is not None:
            state.merge_replicas()
        ok = [m for m in replies if not m.has_error()]
        if self.recorder.wants(rnd) and state is not None:  # attacks: the segment sent, the server's, the returned
            sent, held = self.arrays.to_torch_state_dict(), state.segment_state_dict()
            self.recorder.end_round(rnd, sent, held, updates_from_replies(ok))
        for m in replies:
            if m.has_error():
                log.warning("training failed on node %s: %s", m.metadata.src_node_id, m.error.reason)
        answered = {m.metadata.src_node_id for m in replies}
        for n in plan.order:
            if n not in answered:  # e.g. its SuperNode died mid-round: nothing of its segment is aggregated
                log.warning("node %s did not answer round %s within %.0f s", n, rnd, cfg.train.round_timeout_s)
        # ---- aggregation
        control_down = self.arrays.count_bytes() * len(plan.order)
        if plan.aggregate_clients and ok:
            if self.privacy.secagg:  # privacy: only the masked sum is ever seen (issue 5)
                new_arrays = self.privacy.secagg_aggregate(rnd, ok, self.arrays)
            else:
                new_arrays, _ = self.strategy.aggregate_train(rnd, ok)
            if new_arrays is not None:
                self.arrays = new_arrays
        elif plan.handoff and ok:
            self.arrays = ok[-1].content["arrays"]  # type: ignore[assignment]
        elif plan.own_segments:
            for m in ok:
                self.own[m.metadata.src_node_id] = m.content["arrays"]  # type: ignore[assignment]
        t_train = time.perf_counter() - t0
        # ---- federated evaluation: split inference on each client's own held-out data
        fed_rows: list[dict[str, Any]] = []
        eval_failures = 0
        if cfg.train.fraction_evaluate > 0:
            emsgs = list(self.strategy.configure_evaluate(rnd, self.arrays, ConfigRecord({}), self.grid))
            emsgs = [
                self._message(
                    m.metadata.dst_node_id,
                    self.own.get(m.metadata.dst_node_id, self.init_arrays) if plan.own_segments else self.arrays,
                    {},
                    rnd,
                    MessageType.EVALUATE,
                )
                for m in emsgs
            ]
            control_down += self.arrays.count_bytes() * len(emsgs)
            for m in self.grid.send_and_receive(emsgs, timeout=cfg.train.round_timeout_s):
                if m.has_error():
                    eval_failures += 1
                    log.warning("federated evaluation failed on node %s: %s", m.metadata.src_node_id, m.error.reason)
                    continue
                met = m.content["metrics"]
                fed_rows.append(
                    {
                        "node_id": m.metadata.src_node_id,
                        "examples": int(met["num-examples"]),  # type: ignore[arg-type]
                        "accuracy": float(met["eval_accuracy"]),  # type: ignore[arg-type]
                        "loss": float(met["eval_loss"]),  # type: ignore[arg-type]
                    }
                )
        self.authority.close_all()
        if state is not None:
            state.end_round()
        # ---- central evaluation of the joined model on the test set
        accuracy, loss, per_client = self._central_eval(plan.own_segments)
        # ---- the round's numbers
        traffic1 = state.traffic() if state is not None else {}
        dp_up = sum(s.bytes_up for s in traffic1.values()) - sum(s.bytes_up for s in traffic0.values())
        dp_down = sum(s.bytes_down for s in traffic1.values()) - sum(s.bytes_down for s in traffic0.values())
        control_up = sum(m.content["arrays"].count_bytes() for m in ok)  # type: ignore[union-attr]
        mets = [m.content["metrics"] for m in ok]
        examples = sum(int(x["num-examples"]) for x in mets)  # type: ignore[arg-type]
        fed_n = sum(r["examples"] for r in fed_rows)
        row: dict[str, Any] = {
            "round": rnd,
            "mode": cfg.mode,
            "accuracy": accuracy,
            "loss": loss,
            "client_accuracies": per_client,
            "client_accuracy_std": statistics.pstdev(per_client) if len(per_client) > 1 else None,
            "fed_accuracy": sum(r["accuracy"] * r["examples"] for r in fed_rows) / fed_n if fed_n else None,
            "fed_loss": sum(r["loss"] * r["examples"] for r in fed_rows) / fed_n if fed_n else None,
            "fed_clients": fed_rows,
            "train_loss": sum(float(x["train_loss"]) * int(x["num-examples"]) for x in mets) / examples
            if examples
            else None,  # type: ignore[arg-type]
            "train_accuracy": sum(float(x["train_accuracy"]) * int(x["num-examples"]) for x in mets) / examples
            if examples
            else None,  # type: ignore[arg-type]
            "clients": len(ok),
            "failures": len(plan.order) - len(ok),  # error replies and clients that never answered (timeout)
            "timeouts": len(plan.order) - len(replies),
            "eval_failures": eval_failures,
            "examples": examples,
            "sequential": plan.sequential,
            "replicas": len(plan.groups),
            "max_concurrent_clients": max_overlap([(float(x["started_at"]), float(x["finished_at"])) for x in mets]),  # type: ignore[arg-type]
            "bytes_up": dp_up + control_up,
            "bytes_down": dp_down + control_down,
            "dataplane_bytes_up": dp_up,
            "dataplane_bytes_down": dp_down,
            "control_bytes_up": control_up,
            "control_bytes_down": control_down,
            "client_compute_s": sum(float(x["compute_s"]) for x in mets),  # type: ignore[arg-type]
            "client_peak_rss_mb": max((float(x["peak_rss_mb"]) for x in mets if "peak_rss_mb" in x), default=None),  # type: ignore[arg-type]  # deploy
            "train_s": t_train,
            "seconds": time.perf_counter() - t0,
        }
        row.update(self.privacy.round_row(ok))  # privacy: per-client epsilon this round (issue 5)
        self.history.append(row)
        self.run.append_metrics(row)
        self._checkpoint(rnd, t_start)
        self.reporter.round_end(row)
        return row

    def run_all(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        sc = self.cfg.server  # issue 8: optional batching of concurrent Train requests
        batcher = None
        if self.state is not None and sc.batching:
            from server.batching import RequestBatcher

            batcher = RequestBatcher(self.state, max_requests=sc.max_batch_requests, max_wait_ms=sc.max_batch_wait_ms)
        tls, tls_conf = dataplane_tls(sc)  # deploy: data-plane TLS (server.tls_*), CA PEM for the clients
        server = SplitServer(self.state, sc.address, batcher=batcher, **tls).start() if self.state is not None else None
        self.base = {
            "experiment": config_to_json(self.cfg),
            "run-id": self.run_id,
            "dataplane-address": advertised_address(sc, server.address) if server is not None else "",  # deploy
            **tls_conf,  # deploy
        }
        self.base.update(recorder_config(self.recorder, self.run))  # attacks: data owners write ground truth
        try:
            self._query_nodes()
            for rnd in range(self.start_round, self.cfg.train.rounds + 1):
                self.run_round(rnd, t_start)
        finally:
            if server is not None:
                server.stop()
        device = str(self.state.torch_device) if self.state is not None else "cpu"
        result = summarize(self.cfg, self.history, device, self.wall_before + time.perf_counter() - t_start, self.run)
        result.update(self.privacy.summary())  # privacy: the `privacy` object (issue 5)
        self.run.write_summary(result)
        self.run.plot(self.history, _title(self.cfg))
        return result


def _title(cfg: ExperimentConfig) -> str:
    split = "full model" if cfg.mode in ("fl", "central") else f"{cfg.model.name} cut at {cfg.model.cut}"
    if cfg.model.ushaped:
        split += f" and {cfg.model.top_cut} (U-shaped)"
    return f"{cfg.name}: {cfg.mode}, {split}, {cfg.clients} clients"


def summarize(
    cfg: ExperimentConfig, history: list[dict[str, Any]], device: str, wall_s: float, run: RunDir
) -> dict[str, Any]:
    """``summary.json`` of a run from its per-round rows."""
    accs = [h["accuracy"] for h in history]
    rounds_clients = sum(h["clients"] for h in history) or 1
    return {
        "experiment": cfg.name,
        "dataset": cfg.data.name,
        "mode": cfg.mode,
        "model": cfg.model.name,
        "cut": cfg.model.cut if cfg.mode not in ("fl", "central") else None,
        "ushaped": cfg.model.ushaped,
        "clients": cfg.clients,
        "rounds": len(history),
        "device": device,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": history[-1]["loss"] if history else None,
        "wall_s": wall_s,
        "wall_s_per_round": statistics.fmean(h["seconds"] for h in history) if history else None,
        "bytes_up": sum(h["bytes_up"] for h in history),
        "bytes_down": sum(h["bytes_down"] for h in history),
        "bytes_up_per_client_round": sum(h["bytes_up"] for h in history) / rounds_clients,
        "bytes_down_per_client_round": sum(h["bytes_down"] for h in history) / rounds_clients,
        "run_dir": str(run.path),
        "history": [
            {
                k: h.get(k)
                for k in (
                    "round",
                    "accuracy",
                    "loss",
                    "fed_accuracy",
                    "train_loss",
                    "bytes_up",
                    "bytes_down",
                    "seconds",
                )
            }
            for h in history
        ],
    }


def run_rounds(grid: Grid, cfg: ExperimentConfig, run: RunDir, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run (or resume) experiment ``cfg`` on ``grid``; returns the summary."""
    return RoundRunner(grid, cfg, run, reporter).run_all()


class RunStopped(RuntimeError):
    """The engine under the ServerApp went away (e.g. Ray failed to start): stop waiting for replies."""


class StoppableGrid:
    """A Flower grid whose ``send_and_receive`` gives up as soon as ``stop`` is set.

    Flower's simulation engine does not stop the ServerApp thread when the engine itself
    fails; without this, a ServerApp waiting for replies that can never come keeps the
    process alive until its round timeout.
    """

    # perf (issue 8): a round's replies are looked for every 10 ms; at 100 ms the ServerApp slept
    # 50 ms past the last reply on average, 3-4% of a quickstart round (the LinkState query is
    # an in-memory lookup; Flower's own engine still picks up new messages every 100 ms)
    def __init__(self, grid: Grid, stop: threading.Event, poll_s: float = 0.01) -> None:
        self._grid, self._stop, self._poll_s = grid, stop, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while pending:
            if self._stop.is_set():
                raise RunStopped("the simulation engine stopped while the ServerApp waited for replies")
            got = list(self._grid.pull_messages(pending))
            out += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            self._stop.wait(self._poll_s)
        return out


def make_server_app(cfg: ExperimentConfig, run: RunDir, reporter: Reporter | None = None) -> ServerApp:
    """A ServerApp bound to a config and run directory (what `fsl run` uses).

    ``app.stop`` (an event) makes the round loop give up waiting for replies; ``app.result``
    holds the summary once the run finished.
    """
    sapp = ServerApp()
    out: dict[str, Any] = {}
    stop = threading.Event()

    @sapp.main()
    def _main(grid: Grid, context: Context) -> None:
        out["summary"] = run_rounds(StoppableGrid(grid, stop), cfg, run, reporter)  # type: ignore[arg-type]

    sapp.result = out  # type: ignore[attr-defined]
    sapp.stop = stop  # type: ignore[attr-defined]
    return sapp


# ------------------------------------------------------------------ `flwr run .`
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's engines: the experiment comes from the run config."""
    rc = context.run_config
    resume = str(rc.get("resume", ""))
    overrides = str(rc.get("overrides", "")).split()
    if resume:
        run = RunDir(resume)
        cfg = load_experiment(str(run.config_path), overrides)
    else:
        cfg = load_experiment(str(rc.get("experiment", "quickstart")), overrides)
        run = RunDir.create(cfg.output_dir, cfg.name)
    log.warning("run directory: %s", run.path.resolve())
    run_rounds(grid, cfg, run)
