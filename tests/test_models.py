import pytest
import torch

from fsl.models import MODELS, build_model, cut_points, cut_shape, join_segments, split_model

SEQUENTIAL = sorted(n for n, spec in MODELS.items() if not spec.graph)  # graph-split models: test_zoo_hf


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_every_cut_splits_into_segments_that_compose_to_the_model(name):
    spec = MODELS[name]
    model = build_model(name, seed=0).eval()
    x = torch.rand(3, *spec.input_shape)
    full = model(x)
    assert len(cut_points(name)) >= 3
    for cut in cut_points(name):
        s = split_model(model, cut)
        h = s.client(x)
        assert tuple(h.shape[1:]) == cut_shape(s.client, spec.input_shape)
        torch.testing.assert_close(s.server(h), full)
        torch.testing.assert_close(join_segments(s.client, s.server)(x), full)
        # segments share the model's parameters and keep its state-dict keys
        keys = set(s.client.state_dict()) | set(s.server.state_dict())
        assert keys == set(model.state_dict())
        assert not set(s.client.state_dict()) & set(s.server.state_dict())


def test_deeper_cuts_keep_more_parameters_on_the_client():
    model = build_model("cnn")
    sizes = [sum(p.numel() for p in split_model(model, c).client.parameters()) for c in cut_points("cnn")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_bad_cuts_are_explained():
    model = build_model("cnn")
    with pytest.raises(ValueError, match="unknown cut 'conv9'"):
        split_model(model, "conv9")
    with pytest.raises(ValueError, match="server segment would be empty"):
        split_model(model, "fc2")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cnn", seed=7)
    after = torch.rand(1)
    b = build_model("cnn", seed=7)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_cnn_adapts_to_small_inputs():
    m = build_model("cnn", input_shape=(1, 8, 8))
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)
