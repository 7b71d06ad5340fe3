"""Typed, validated experiment configuration.

An experiment is a TOML file in ``experiments/`` whose tables map onto the
frozen dataclasses below; every key has a default, every value is checked when
the config is built, and a typo is an error that names the closest key. On the
command line ``section.key=value`` overrides a value (``train.rounds=3``); the
value is read as TOML (``3``, ``0.1``, ``true``, ``"text"``) and bare words as
strings. Flower's ``[tool.flwr.app.config]`` uses the same flat keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fsl.data import PARTITIONS, check_dataset_name
from fsl.models import model_spec
from fsl.privacy.config import PrivacyConfig, check_privacy

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ServerConfig",
    "SimulationConfig",
    "HybridConfig",
    "LogConfig",
    "LoraConfig",
    "TrainConfig",
    "experiment_path",
    "from_dict",
    "load_experiment",
    "to_dict",
    "to_toml",
]

# Split-learning architectures and baselines (see README: "Architectures").
MODES = ("fsl", "sl", "sflv1", "sflv2", "psl", "hybrid", "ushaped", "fl", "central")
SPLIT_MODES = ("fsl", "sl", "sflv1", "sflv2", "psl", "hybrid")  # modes that run a split server
# modes whose one server segment is handed from one client's labels to the next: clients train in
# turn (sl, sflv2), or in parallel each with its own client segment against one server segment
# (psl), whose batches on a host with fewer cores than clients arrive client by client
AUTO_CLIP_MODES = ("sl", "sflv2", "psl")
AUTO_CLIP_NORM = 1.0  # train.clip_norm's automatic bound in AUTO_CLIP_MODES
PARALLEL_MODES = ("fsl", "sflv1", "psl", "hybrid")
GROUP_RULES = ("count", "data", "capability")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
LR_SCHEDULES = ("constant", "cosine", "linear")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg")


class ConfigError(ValueError):
    """An experiment configuration that cannot be run; the text says which key and why."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    # one of fsl.data.DATASETS, or an import string "package.module:loader" naming a function that
    # returns an fsl.data.Dataset (importable wherever a role runs: driver, simulation workers, SuperNodes)
    name: str = "mnist5k"
    path: str = ""  # folder to read files from ("" = the dataset's default place)
    # keyword arguments of the loader ([data.options]: fortunes' topics, max_length, ...)
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    # "iid" | "dirichlet" (label skew, set by alpha) | "shards" (two label-sorted shards per client:
    # at most two classes each)
    partition: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration; smaller = more skew
    val_fraction: float = 0.1  # share of each client's data kept for federated evaluation
    train_limit: int = 0  # use only this many training samples (stratified; 0 = all)
    test_limit: int = 0  # evaluate on only this many test samples (stratified; 0 = all)

    def __post_init__(self) -> None:
        try:
            check_dataset_name(self.name)
        except ValueError as e:  # an unknown name, or an import string that does not resolve
            raise ConfigError(f"data.name: {e}") from None
        _check(
            self.partition in PARTITIONS,
            f"data.partition must be one of {list(PARTITIONS)}, not {self.partition!r}",
        )
        _check(self.alpha > 0, f"data.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.val_fraction < 1, f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        _check(self.train_limit >= 0 and self.test_limit >= 0, "data.train_limit and data.test_limit must be >= 0")


LORA_SEGMENTS = ("client", "server", "both")


def _names(value: Any) -> tuple[str, ...]:
    """A TOML array of names, or one comma-separated string (Flower's run config has no arrays)."""
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(str(p).strip() for p in parts if str(p).strip())


@dataclass(frozen=True)
class LoraConfig:  # [model.lora]: low-rank adapters (peft) instead of training the weights (fsl/lora.py)
    r: int = 0  # rank of each adapter; 0: no LoRA, every parameter trains
    alpha: float = 16.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    # modules that get adapters: names matched as a module path or its last parts ("query" matches
    # every "...attention.self.query"), or "all-linear"; empty: peft's default for the model type
    # (BERT: query and value)
    targets: tuple[str, ...] = ()
    # where the adapters go: "both" segments, or only the "client"'s or the "server"'s, the other
    # segment then training all its weights (the split is the model's cut)
    segments: str = "both"
    # modules whose own weights train in full beside the adapters (peft's modules_to_save): the task
    # head, freshly initialised, cannot be left frozen
    trainable: tuple[str, ...] = ("classifier",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _names(self.targets))
        object.__setattr__(self, "trainable", _names(self.trainable))
        _check(self.r >= 0, f"model.lora.r must be >= 0, got {self.r}")
        _check(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"model.lora.dropout must lie in [0, 1), got {self.dropout}")
        _check(
            self.segments in LORA_SEGMENTS,
            f"model.lora.segments must be one of {list(LORA_SEGMENTS)}, not {self.segments!r}",
        )

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(frozen=True)
class ModelConfig:
    # one of fsl.models.MODELS, or an import string "package.module:factory" naming a callable that
    # returns an nn.Module (importable wherever a role runs: driver, simulation workers, SuperNodes)
    name: str = "cnn"
    # where the model is split ("" = the model's default cut): a block name of a sequential zoo model
    # (cnn, resnet), a module path (bert.encoder.layer.2) of any other model, checked by the splitter
    cut: str = ""
    norm: str = ""  # normalisation layers ("" = the model's default)
    ushaped: bool = False  # label-private U-shape: the client also keeps the blocks after top_cut
    top_cut: str = ""  # U-shaped only: last block on the server ("" = the deepest cut point)
    exits: bool = False  # an exit classifier after every cut point, trained jointly (fsl.exits)
    exit_weight: float = 0.5  # weight of each exit's cross entropy next to the final loss
    # keyword arguments of the model's builder ([model.options]: sizes, dropout, ...)
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    lora: LoraConfig = field(default_factory=LoraConfig)  # [model.lora]: train adapters, not the weights

    def __post_init__(self) -> None:
        try:
            spec = model_spec(self.name)
        except ValueError as e:  # an unknown zoo name, or an import string that does not resolve
            raise ConfigError(f"model.name: {e}") from None
        if not self.cut:
            object.__setattr__(self, "cut", spec.default_cut)
        if not self.norm:
            object.__setattr__(self, "norm", spec.default_norm)
        if not self.top_cut and spec.cuts:
            object.__setattr__(self, "top_cut", spec.cuts[-1])
        _check(self.exit_weight >= 0, f"model.exit_weight must be >= 0, not {self.exit_weight}")
        if spec.graph:  # module paths: the graph splitter checks them against the traced model
            _check(
                not self.norm or bool(spec.default_norm),
                f"model.norm: {self.name} has no norm choice; leave it empty, not {self.norm!r}",
            )
            _check(
                not self.exits or spec.task == "classify",
                f"model.exits: exit classifiers need a classification model; {self.name} is a {spec.task} model",
            )
            _check(
                not (self.ushaped and self.cut and self.cut == self.top_cut),
                f"model.top_cut ({self.top_cut!r}) must be deeper than model.cut ({self.cut!r}) in a U-shaped split",
            )
            return
        _check(self.cut in spec.cuts, f"model.cut: {self.name} can be cut at {list(spec.cuts)}, not {self.cut!r}")
        _check(
            self.top_cut in spec.cuts,
            f"model.top_cut: {self.name} can be cut at {list(spec.cuts)}, not {self.top_cut!r}",
        )
        if self.ushaped:
            _check(
                spec.cuts.index(self.top_cut) > spec.cuts.index(self.cut),
                f"model.top_cut ({self.top_cut!r}) must be deeper than model.cut ({self.cut!r}) in a U-shaped split",
            )


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 5
    local_epochs: int = 1  # passes over its local data per client per round
    batch_size: int = 32
    lr: float = 0.05  # client segment SGD learning rate
    server_lr: float = 0.05  # server segment SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 0.0
    fraction_train: float = 1.0  # share of the clients selected per round
    fraction_evaluate: float = 1.0  # share of the clients asked for federated evaluation
    min_clients: int = 1  # fewest clients a round may run with
    strategy: str = "fedavg"  # Flower strategy that aggregates the client segments
    proximal_mu: float = 0.01  # FedProx only: weight of the proximal term
    wire_dtype: str = "float32"  # dtype of activations and gradients on the data plane
    round_timeout_s: float = 1800.0  # a client that has not replied by then is dropped from the round
    eval_batch_size: int = 512
    # token inputs: each epoch's batches are drawn from pools of this many batches whose texts are
    # sorted by length (a batch then holds texts of about one length and is trimmed to its longest,
    # so the data plane's bytes and the server's compute follow the real lengths); the order of the
    # batches stays random. 0: off, every batch a uniform sample (trimmed to its longest text)
    length_buckets: int = 0
    # split modes: the loss is the cross entropy of logits + log(the client's label prior) (logit
    # adjustment, balanced softmax): the split server counts each client's labels in the round, a
    # U-shaped client its own. A client holding one or two classes then no longer drags the one
    # shared server segment towards predicting only its classes; inference uses the raw logits.
    # With IID data the prior is about uniform and the loss is plain cross entropy.
    logit_adjust: bool = True
    # the largest joint L2 norm of one SGD step's gradient, on the split server (the server segment)
    # and on the client (its segment), in the split modes: a larger gradient is scaled down to it.
    # Negative (the default): automatic, AUTO_CLIP_NORM (1.0) in sl, sflv2 and psl (AUTO_CLIP_MODES)
    # and off in the others; 0: off everywhere; positive: that bound in every split mode.
    # Clients trained in turn on one or two classes each (two-class shards) hand the server segment
    # from one label set to another: the first batches of the next client give a gradient 10 to 200
    # times the median step, and with momentum 0.9 those steps kill most of the server's ReLUs; the
    # model then outputs a constant and ends at chance. Bounded, those steps cannot. psl does the
    # same: its clients run in parallel, but a simulation with fewer cores than clients serves them
    # a few at a time (seed 1 on shards ended at 0.100 unclipped, 0.577 clipped). fsl, sflv1,
    # hybrid and ushaped held 0.65-0.76 on shards unbounded (experiments/results/skew), so they
    # are left alone.
    clip_norm: float = -1.0
    # how both learning rates (client and split server) change over the rounds: "constant", or from
    # the full rate in round 1 towards 0 after the last round along half a cosine ("cosine") or a
    # line ("linear"). Per round, the unit every client and the split server share (a client learns
    # its round from Flower); the central baseline reads a round as its local_epochs and follows the
    # same schedule. A decaying rate lets the shared server segment settle on the features of the
    # averaged client segment instead of chasing the last client's until the run stops.
    lr_schedule: str = "constant"

    def lr_factor(self, rnd: int) -> float:
        """The multiplier of ``lr`` and ``server_lr`` in round ``rnd`` (1-based) under ``lr_schedule``."""
        done = min(max(rnd - 1, 0), self.rounds) / self.rounds  # the share of the run behind this round
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * done))
        if self.lr_schedule == "linear":
            return 1.0 - done
        return 1.0

    def __post_init__(self) -> None:
        _check(
            self.lr_schedule in LR_SCHEDULES,
            f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, not {self.lr_schedule!r}",
        )
        for k in ("rounds", "local_epochs", "batch_size", "min_clients", "eval_batch_size"):
            _check(getattr(self, k) >= 1, f"train.{k} must be >= 1, got {getattr(self, k)}")
        _check(self.lr > 0 and self.server_lr > 0, "train.lr and train.server_lr must be > 0")
        _check(self.length_buckets >= 0, f"train.length_buckets must be >= 0 (0: off), got {self.length_buckets}")
        _check(0 <= self.momentum < 1, f"train.momentum must lie in [0, 1), got {self.momentum}")
        _check(0 < self.fraction_train <= 1, f"train.fraction_train must lie in (0, 1], got {self.fraction_train}")
        _check(
            0 <= self.fraction_evaluate <= 1,
            f"train.fraction_evaluate must lie in [0, 1], got {self.fraction_evaluate}",
        )
        _check(
            self.strategy in STRATEGIES, f"train.strategy: unknown {self.strategy!r}; choose one of {list(STRATEGIES)}"
        )
        _check(
            self.wire_dtype in WIRE_DTYPES,
            f"train.wire_dtype must be one of {list(WIRE_DTYPES)}, not {self.wire_dtype!r}",
        )


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:0"  # where the in-process split server listens (port 0: the OS picks)
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda:0", ...
    # torch intra-op threads of the split server; 0 = auto: in simulation the cores the clients leave
    # free (fsl_cli.main.simulation_server_threads), elsewhere torch's default
    threads: int = 0
    max_message_mb: int = 64  # largest data-plane message either side accepts
    # faults: a client's data-plane request fails after request_timeout_s (DEADLINE_EXCEEDED: the client
    # drops out of the round, which goes on without it); UNAVAILABLE (a reset link) is retried
    # request_retries times with backoff (the server answers a retried step without training twice)
    request_timeout_s: float = 120.0
    request_retries: int = 3
    max_batch: int = 4096
    # batch concurrent Train requests into one forward/backward (server/batching.py). Each
    # client still gets its own exact gradient at the cut; one SGD step on the SUM of the clients'
    # gradients (same lr as unbatched). Not for segments with BatchNorm.
    batching: bool = False
    max_batch_requests: int = 8  # most requests in one batch
    max_batch_wait_ms: float = 20.0  # longest a batch waits for more requests (a lone client never waits)
    # with batching, requests of different sequence lengths share a batch, padded to the longest with
    # positions the cut's masks mark absent; off: one batch per length (server/batching.py)
    pad_lengths: bool = False
    # where clients dial the split server when `address` binds 0.0.0.0 ("gpu-host" or "gpu-host:7800";
    # no port = the bound one), and data-plane TLS (PEM paths on the ServerApp's host; fsl/endpoint.py)
    public_address: str = ""  # deploy
    tls_certfile: str = ""  # server certificate (chain)
    tls_keyfile: str = ""  # its private key
    tls_ca_certfile: str = ""  # CA sent to clients to verify the server ("" = the certificate itself)
    # scale-out: standalone split servers (`fsl split-server`, one per GPU host), "host:port" each, as a
    # TOML array or one comma-separated string; the round's segment copies (hybrid groups, sflv1 clients)
    # are spread over them and merged by the ServerApp (server/remote.py). Empty: the in-process server
    endpoints: tuple[str, ...] = ()
    # the secret the ServerApp and those split servers share to authenticate control calls (hex in a
    # file; `fsl split-server --secret-file` creates one); the clients never get it
    control_secret_file: str = ""

    def __post_init__(self) -> None:
        given: Any = self.endpoints  # a TOML array or flat "a:1,b:2" (Flower's run config has no arrays)
        parts = given.split(",") if isinstance(given, str) else given
        object.__setattr__(self, "endpoints", tuple(str(p).strip() for p in parts if str(p).strip()))
        _check(
            all(":" in e for e in self.endpoints), f"server.endpoints must be host:port each, got {self.endpoints!r}"
        )
        _check(
            not self.endpoints or bool(self.control_secret_file),
            "server.endpoints needs server.control_secret_file (the secret the split servers were started with)",
        )
        _check(self.max_batch_requests >= 1, "server.max_batch_requests must be >= 1")
        _check(
            0 <= self.max_batch_wait_ms < math.inf,
            f"server.max_batch_wait_ms must be finite and >= 0, not {self.max_batch_wait_ms}",
        )
        _check(":" in self.address, f"server.address must be host:port, got {self.address!r}")
        _check(self.request_timeout_s > 0, f"server.request_timeout_s must be > 0, got {self.request_timeout_s}")
        _check(self.request_retries >= 0, f"server.request_retries must be >= 0, got {self.request_retries}")
        _check(
            bool(self.tls_certfile) == bool(self.tls_keyfile),
            "server.tls_certfile and server.tls_keyfile go together",
        )  # deploy
        _check(self.max_message_mb >= 1, "server.max_message_mb must be >= 1")
        _check(self.threads >= 0, "server.threads must be >= 0")


