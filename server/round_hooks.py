"""Round hooks: what plugs into every round of :class:`server.rounds.RoundRunner` without being part of it.

A round is configure → train → aggregate → evaluate → record. A :class:`RoundHook` sees the round
at fixed points and may add to it; every method is optional (the base class's do nothing):

==================  ==========================================================================
``on_start``        once, before the first round: may add keys every message of the run carries
``on_phase``        as each phase of a round begins (``PHASES``)
``on_configure``    clients are selected and planned: may add keys to the round's train config
``on_replies``      training replies are in, before anything is aggregated
``aggregate_train`` a hook with ``replaces_aggregation`` aggregates the client segments itself
``on_record``       the round's numbers are in: may add keys to the ``metrics.jsonl`` row
``on_round_end``    the round's row and checkpoint are on disk
``state_dict``      what the hook keeps across rounds, saved in every checkpoint under ``name``
``load_state_dict`` restores it on resume
``on_summary``      may add keys to ``summary.json``
==================  ==========================================================================

The hooks here: secure aggregation, the privacy ledger and report, the observation recorder, a
progress marker that announces each phase on disk, the TensorBoard log of each round's metrics, and
an injected crash for resume tests.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message

from fsl.privacy.server import ServerPrivacy
from server.plan import RoundPlan
from server.recorder import ObservationRecorder, recorder_config, updates_from_replies

__all__ = [
    "CRASH_ENV",
    "PHASES",
    "CrashAfterRound",
    "ObservationHook",
    "PhaseMarker",
    "PrivacyReport",
    "Round",
    "RoundHook",
    "SecureAggregation",
    "TensorBoardLog",
    "read_progress",
]

log = logging.getLogger("fsl.server")

PHASES = ("configure", "train", "aggregate", "evaluate", "record")


@dataclass
class Round:
    """What one round carries from phase to phase."""

    number: int
    plan: RoundPlan
    conf: dict[str, Any]  # the config every TRAIN message of the round carries
    sent: ArrayRecord  # the client segment as the round began (what a white-box attacker knows)
    replies: list[Message] = field(default_factory=list)  # in plan order; error replies included
    extra: dict[str, Any] = field(default_factory=dict)  # keys hooks add to the metrics row

    @property
    def ok(self) -> list[Message]:
        """The successful training replies."""
        return [m for m in self.replies if not m.has_error()]


class RoundHook:
    """Something that plugs into every round; override what you need."""

    name = ""  # the checkpoint key of :meth:`state_dict` (empty: nothing saved)
    replaces_aggregation = False

    def on_start(self, base: dict[str, Any]) -> None:
        """``base``: the keys every message of the run carries; add to it."""

    def on_phase(self, rnd: int, phase: str) -> None:
        """Phase ``phase`` of round ``rnd`` begins."""

    def on_configure(self, r: Round) -> None:
        """Clients are selected and the round is planned; ``r.conf`` may be extended."""

    def on_replies(self, r: Round) -> None:
        """Training is over (``r.replies``); nothing is aggregated yet."""

    def aggregate_train(self, r: Round, current: ArrayRecord) -> ArrayRecord | None:
        """The aggregated client segment, ``None`` to keep ``current`` (with ``replaces_aggregation``)."""
        raise NotImplementedError

    def on_record(self, r: Round) -> None:
        """The round is evaluated; keys put in ``r.extra`` go into its metrics row."""

    def on_round_end(self, rnd: int) -> None:
        """Round ``rnd``'s metrics row and checkpoint are on disk."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` returned (``None``: a checkpoint without it)."""

    def on_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json`` is about to be written; add keys to it."""


class PrivacyReport(RoundHook):
    """DP-SGD accounting per round (``privacy`` in the row), its ledger in checkpoints, the summary's ``privacy``."""

    name = "privacy"

    def __init__(self, privacy: ServerPrivacy) -> None:
        self.privacy = privacy

    def on_record(self, r: Round) -> None:
        r.extra.update(self.privacy.round_row(r.ok))

    def state_dict(self) -> dict[str, Any]:
        return self.privacy.state()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.privacy.load(state)  # the accountant's steps survive a restart, so epsilon keeps adding up

    def on_summary(self, summary: dict[str, Any]) -> None:
        summary.update(self.privacy.summary())


class SecureAggregation(RoundHook):
    """Pairwise-masked uploads: the server collects the round's public keys and sees only the masked sum."""

    replaces_aggregation = True

    def __init__(self, privacy: ServerPrivacy, grid: Any, timeout_s: float) -> None:
        self.privacy, self.grid, self.timeout_s = privacy, grid, timeout_s
        self.base: dict[str, Any] = {}

    def on_start(self, base: dict[str, Any]) -> None:
        self.base = base

    def on_configure(self, r: Round) -> None:
        # every participant needs every other's public key to derive the pairwise masks
        r.conf.update(self.privacy.secagg_setup(self.grid, r.number, list(r.plan.order), self.base, self.timeout_s))

    def aggregate_train(self, r: Round, current: ArrayRecord) -> ArrayRecord | None:
        out: ArrayRecord | None = self.privacy.secagg_aggregate(r.number, r.ok, current)
        return out


