"""The Flower ServerApp: the entry points that run :class:`server.rounds.RoundRunner` on a Flower grid.

``app`` is what ``flwr run .`` starts (the experiment comes from the run config); ``make_server_app``
binds a ServerApp to a config and run directory for ``fsl run`` and ``fsl launch``. The round loop,
its phases and its hooks live in :mod:`server.rounds` and :mod:`server.round_hooks`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fsl.config import ExperimentConfig, load_experiment
from fsl.rundir import RunDir
from server.results import Reporter
from server.rounds import RoundRunner

__all__ = ["RunStopped", "StoppableGrid", "app", "make_server_app", "run_rounds"]

log = logging.getLogger("fsl.server")


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

    # replies are looked for every 10 ms: at 100 ms the ServerApp would sleep 50 ms past the last reply
    # on average, 3-4% of a quickstart round, while a LinkState query is only an in-memory lookup
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