@dataclass(frozen=True)
class SimulationConfig:
    client_cpus: float = 1.0  # CPUs Ray reserves per simulated client (how many run at once)
    client_threads: int = 1  # torch threads inside each simulated client
    verbose: bool = False  # show Flower's and Ray's own logs

    def __post_init__(self) -> None:
        _check(self.client_cpus > 0, "simulation.client_cpus must be > 0")
        _check(self.client_threads >= 1, "simulation.client_threads must be >= 1")


@dataclass(frozen=True)
class HybridConfig:
    groups: int = 2  # server-segment replicas; clients are grouped onto them (0 = one per client)
    group_by: str = "count"  # "count" (equal numbers), "data" (equal data), "capability" (similar devices together)

    def __post_init__(self) -> None:
        _check(self.groups >= 0, f"hybrid.groups must be >= 0, got {self.groups}")
        _check(
            self.group_by in GROUP_RULES, f"hybrid.group_by must be one of {list(GROUP_RULES)}, not {self.group_by!r}"
        )


@dataclass(frozen=True)
class RecordConfig:  # the opt-in observation recorder (server/recorder.py) that the attacks read
    enabled: bool = False  # store what the split server sees in observations/ (and ground truth in simulation)
    rounds: str = "last"  # "last", "all", or a comma list such as "1,3"
    max_batches: int = 4  # training batches recorded per client and round
    # The data owner's ground-truth capture (inputs of the recorded batches, for scoring attacks): an
    # import string "module:factory" the ClientApp resolves with fsl.plugins.resolve when a round is
    # recorded; factory(cfg, round config, client id) returns fsl.training.TrainHooks or None. "" = none.
    ground_truth: str = "attacks.ground_truth:capture_hooks"

    def __post_init__(self) -> None:
        _check(self.max_batches >= 1, f"record.max_batches must be >= 1, got {self.max_batches}")
        ok = self.rounds in ("last", "all") or all(p.strip().isdigit() for p in self.rounds.split(","))
        _check(ok, f"record.rounds must be 'last', 'all' or a comma list of rounds, not {self.rounds!r}")
        _check(
            not self.ground_truth or ":" in self.ground_truth,
            f"record.ground_truth must be an import string 'module:name' or empty, not {self.ground_truth!r}",
        )

    def round_list(self, total: int) -> tuple[int, ...]:
        """The recorded rounds (empty = all) for a run of ``total`` rounds."""
        if self.rounds == "all":
            return ()
        if self.rounds == "last":
            return (total,)
        return tuple(int(p) for p in self.rounds.split(","))