class ObservationHook(RoundHook):
    """Writes what the split server saw in a recorded round (:mod:`server.recorder`), for the attacks."""

    def __init__(self, recorder: ObservationRecorder, state: Any, run: Any) -> None:
        self.recorder, self.state, self.run = recorder, state, run

    def on_start(self, base: dict[str, Any]) -> None:
        base.update(recorder_config(self.recorder, self.run))  # data owners in simulation write ground truth

    def on_replies(self, r: Round) -> None:
        if self.recorder.wants(r.number):  # the segment sent, the server's own, and each returned one
            self.recorder.end_round(
                r.number, r.sent.to_torch_state_dict(), self.state.segment_state_dict(), updates_from_replies(r.ok)
            )


PROGRESS_FILE = "progress.json"


class PhaseMarker(RoundHook):
    """Announces on disk which round and phase the run is in: ``progress.json`` = ``{"round", "phase"}``.

    Phases are those of :data:`PHASES`, then ``"done"`` once the round's checkpoint is written. An
    operator (or a test that injects a fault at a phase boundary) reads it with :func:`read_progress`.
    The announcement of a phase is written before the phase does anything, so a client selected for
    round N's ``train`` phase cannot have received its instruction when ``train`` appears.
    """

    def __init__(self, run_path: str | Path) -> None:
        self.path = Path(run_path) / PROGRESS_FILE

    def _write(self, rnd: int, phase: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"round": rnd, "phase": phase}) + "\n")
        os.replace(tmp, self.path)  # readers never see a half-written file

    def on_phase(self, rnd: int, phase: str) -> None:
        self._write(rnd, phase)

    def on_round_end(self, rnd: int) -> None:
        self._write(rnd, "done")


def read_progress(run_path: str | Path) -> tuple[int, str] | None:
    """(round, phase) that :class:`PhaseMarker` last announced in ``run_path``, or ``None``."""
    try:
        data = json.loads((Path(run_path) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return int(data["round"]), str(data["phase"])


TENSORBOARD_DIR = "tensorboard"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` row that TensorBoard plots: its int and float values but the
    round, and those of a dict of numbers (``exit_accuracies``) as ``key/name``."""
    out = {k: float(v) for k, v in row.items() if k != "round" and _number(v)}
    for k, v in row.items():
        if isinstance(v, dict) and v and all(_number(x) for x in v.values()):
            out.update({f"{k}/{name}": float(x) for name, x in v.items()})
    return out


class TensorBoardLog(RoundHook):
    """Each round's scalar metrics, as written to ``metrics.jsonl``, also in ``<run dir>/tensorboard/``.

    ``[log] tensorboard = true`` installs it; ``tensorboard --logdir runs/`` shows a long run live.
    The step is the round. The row is read back from ``metrics.jsonl`` once the round's checkpoint is on
    disk, so TensorBoard shows exactly the rounds a resume keeps: a resumed run appends to the same
    folder (a new event file), and its first write purges anything an interrupted run logged from
    that round on.
    """

    def __init__(self, run_path: str | Path) -> None:
        self.run_path = Path(run_path)
        self.writer: Any = None  # torch.utils.tensorboard.SummaryWriter, opened at the first round written

    def on_round_end(self, rnd: int) -> None:
        row = _last_row(self.run_path / "metrics.jsonl")
        if row is None or row.get("round") != rnd:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # optional: the server extra installs tensorboard

            self.writer = SummaryWriter(log_dir=str(self.run_path / TENSORBOARD_DIR), purge_step=rnd)
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=rnd)
        self.writer.flush()  # a user watching the run sees the round now, not when a buffer fills

    def on_summary(self, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _last_row(path: Path) -> dict[str, Any] | None:
    """The last complete row of a ``metrics.jsonl`` (``None`` if there is none)."""
    try:
        lines = path.read_text().rstrip("\n").rsplit("\n", 1)
        row: dict[str, Any] = json.loads(lines[-1])
    except (OSError, ValueError):
        return None
    return row


CRASH_ENV = "FSL_CRASH_AFTER_ROUND"


class CrashAfterRound(RoundHook):
    """Fault injection: SIGKILL this process once round ``after``'s checkpoint is on disk.

    Installed only when the environment variable :data:`CRASH_ENV` names a round. It lets a test crash
    a run at an exact round boundary (no cleanup, no summary) and check that ``--resume`` continues it
    as if nothing had happened.
    """

    def __init__(self, after: int) -> None:
        self.after = after

    def on_round_end(self, rnd: int) -> None:
        if rnd == self.after:
            log.warning("%s=%d: crashing after round %d's checkpoint", CRASH_ENV, self.after, rnd)
            os.kill(os.getpid(), signal.SIGKILL)

    @classmethod
    def from_env(cls) -> CrashAfterRound | None:
        value = os.environ.get(CRASH_ENV, "")
        return cls(int(value)) if value else None
