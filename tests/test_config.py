import tomllib

import pytest

from fsl.config import ConfigError, ExperimentConfig, from_dict, load_experiment, to_toml


def test_shipped_experiments_load():
    q = load_experiment("quickstart")
    f = load_experiment("fashion-mnist")
    assert (q.name, q.data.name, q.mode) == ("quickstart", "mnist5k", "fsl")
    assert (f.clients, f.data.name, f.data.partition, f.train.rounds) == (10, "fashion-mnist", "iid", 10)


def test_overrides_are_typed_and_applied():
    cfg = load_experiment("quickstart", ["train.rounds=2", "data.partition=dirichlet", "data.alpha=0.3", "clients=3"])
    assert cfg.train.rounds == 2 and cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.3 and cfg.clients == 3
    cfg = load_experiment("quickstart", {"train.lr": 1})  # ints are fine where floats are expected
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.roundz=3", "unknown key 'train.roundz'; did you mean 'train.rounds'"),
        ("train.rounds=three", "train.rounds must be int"),
        ("train.rounds=0", "train.rounds must be >= 1"),
        ("model.cut=fc2", "cnn can be cut at"),
        ("data.name=imagenet", "unknown dataset 'imagenet'"),
        ("mode=warp", "mode 'warp' is not available"),
        ("train.wire_dtype=float64", "train.wire_dtype must be one of"),
        ("train.lr_schedule=step", "train.lr_schedule must be one of"),
        ("rounds", "must look like section.key=value"),
    ],
)
def test_bad_config_is_explained(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_experiment("quickstart", [override])


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_experiment("no-such-experiment")


def test_resolved_config_round_trips_through_toml():
    cfg = load_experiment("fashion-mnist", ["model.cut=conv2"])
    again = from_dict(ExperimentConfig, tomllib.loads(to_toml(cfg)))
    assert again == cfg and again.model.norm == "none"  # defaults were resolved and written down


def test_the_split_server_leaves_the_simulated_clients_their_cores():
    from fsl_cli.main import simulation_server_threads

    quick = load_experiment("quickstart")  # 4 clients, 1 CPU and 1 thread each
    assert simulation_server_threads(quick, cpus=2) == 1  # 2 clients at once take both cores
    assert simulation_server_threads(quick, cpus=16) == 12  # 4 at once, 12 cores left
    two = load_experiment("quickstart", ["clients=2", "simulation.client_cpus=2"])
    assert simulation_server_threads(two, cpus=16) == 14  # at most 8 at once, but only 2 clients
    assert simulation_server_threads(load_experiment("quickstart", ["server.threads=3"]), cpus=2) == 3


def test_a_sweep_with_a_missing_dataset_says_so_in_one_line(tmp_path):
    """The user's mistake (a data folder that does not exist) is an error line and exit 2, not a traceback."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-folder"
    cmd = [sys.executable, "-m", "fsl_cli", "run", "compare", "--quick", f"data.path={missing}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and str(missing) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "schedule,factors",
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.75, 0.5, 0.25]),
        ("cosine", [1.0, 0.5 + 0.5**0.5 / 2, 0.5, 0.5 - 0.5**0.5 / 2]),
    ],
)
def test_the_learning_rate_schedule_gives_each_round_its_rate(schedule, factors):
    from fsl.training import TrainOptions

    cfg = load_experiment("quickstart", ["train.rounds=4", f"train.lr_schedule={schedule}", "train.lr=0.2"])
    assert [cfg.train.lr_factor(r) for r in (1, 2, 3, 4)] == pytest.approx(factors)
    # the client's options for a round carry that round's rate
    assert [TrainOptions.from_config(cfg, seed=0, rnd=r).lr for r in (1, 2, 3, 4)] == pytest.approx(
        [0.2 * f for f in factors]
    )