@dataclass(frozen=True)
class ActivationNoiseConfig:  # fsl/privacy/activation.py, applied to every release of activations
    mechanism: str = "none"  # "none", "gaussian" (L2 clip) or "laplace" (L1 clip)
    clip_norm: float = 1.0  # per-sample norm bound C of the activation at the cut
    noise_multiplier: float = 1.0  # noise std (Gaussian) or scale (Laplace) in units of clip_norm

    def __post_init__(self) -> None:
        _check(
            self.mechanism in ("none", "gaussian", "laplace"),
            f"activation_noise.mechanism must be 'none', 'gaussian' or 'laplace', not {self.mechanism!r}",
        )
        _check(self.clip_norm > 0, f"activation_noise.clip_norm must be > 0, got {self.clip_norm}")
        _check(self.noise_multiplier >= 0, "activation_noise.noise_multiplier must be >= 0")


@dataclass(frozen=True)
class LogConfig:  # where each round's metrics go besides metrics.jsonl (server/round_hooks.py: TensorBoardLog)
    # also write every round's scalar metrics (accuracy, loss, fed_accuracy, train_loss, bytes, seconds, ...)
    # to <run dir>/tensorboard/, so a long run is watched live with `tensorboard --logdir runs/`;
    # needs the tensorboard package (in the server extra)
    tensorboard: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    mode: str = "fsl"  # split-learning architecture
    clients: int = 4  # number of clients (data partitions)
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    activation_noise: ActivationNoiseConfig = field(default_factory=ActivationNoiseConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # fsl/privacy/config.py
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def clip_norm(self) -> float:
        """The gradient-norm bound of every SGD step of a segment (0: none): ``train.clip_norm``, its
        automatic value resolved for this mode. A bound the config sets holds in every mode, the
        whole-model baselines (``fl``, ``central``) included, so that a split run and its baseline
        differ only in the mode; the automatic bound clips ``AUTO_CLIP_MODES`` only."""
        if self.train.clip_norm >= 0:
            return float(self.train.clip_norm)
        return AUTO_CLIP_NORM if self.mode in AUTO_CLIP_MODES else 0.0

    @property
    def architecture(self) -> str:
        """The orchestration this config runs: ``ushaped`` is ``fsl`` with a U-shaped split."""
        return "fsl" if self.mode == "ushaped" else self.mode

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"mode {self.mode!r} is not available; choose one of {list(MODES)}")
        if self.mode == "ushaped" and not self.model.ushaped:  # `ushaped` = fsl with a U-shaped split
            object.__setattr__(self, "model", dataclasses.replace(self.model, ushaped=True))
        _check(
            not (self.model.ushaped and self.mode in ("fl", "central")),
            f"model.ushaped needs a split mode; {self.mode!r} does not split the model",
        )
        if self.mode not in ("fl", "central"):  # a model without declared cuts must be told where to split
            hint = "a module path such as 'layer2' or 'encoder.layer.1' (`fsl cuts` lists them)"
            _check(bool(self.model.cut), f"model.cut: {self.model.name} declares no default cut; name {hint}")
            _check(
                bool(self.model.top_cut) or not self.model.ushaped,
                f"model.top_cut: a U-shaped split of {self.model.name} needs a second cut; name {hint}",
            )
        lora = self.model.lora
        _check(
            not (lora.enabled and lora.segments != "both" and not self.model.cut),
            f"model.lora.segments = {lora.segments!r} puts adapters on one side of model.cut, which is empty",
        )
        _check(self.clients >= 1, f"clients must be >= 1, got {self.clients}")
        _check(self.train.min_clients <= self.clients, "train.min_clients cannot exceed clients")
        check_privacy(self, ConfigError)


