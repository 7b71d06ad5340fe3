"""The Hugging Face zoo: every model builds from its config (no download), runs a tiny batch, is
seeded, keeps Hugging Face parameter names, and declares cuts that are real module paths."""

import subprocess
import sys

import pytest
import torch

from fsl.models import MODELS, build_model, build_module, logits_of, model_spec, run_model
from fsl.zoo_hf import minilm_dir

HF = sorted(n for n, spec in MODELS.items() if spec.requires == "hf")
TINY = {"bert": {"hidden_size": 32, "num_layers": 3, "num_heads": 2}}  # the rest are small already


def _inputs(name, batch=2, length=12):
    spec = model_spec(name)
    g = torch.Generator().manual_seed(1)
    if spec.input_kind == "image":
        return torch.rand(batch, *spec.input_shape, generator=g)
    ids = torch.randint(1000, 2000, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length // 2 :] = 0  # one padded sequence: the mask must matter
    ids[0, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_the_zoo_holds_the_promised_models():
    assert set(HF) == {"regnet", "hf-resnet", "mobilenet", "bert", "gpt2", "gpt2-classify", "minilm"}
    for name in HF:
        spec = MODELS[name]
        assert spec.graph and spec.default_cut in spec.cuts and spec.task in ("classify", "causal-lm")
    assert MODELS["gpt2"].task == "causal-lm" and MODELS["bert"].input_kind == "tokens"
    assert MODELS["regnet"].default_cut == "regnet.encoder.stages.1"


@pytest.mark.parametrize("name", HF)
def test_each_model_builds_runs_and_is_seeded(name):
    spec = model_spec(name)
    num_classes = 5
    a = build_module(name, num_classes=num_classes, seed=3, options=TINY.get(name)).eval()
    b = build_module(name, num_classes=num_classes, seed=3, options=TINY.get(name)).eval()
    x = _inputs(name)
    with torch.no_grad():
        out = a(**x) if isinstance(x, dict) else a(x)
        logits = logits_of(out)
        torch.testing.assert_close(run_model(b, x), logits, rtol=0, atol=0)  # same seed, same weights
    assert hasattr(out, "logits")  # a Hugging Face ModelOutput: the splitter reads .logits
    if spec.task == "causal-lm":
        assert logits.shape == (2, 12, 30522)
    else:
        assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    modules = dict(a.named_modules())
    assert all(c in modules for c in spec.cuts), [c for c in spec.cuts if c not in modules]
    # Hugging Face's own parameter names, no wrapper prefix
    root = spec.default_cut.split(".")[0]
    assert any(n.startswith(root + ".") for n, _ in a.named_parameters())


def test_another_seed_gives_other_weights_and_the_global_rng_is_untouched():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = build_module("regnet", seed=1)
    after = torch.rand(1)
    b = build_module("regnet", seed=2)
    assert before == after
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)


def test_image_models_take_rgb_and_other_sizes():
    for name in ("regnet", "hf-resnet", "mobilenet"):
        m = build_module(name, input_shape=(3, 32, 32), num_classes=7, seed=0).eval()
        with torch.no_grad():
            assert run_model(m, torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_module("regnet", input_shape=(64,))


def test_attention_mask_hides_padding():
    m = build_module("bert", num_classes=3, seed=0, options=TINY["bert"]).eval()
    x = _inputs("bert")
    changed = {k: v.clone() for k, v in x.items()}
    changed["input_ids"][0, 8:] = 1500  # tokens under the mask
    with torch.no_grad():
        torch.testing.assert_close(run_model(m, x)[0], run_model(m, changed)[0])


def test_options_reach_the_config_and_typos_are_refused():
    m = build_module("bert", seed=0, options={"hidden_size": 32, "num_layers": 2, "num_heads": 2})
    assert m.config.hidden_size == 32 and len(m.bert.encoder.layer) == 2
    m = build_module("gpt2", seed=0, options={"num_layers": 2, "resid_pdrop": 0.0})
    assert m.config.resid_pdrop == 0.0 and not m.config.use_cache and len(m.transformer.h) == 2
    with pytest.raises(ValueError, match="hiden_size"):
        build_module("bert", options={"hiden_size": 32})
    with pytest.raises(ValueError, match="come from the data"):
        build_module("bert", options={"num_classes": 3})
    with pytest.raises(ValueError, match="no norm choice"):
        build_module("regnet", norm="group")
    with pytest.raises(ValueError, match="use build_module"):
        build_model("regnet")


def test_minilm_loads_the_pretrained_weights_offline():
    from safetensors.torch import load_file

    folder = minilm_dir()
    saved = load_file(str(folder / "model.safetensors"))
    a = build_module("minilm", num_classes=4, seed=0)
    b = build_module("minilm", num_classes=4, seed=0)
    assert a.training and a.config.num_labels == 4 and a.config.num_hidden_layers == 6
    state = a.state_dict()
    key = next(k for k in saved if k.endswith("encoder.layer.0.attention.self.query.weight"))
    torch.testing.assert_close(state["bert." + key.removeprefix("bert.")], saved[key])
    # the fresh head is seeded like everything else
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight, rtol=0, atol=0)


def test_minilm_never_touches_the_network():
    # a child process with the hub unreachable: HF_ENDPOINT points nowhere
    code = (
        "import os; os.environ['HF_ENDPOINT'] = 'http://127.0.0.1:9'\n"
        "from fsl.models import build_module\n"
        "m = build_module('minilm', num_classes=2, seed=0)\n"
        "print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "BertForSequenceClassification"


def test_the_cnn_path_does_not_import_transformers():
    code = (
        "import sys\n"
        "from fsl.models import build_model\n"
        "from fsl.config import load_experiment\n"
        "from fsl.data import load_dataset\n"
        "build_model('cnn', seed=0); load_experiment('quickstart'); load_dataset('digits')\n"
        "print(sorted(m for m in ('transformers', 'tokenizers', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
