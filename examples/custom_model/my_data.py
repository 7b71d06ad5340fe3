"""A user's own dataset loader, defined outside the library.

It returns an ``fsl.data.Dataset``: float32 images (N, C, H, W) in [0, 1] and int64 labels, split
into train and test. Here: scikit-learn's handwritten digits (8x8, 1,797 images, shipped in the
scikit-learn wheel), split per class with ``test_fraction`` held out, the same way for a ``seed``.
The keyword arguments come from ``[data.options]``.
"""

from __future__ import annotations

import numpy as np
import torch

from fsl.data import Dataset


def load(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(len(idx) * test_fraction)]] = True
    return Dataset(
        name="my-digits",
        x_train=torch.from_numpy(x[~test]),
        y_train=torch.from_numpy(y[~test]),
        x_test=torch.from_numpy(x[test]),
        y_test=torch.from_numpy(y[test]),
        num_classes=10,
        classes=tuple(str(d) for d in range(10)),
    )