# ----------------------------------------------------------------------------- (de)serialisation


def _type_ok(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is dict:  # [model.options]: a table of keyword arguments
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if typing.get_origin(tp) is tuple:  # tuple[str, ...]: a TOML array, or one comma-separated string
        return isinstance(value, (list, tuple, str)) and all(isinstance(v, str) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def from_dict(cls: type[Any], data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested ``data``, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {names}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{k} must be a table, got {value!r}")
            kwargs[k] = from_dict(tp, value, prefix=f"{prefix}{k}.")  # type: ignore[arg-type]
        else:
            if isinstance(tp, types.UnionType):
                ok = any(_type_ok(value, t) for t in typing.get_args(tp))
            else:
                ok = _type_ok(value, tp)
            if not ok:
                raise ConfigError(f"{prefix}{k} must be {getattr(tp, '__name__', tp)}, got {value!r}")
            kwargs[k] = float(value) if tp is float else dict(value) if isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (TOML/JSON ready)."""
    return dataclasses.asdict(cfg)


def to_toml(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML that :func:`load_experiment` reads back."""
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (strings or an already-parsed mapping) to nested ``data``."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in items:
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {p!r} is not a table")
        node[parts[-1]] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.rounds=3)")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value.strip())


def experiment_path(name: str) -> Path:
    """The TOML file of experiment ``name`` (a path, or a name in ``experiments/``)."""
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    candidate = Path(str(resources.files("experiments"))) / f"{name}.toml"
    if candidate.exists():
        return candidate
    known = sorted(f.stem for f in Path(str(resources.files("experiments"))).glob("*.toml"))
    raise ConfigError(f"no experiment {name!r}; known experiments: {known} (or give a path to a .toml file)")


def load_experiment(name: str, overrides: list[str] | dict[str, Any] | None = None) -> ExperimentConfig:
    """Load experiment ``name`` (see :func:`experiment_path`) with ``overrides`` applied."""
    path = experiment_path(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    cfg: ExperimentConfig = from_dict(ExperimentConfig, data)
    return cfg
