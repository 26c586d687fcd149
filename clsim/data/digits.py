"""scikit-learn's bundled 8x8 digits: the embedded default that needs no download.

1797 samples with values 0..16, stored as uint8 (N, 1, 8, 8) with ``scale=1/16``; mean
and std are the train split's. The
train/test split is stratified and seeded by a constant through a fixed hash (see
:func:`clsim.data.npz.stratified_split`), so it is the same on every machine and version.
"""

from __future__ import annotations

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.data.npz import stratified_split
from clsim.errors import DataError

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 20240229  # fixed for ever: changing it changes every digits result
DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
# pixel mean and std after scaling, measured on the train split
DIGITS_MEAN = 0.3049
DIGITS_STD = 0.3758


def load_digits() -> Dataset:
    """The 1797 8x8 digits, 25% of each class held out for test."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from exc
    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.min() < 0 or images.max() > 16:
        raise DataError("scikit-learn's digits have values outside 0..16; unexpected version")
    x = images.astype(np.uint8).reshape(-1, 1, 8, 8)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x[train_idx])),
        y_train=torch.from_numpy(labels[train_idx]),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test_idx])),
        y_test=torch.from_numpy(labels[test_idx]),
        class_names=DIGITS_CLASSES,
        scale=1.0 / 16.0,
        mean=(DIGITS_MEAN,),
        std=(DIGITS_STD,),
        source="sklearn.datasets.load_digits",
    )
