"""Dataset names -> loaders, and where on disk each dataset lives under the data root.

Layout under the data root (``data.root`` in a scenario, else ``$CLSIM_DATA``)::

    mnist/           the four idx files (gzip or not)
    fashion-mnist/   the same four file names
    cifar10/         cifar10-jpeg.zip (or any one .zip), or extracted train/ and test/
    cifar100/        train, test, meta pickles (or a cifar-100-python/ folder of them)
    omniglot/        images_background_small1.zip and images_background_small2.zip

``digits`` is bundled with scikit-learn and needs no root; ``npz`` takes ``path=``.
Every loader in :data:`DATASETS` is called as ``loader(root, **options)``.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

from clsim.data.cifar100 import CIFAR100_SUBFOLDER, load_cifar100
from clsim.data.dataset import Dataset
from clsim.data.digits import load_digits
from clsim.data.guards import data_folder, present
from clsim.data.idx import load_fashion_mnist, load_mnist
from clsim.data.images import load_cifar10
from clsim.data.npz import load_npz
from clsim.data.omniglot import OMNIGLOT_SUBFOLDER, load_omniglot
from clsim.errors import ConfigError, DataError

DATA_ENV = "CLSIM_DATA"

Loader = Callable[..., Dataset]
PathArg = str | os.PathLike[str] | None


def resolve_data_root(root: str | os.PathLike[str] | None) -> Path:
    """The data root: ``root`` if given, else ``$CLSIM_DATA``; it must be a folder."""
    if root is not None and str(root) != "":
        path, origin = Path(root).expanduser(), "data root"
    elif os.environ.get(DATA_ENV):
        path, origin = Path(os.environ[DATA_ENV]).expanduser(), f"data root (from ${DATA_ENV})"
    else:
        raise DataError(
            f"no data root: set data.root in the scenario or the {DATA_ENV} environment "
            "variable to the folder holding mnist/, fashion-mnist/, cifar10/, cifar100/, omniglot/"
        )
    if present(path) and not path.is_dir():
        data_folder(path, origin)  # names what it is: a file, a pipe, a link loop...
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"{origin} {path} {state} (expected a folder holding mnist/, fashion-mnist/, "
            "cifar10/, cifar100/)"
        )
    return path


def _folder(root: PathArg, *names: str) -> Path:
    """The first of ``names`` present under the data root, else the first (for the error)."""
    base = resolve_data_root(root)
    for name in names:
        if present(base / name):
            return base / name
    return base / names[0]


def _digits(root: PathArg) -> Dataset:
    return load_digits()


def _mnist(root: PathArg) -> Dataset:
    return load_mnist(_folder(root, "mnist"))


def _fashion_mnist(root: PathArg) -> Dataset:
    return load_fashion_mnist(_folder(root, "fashion-mnist", "fashion_mnist"))


def _cifar10(
    root: PathArg, *, cache: bool = True, cache_dir: str | os.PathLike[str] | None = None
) -> Dataset:
    return load_cifar10(_folder(root, "cifar10", "cifar-10"), cache=cache, cache_dir=cache_dir)


def _cifar100(root: PathArg) -> Dataset:
    return load_cifar100(_folder(root, "cifar100", CIFAR100_SUBFOLDER))


def _omniglot(root: PathArg, *, size: int = 28, test_per_class: int = 5, seed: int = 0) -> Dataset:
    return load_omniglot(
        _folder(root, OMNIGLOT_SUBFOLDER), size=size, test_per_class=test_per_class, seed=seed
    )


def _npz(
    root: PathArg,
    *,
    path: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    if path is None or str(path) == "":
        raise ConfigError("dataset 'npz' needs the file's path (data.path in the scenario)")
    file = Path(path).expanduser()
    if not file.is_absolute() and root is not None and str(root) != "":
        file = Path(root).expanduser() / file
    return load_npz(file, test_fraction=test_fraction, seed=seed, name=name)


DATASETS: dict[str, Loader] = {
    "digits": _digits,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "omniglot": _omniglot,
    "npz": _npz,
}


def dataset_names() -> tuple[str, ...]:
    """The names :func:`load_dataset` accepts."""
    return tuple(DATASETS)


def _lookup(name: str) -> Loader:
    key = name.strip().lower().replace("-", "_")
    if key in DATASETS:
        return DATASETS[key]
    known = ", ".join(DATASETS)
    close = difflib.get_close_matches(key, DATASETS, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown dataset {name!r}{hint}; known datasets: {known}")


def load_dataset(
    name: str, *, root: str | os.PathLike[str] | None = None, **options: object
) -> Dataset:
    """Load dataset ``name`` from under ``root`` (else ``$CLSIM_DATA``).

    ``options`` go to the loader: ``path``, ``test_fraction``, ``seed``, ``name`` for npz;
    ``cache`` and ``cache_dir`` for cifar10; ``size``, ``test_per_class``, ``seed`` for
    omniglot. A relative npz ``path`` is taken relative to ``root`` when a root is given,
    else to the working directory.
    """
    loader = _lookup(name)
    signature = inspect.signature(loader)
    try:
        signature.bind(root, **options)
    except TypeError:
        accepted = [p for p in signature.parameters if p != "root"]
        unknown = ", ".join(sorted(set(options) - set(accepted)))
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
        raise ConfigError(f"dataset {name!r} {takes}; got unknown option(s) {unknown}") from None
    return loader(root, **options)
