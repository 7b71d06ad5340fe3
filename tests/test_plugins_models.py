"""Models and datasets named by import string or registered by decorator, their options in the
config (and on its trip to the clients), the checks at config load, the image-folder loader, and
the example user model and dataset in examples/."""

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fsl.config import ConfigError, ExperimentConfig, ModelConfig, from_dict, load_experiment, to_toml
from fsl.data import DATASETS, Dataset, DatasetNotFound, load_dataset, register_dataset
from fsl.experiment import config_from_json, config_to_json
from fsl.models import MODELS, build_model, build_module, model_spec, register_model, run_model
from fsl.plugins import PluginError, resolve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_model" / "experiment.toml"


def _write(tmp_path, name, body):
    f = tmp_path / name
    f.write_text(textwrap.dedent(body))
    return f


@pytest.fixture
def user_model(tmp_path):
    f = _write(
        tmp_path,
        "user_model.py",
        """
        from torch import nn

        def build(num_classes=10, input_shape=(1, 8, 8), hidden=8):
            c, h, w = input_shape
            return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        def not_a_model(**kw):
            return 42

        TABLE = {"a": 1}
        """,
    )
    return str(f)


def test_a_file_import_string_loads_once_and_explains_failures(user_model, tmp_path):
    build = resolve(f"{user_model}:build")
    assert resolve(f"{user_model}:build") is build  # one module per file and process
    with pytest.raises(PluginError, match="no file"):
        resolve(f"{tmp_path}/absent.py:build")
    broken = _write(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="RuntimeError: boom"):
        resolve(f"{broken}:x")


def test_a_plugin_model_builds_with_options_and_the_data_shape(user_model):
    name = f"{user_model}:build"
    spec = model_spec(name)
    assert spec.graph and spec.cuts == () and spec.default_cut == ""
    m = build_module(name, input_shape=(1, 4, 4), num_classes=3, seed=0, options={"hidden": 5})
    assert m[1].in_features == 16 and m[1].out_features == 5 and m[3].out_features == 3
    again = build_module(name, input_shape=(1, 4, 4), num_classes=3, seed=0, options={"hidden": 5})
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(TypeError, match="returned a int, not an nn.Module"):
        build_module(f"{user_model}:not_a_model")
    with pytest.raises(PluginError, match="not a callable"):
        model_spec(f"{user_model}:TABLE")
    with pytest.raises(TypeError, match="widht"):
        build_module(name, options={"widht": 3})


def test_config_round_trips_options_and_plugin_names(user_model, tmp_path):
    toml = _write(
        tmp_path,
        "exp.toml",
        f"""
        mode = "fsl"
        [data]
        name = "digits"
        [model]
        name = "{user_model}:build"
        cut = "1"
        [model.options]
        hidden = 12
        nested = {{ sizes = [1, 2], name = "x" }}
        """,
    )
    cfg = load_experiment(str(toml), ["model.options.hidden=7", "data.options.seed=3"])
    assert cfg.model.options == {"hidden": 7, "nested": {"sizes": [1, 2], "name": "x"}}
    assert cfg.data.options == {"seed": 3}
    # the trip to Ray workers and SuperNodes: JSON in the Flower message
    back = config_from_json(config_to_json(cfg))
    assert back == cfg and back.model.name == f"{user_model}:build" and back.model.cut == "1"
    # the saved run config
    saved = _write(tmp_path, "saved.toml", to_toml(cfg))
    assert load_experiment(str(saved)) == cfg
    assert hash(cfg) == hash(back)  # a frozen config stays hashable with a table inside
    assert cfg != dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, options={"hidden": 8}))
    with pytest.raises(ConfigError, match="model.options must be"):
        from_dict(ExperimentConfig, {"model": {"options": 3}})


