"""The ``fsl`` command line.

``fsl run EXPERIMENT [section.key=value ...]`` runs an experiment from
``experiments/`` in Flower's simulation engine and writes its run directory;
``fsl run --resume RUN_DIR`` continues a run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsl.config import ExperimentConfig

__all__ = ["main", "run_experiment"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class ConsoleReporter:
    """Live progress of the running round and one table row per finished round."""

    COLUMNS = ("round", "test acc", "test loss", "fed acc", "train loss", "bytes up", "bytes dn", "seconds")

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False)
        self.quiet = quiet
        self.rows: list[dict[str, Any]] = []
        self._progress: Any = None
        self._poller: Any = None

    def _cells(self, r: dict[str, Any]) -> list[str]:
        fed = "-" if r.get("fed_accuracy") is None else f"{r['fed_accuracy']:.4f}"
        tl = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        return [
            str(r["round"]),
            f"{r['accuracy']:.4f}",
            f"{r['loss']:.4f}",
            fed,
            tl,
            _fmt_bytes(r["bytes_up"]),
            _fmt_bytes(r["bytes_down"]),
            f"{r['seconds']:.1f}",
        ]

    def round_start(self, rnd: int, rounds: int, expected_samples: int, done: Callable[[], int]) -> None:
        if self.quiet:
            return
        import threading

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._stop_progress()
        self._progress = Progress(
            TextColumn(f"round {rnd}/{rounds}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("samples"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        task = self._progress.add_task("train", total=max(1, expected_samples))
        self._progress.start()
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.25):
                self._progress.update(task, completed=min(done(), expected_samples))

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        self._poller = (stop, th)

    def _stop_progress(self) -> None:
        if self._poller is not None:
            self._poller[0].set()
            self._poller[1].join()
            self._poller = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def round_end(self, row: dict[str, Any]) -> None:
        self._stop_progress()
        self.rows.append(row)
        if not self.quiet:
            if len(self.rows) == 1:
                self.console.print(" ".join(f"{c:>9}" for c in self.COLUMNS), style="bold")
            self.console.print(" ".join(f"{c:>9}" for c in self._cells(row)))

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="per-round results")
        for c in self.COLUMNS:
            t.add_column(c, justify="right")
        for r in self.rows:
            t.add_row(*self._cells(r))
        return t


def _quiet_frameworks(verbose: bool) -> None:
    if verbose:
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    warnings.filterwarnings("ignore")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


class SimulationFailed(RuntimeError):
    """The simulation engine (Flower on Ray) failed; the run directory keeps its last checkpoint."""


def start_ray(init_args: dict[str, Any], attempts: int = 3) -> None:
    """Start the local Ray cluster the simulation engine runs on, retrying a slow start.

    Ray gives its raylet a fixed 30 s to register; on a loaded 2-core host that sometimes is not
    enough ("The current node timed out during startup"). Flower's Ray backend reuses a cluster
    that is already up, so starting it here with the same arguments lets a slow start be retried.
    """
    import ray

    if ray.is_initialized():
        return
    # what Flower's backend would pass: Ray's workers import this process's modules
    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False, **init_args)
            return
        except Exception as e:  # Ray raises a bare Exception on a startup timeout
            ray.shutdown()
            if attempt == attempts:
                raise SimulationFailed(
                    f"Ray (Flower's simulation engine) did not start after {attempts} tries: {e}"
                ) from e
            print(f"warning: Ray did not start ({e}); retrying ({attempt}/{attempts - 1})", file=sys.stderr)
            time.sleep(2.0 * attempt)


def simulation_server_threads(cfg: ExperimentConfig, cpus: int | None = None) -> int:
    """Torch threads for the split server when the simulated clients share its machine.

    ``server.threads`` when set; otherwise (0, "auto") the cores the clients leave free: Ray runs
    ``cpus // simulation.client_cpus`` clients at once (at most ``clients``), each with
    ``simulation.client_threads`` threads, and at least one thread is kept. Torch's default (one
    thread per core) oversubscribes the cores the clients are using: on 2 cores with 2 clients at
    once the quickstart trained at 3,700 samples/s with 2 server threads and 4,800 with 1.
    """
    if cfg.server.threads:
        return int(cfg.server.threads)
    cpus = cpus or os.cpu_count() or 1
    at_once = min(cfg.clients, max(1, int(cpus // cfg.simulation.client_cpus)))
    return max(1, cpus - at_once * cfg.simulation.client_threads)


def run_experiment(cfg: Any, run: Any, reporter: Any = None) -> dict[str, Any]:
    """Run ``cfg`` in Flower's simulation engine (one virtual SuperNode per client).

    The ``central`` baseline needs no federation: it trains in this process.
    """
    if cfg.mode == "central":
        from server.central import run_central

        return run_central(cfg, run, reporter)
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import make_server_app

    _quiet_frameworks(cfg.simulation.verbose)
    import torch

    torch.set_num_threads(simulation_server_threads(cfg))  # the ServerApp runs in this process
    server_app = make_server_app(cfg, run, reporter)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cfg.simulation.client_cpus, "num_gpus": 0.0},
        "init_args": {
            "log_to_driver": cfg.simulation.verbose,
            "logging_level": logging.INFO if cfg.simulation.verbose else logging.ERROR,
            "configure_logging": True,
        },
    }
    start_ray(backend_config["init_args"])
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config,
            verbose_logging=cfg.simulation.verbose,
        )
    except Exception as e:
        root: BaseException = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise SimulationFailed(f"Flower's simulation engine failed: {type(root).__name__}: {root}") from e
    finally:
        server_app.stop.set()  # type: ignore[attr-defined]  # a failed engine must not leave the round loop waiting
    result: dict[str, Any] = server_app.result.get("summary")  # type: ignore[attr-defined]
    if result is None:
        raise RuntimeError("the simulation ended without a result; rerun with simulation.verbose=true")
    return result


def _sweep(name: str | None) -> Any:
    """The module of a sweep experiment (``experiments/NAME.py`` with a ``main(args)``), if any."""
    import importlib

    if not name or name.endswith(".toml"):
        return None
    modname = "experiments." + name.replace("-", "_")
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        return None
    return mod if callable(getattr(mod, "main", None)) else None


def _cmd_run(args: argparse.Namespace) -> int:
    from fsl.config import ConfigError, load_experiment
    from fsl.rundir import RunDir

    # a sweep (compare, leakage, ...) resumes with `fsl run NAME --resume ITS_DIR`
    sweep = _sweep(args.experiment) if (args.experiment and "=" not in args.experiment) else None
    if sweep is not None:  # an experiment made of several runs (compare, leakage, ...)
        from fsl.data import DatasetNotFound

        try:
            return int(sweep.main(args))
        except (ConfigError, DatasetNotFound) as e:  # the user's to fix: one line, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2

    try:
        if args.resume:
            run = RunDir(args.resume)
            if not run.config_path.exists():
                print(f"error: {args.resume} is not a run directory (no config.toml)", file=sys.stderr)
                return 2
            cfg = load_experiment(str(run.config_path), args.overrides)
        else:
            if not args.experiment:
                print("error: name an experiment (e.g. `fsl run quickstart`) or give --resume RUN_DIR", file=sys.stderr)
                return 2
            cfg = load_experiment(args.experiment, args.overrides)
            run = RunDir.create(cfg.output_dir, cfg.name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fsl.data import DatasetNotFound, load_dataset

    try:
        load_dataset(cfg.data.name, cfg.data.path or None, cfg.data.options)
    except DatasetNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reporter = ConsoleReporter(quiet=args.quiet)
    reporter.console.print(
        f"[bold]{cfg.name}[/]: mode {cfg.mode}, {cfg.clients} clients, {cfg.data.name} ({cfg.data.partition}), "
        f"{cfg.model.name} cut at {cfg.model.cut}, {cfg.train.rounds} rounds"
    )
    reporter.console.print(f"run directory: {run.path}")
    t0 = time.perf_counter()
    try:
        summary = run_experiment(cfg, run, reporter)
    except SimulationFailed as e:
        print(
            f"error: {e}\nthe run directory keeps its last checkpoint: `fsl run --resume {run.path}`", file=sys.stderr
        )
        return 1
    reporter.console.print(reporter.table())
    reporter.console.print(
        f"final test accuracy {summary['final_accuracy']:.4f} (best {summary['best_accuracy']:.4f}) "
        f"in {time.perf_counter() - t0:.1f}s on split-server device {summary['device']}"
    )
    reporter.console.print(f"results: {Path(run.path)}  (summary.json, metrics.jsonl, curves.png, checkpoints/)")
    return 0


# Modules that add subcommands, each with `register(subparsers) -> dict[name, handler]`: the attacks,
# the deployment roles (certs, superlink, supernode, connect, launch), the standalone split server
# (split-server), serving (serve, serve-token) and its client (predict). A role's package may be left
# out of an installation (a device has no attacks).
PLUGIN_MODULES = (
    "attacks.cli",
    "fsl_cli.cuts",
    "fsl_cli.deploy",
    "server.serve",
    "server.split_host",
    "fsl_cli.predict",
)


def _register_plugins(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    import importlib

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name in PLUGIN_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        handlers.update(mod.register(sub))
    return handlers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsl", description="Hybrid federated split learning on Flower")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run an experiment (experiments/NAME.toml) in Flower's simulation engine")
    p_run.add_argument("experiment", nargs="?", help="experiment name or path to a .toml file")
    p_run.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.rounds=3")
    p_run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p_run.add_argument("--quiet", action="store_true", help="no live progress, only the final table")
    p_run.add_argument("--quick", action="store_true", help="sweep experiments: the same sweep on a small subset")
    plugins = _register_plugins(sub)
    args, extra = parser.parse_known_args(argv)
    # overrides may follow an option (`fsl run quickstart --quiet train.rounds=2`)
    flags = [a for a in extra if a.startswith("-")]
    if flags or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command in plugins:
        return int(plugins[args.command](args))
    if args.command == "run":
        # `fsl run --resume DIR k=v`: argparse puts the first override in `experiment`
        if args.resume and args.experiment and "=" in args.experiment:
            args.overrides = [args.experiment, *args.overrides]
            args.experiment = None
        return _cmd_run(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