def test_the_config_refuses_what_cannot_resolve(user_model, tmp_path):
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'vgg'; choose one of \[.*'cnn'"):
        load_experiment("quickstart", ["model.name=vgg"])
    with pytest.raises(ConfigError, match="model.name: 'nosuch.module:build': cannot import"):
        load_experiment("quickstart", ['model.name="nosuch.module:build"'])
    with pytest.raises(ConfigError, match="data.name: unknown dataset 'mnist6k'"):
        load_experiment("quickstart", ["data.name=mnist6k"])
    with pytest.raises(ConfigError, match="data.name: .*no file"):
        load_experiment("quickstart", [f'data.name="{tmp_path}/nope.py:load"'])
    # a plug-in declares no cut: a split mode must name one, fl and central need none
    plugin = [f'model.name="{user_model}:build"', 'model.cut=""']  # (the quickstart names the CNN's cut)
    with pytest.raises(ConfigError, match="model.cut: .* declares no default cut"):
        load_experiment("quickstart", plugin)
    assert load_experiment("quickstart", [*plugin, "mode=fl"]).model.cut == ""
    with pytest.raises(ConfigError, match="model.top_cut"):
        load_experiment("quickstart", [*plugin, 'model.cut="1"', "mode=ushaped"])


def test_zoo_cuts_keep_their_checks_and_graph_models_take_module_paths():
    with pytest.raises(ConfigError, match=r"model.cut: cnn can be cut at \['conv1', 'conv2', 'fc1'\], not 'conv9'"):
        ModelConfig(name="cnn", cut="conv9")
    m = ModelConfig(name="bert")
    assert (m.cut, m.top_cut, m.norm) == ("bert.encoder.layer.1", "bert.encoder.layer.2", "")
    assert ModelConfig(name="bert", cut="bert.encoder.layer.3").cut == "bert.encoder.layer.3"  # the splitter checks it
    with pytest.raises(ConfigError, match="no norm choice"):
        ModelConfig(name="regnet", norm="group")
    assert ModelConfig(name="regnet", exits=True).exits  # graph-split classifiers carry exits (test_graph_exits.py)
    with pytest.raises(ConfigError, match="exit classifiers need a classification model"):
        ModelConfig(name="gpt2", exits=True)
    with pytest.raises(ConfigError, match="deeper"):
        ModelConfig(name="gpt2", ushaped=True, cut="transformer.h.1", top_cut="transformer.h.1")


def test_decorators_fill_the_registries(tmp_path):
    f = _write(
        tmp_path,
        "registered.py",
        """
        from torch import nn
        from fsl.data import register_dataset, load_dataset
        from fsl.models import register_model

        @register_model("tiny-test-mlp", input_shape=(1, 8, 8), cuts=("0", "1"), default_cut="1", graph=True)
        def tiny(input_shape=(1, 8, 8), num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Linear(16, num_classes))

        @register_dataset("tiny-test-digits")
        def digits(path=None, limit=100):
            from fsl.data import subset
            return subset(load_dataset("digits"), limit, 0, 0)
        """,
    )
    try:
        build = resolve(f"{f}:tiny")
        assert MODELS["tiny-test-mlp"].build is build and "tiny-test-digits" in DATASETS
        # through the import string the declared spec comes along
        spec = model_spec(f"{f}:tiny")
        assert spec.cuts == ("0", "1") and spec.default_cut == "1" and spec.input_shape == (1, 8, 8)
        assert ModelConfig(name=f"{f}:tiny").cut == "1"
        assert ModelConfig(name="tiny-test-mlp").cut == "1"
        assert load_dataset("tiny-test-digits", options={"limit": 50}).y_train.shape == (50,)
        with pytest.raises(ValueError, match="already registered"):
            register_model("cnn", input_shape=(1, 8, 8), cuts=("a",))(lambda: nn.Linear(1, 1))
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("digits")(lambda path=None: None)
    finally:
        MODELS.pop("tiny-test-mlp", None)
        DATASETS.pop("tiny-test-digits", None)


def test_a_plugin_loader_gets_its_options_and_path(tmp_path):
    f = _write(
        tmp_path,
        "loader.py",
        """
        import torch
        from fsl.data import Dataset

        def load(path=None, n=20):
            x = torch.rand(n, 1, 4, 4)
            y = torch.arange(n) % 2
            return Dataset(f"toy:{path}", x, y, x[:4], y[:4], 2)

        def no_path(n=20):
            return load(n=n)

        def wrong():
            return (1, 2)
        """,
    )
    ds = load_dataset(f"{f}:load", "/some/where", {"n": 10})
    assert ds.name == "toy:/some/where" and ds.y_train.shape == (10,)
    assert load_dataset(f"{f}:load", "/some/where", {"n": 10}) is ds  # cached on name, path and options
    with pytest.raises(ValueError, match="takes no path"):
        load_dataset(f"{f}:no_path", "/x")
    with pytest.raises(ValueError, match=r"unknown \[data.options\] \['m'\]; it takes \['n'\]"):
        load_dataset(f"{f}:load", None, {"m": 1})
    with pytest.raises(TypeError, match="returned a tuple"):
        load_dataset(f"{f}:wrong")


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cats", 5), ("dogs", 5), ("owls", 10)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            pixels = (rng.random((12, 9, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "notes.txt").write_text("not a class")
    ds = load_dataset("imagefolder", str(tmp_path), {"size": [6, 5], "test_fraction": 0.2})
    assert ds.classes == ("cats", "dogs", "owls") and ds.num_classes == 3
    assert ds.input_shape == (3, 6, 5) and ds.x_train.dtype == torch.float32
    assert 0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1
    assert np.bincount(ds.y_test.numpy()).tolist() == [1, 1, 2] and len(ds.y_train) == 16
    gray = load_dataset("imagefolder", str(tmp_path), {"size": 4, "channels": 1})
    assert gray.input_shape == (1, 4, 4) and torch.equal(gray.y_test, ds.y_test)  # the same split
    with pytest.raises(DatasetNotFound, match="set it"):
        load_dataset("imagefolder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="holds no pictures"):
        load_dataset("imagefolder", str(tmp_path), {"size": 4})


def test_the_example_user_model_and_data_load_through_the_plugin_path(monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's file paths are relative to the repository root
    cfg = load_experiment(str(EXAMPLE))
    assert cfg.model.name == "examples/custom_model/my_model.py:build" and cfg.model.cut == "block1"
    ds = load_dataset(cfg.data.name, cfg.data.path or None, cfg.data.options)
    assert isinstance(ds, Dataset) and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797 and abs(len(ds.y_test) - 360) <= 5
    model = build_module(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.seed, options=cfg.model.options)
    assert not isinstance(model, nn.Sequential)  # a real forward() with a skip connection
    assert cfg.model.cut in dict(model.named_modules())
    assert model.block1[0].out_channels == cfg.model.options["width"]
    logits = run_model(model.eval(), ds.x_test[:5])
    assert logits.shape == (5, 10)
    twin = build_module(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.seed, options=cfg.model.options)
    torch.testing.assert_close(run_model(twin.eval(), ds.x_test[:5]), logits, rtol=0, atol=0)
    # the trip to the clients keeps the plug-in names and options
    assert config_from_json(config_to_json(cfg)) == cfg
    with pytest.raises(ValueError, match="split by its graph"):
        build_model(cfg.model.name)
