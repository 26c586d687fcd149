"""Avalanche interop: its benchmarks as clsim streams, and clsim streams as its benchmarks.

avalanche-lib (https://avalanche.continualai.org) is optional: it needs torchvision, so
it lives in its own environment (``make venv-avalanche``, see DEVELOPERS.md). Importing
this module does not import it; each function does on first use and, when it is missing,
raises :class:`AvalancheMissing` saying how to get it.

Two directions:

* :func:`stream_from_avalanche` turns a benchmark (its ``train_stream`` and
  ``test_stream``, one test experience per training experience) into a clsim
  :class:`~clsim.stream.Stream`. Given the clsim dataset the benchmark was built over
  (:func:`avalanche_datasets`), samples are taken from that dataset by index, so they
  stay at their raw dtype (the ledger charges exemplars their real bytes). For any other
  benchmark (``SplitMNIST`` over a local root, say), the samples are read through
  Avalanche's own data loading, as the transformed float tensors it yields, into a new
  :class:`~clsim.data.Dataset` whose ``to_input`` is the identity.
* :func:`benchmark_from_stream` turns a clsim stream into an Avalanche benchmark with the
  same experiences, sample for sample, for running Avalanche's strategies as a peer.

The YAML stream type ``avalanche`` (:mod:`clsim.streams.avalanche`) builds a benchmark
with one of Avalanche's generators (:data:`GENERATORS`) over the scenario's clsim dataset
and converts it back with these functions.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from clsim.data.dataset import Dataset
from clsim.errors import ConfigError, OptionError
from clsim.stream import Experience, Stream

INDEX_ATTRIBUTE = "clsim_index"  # the Avalanche data attribute holding clsim sample ids
INSTALL_HINT = (
    "avalanche-lib is not installed in this environment; it needs torchvision, so clsim "
    "keeps it in a separate one: run `make venv-avalanche` and use .venv-avalanche/bin/clsim "
    "(DEVELOPERS.md explains why)"
)

# Avalanche's generators that split datasets handed to them (clsim passes its own)
GENERATORS = {
    "class_incremental_benchmark": "avalanche.benchmarks.scenarios.supervised",
    "new_instances_benchmark": "avalanche.benchmarks.scenarios.supervised",
}


class AvalancheMissing(ConfigError):
    """avalanche-lib cannot be imported here."""


def import_avalanche() -> ModuleType:
    """The ``avalanche`` package, or :class:`AvalancheMissing` with the way to get it."""
    try:
        return importlib.import_module("avalanche")
    except ImportError as exc:
        raise AvalancheMissing(f"{INSTALL_HINT} ({exc})") from None


# ---------------------------------------------------------------------------
# clsim -> Avalanche
# ---------------------------------------------------------------------------


def tensor_dataset(x: torch.Tensor, y: torch.Tensor, task_label: int = 0,
                   index: torch.Tensor | None = None) -> Any:
    """An Avalanche classification dataset over tensors ``x`` and labels ``y``, all with
    ``task_label``; ``index`` (one id per sample) rides along as a data attribute, which
    Avalanche keeps through its subsets and concatenations."""
    import_avalanche()
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )

    data = _make_taskaware_tensor_classification_dataset(
        x, y, targets=y.tolist(), task_labels=task_label
    )
    if index is not None:
        data = data.update_data_attribute(INDEX_ATTRIBUTE, index.tolist())
    return data


def avalanche_datasets(dataset: Dataset) -> dict[str, Any]:
    """``{"train": ..., "test": ...}``: the clsim dataset's raw samples as Avalanche
    datasets, each sample carrying its clsim index (test ids offset by the train size)."""
    n_train = int(dataset.y_train.shape[0])
    n_test = int(dataset.y_test.shape[0])
    return {
        "train": tensor_dataset(dataset.x_train, dataset.y_train, index=torch.arange(n_train)),
        "test": tensor_dataset(
            dataset.x_test, dataset.y_test, index=torch.arange(n_train, n_train + n_test)
        ),
    }


def benchmark_from_stream(stream: Stream, dataset: Dataset, *, as_input: bool = True) -> Any:
    """An Avalanche benchmark with ``stream``'s experiences, sample for sample and in
    order: training and test data of experience i in experience i of ``train_stream`` /
    ``test_stream``, with classes timelines. ``as_input`` converts samples to the model's
    float input (``dataset.to_input``), as Avalanche's strategies feed samples to the
    model unchanged; otherwise they stay raw."""
    import_avalanche()
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline

    def convert(x: torch.Tensor, y: torch.Tensor, task: int | None) -> Any:
        return tensor_dataset(dataset.to_input(x) if as_input else x, y, task or 0)

    return with_classes_timeline(benchmark_from_datasets(
        train=[convert(e.train_x, e.train_y, e.task_id) for e in stream],
        test=[convert(e.test_x, e.test_y, e.task_id) for e in stream],
    ))


# ---------------------------------------------------------------------------
# Avalanche -> clsim
# ---------------------------------------------------------------------------


def stream_from_avalanche(benchmark: Any, source: Dataset | None = None, *,
                          name: str = "avalanche", batch_size: int = 1024) -> Stream:
    """A clsim stream with ``benchmark``'s experiences, in order.

    With ``source`` (the clsim dataset that :func:`avalanche_datasets` handed to the
    benchmark's generator), samples are taken from it by their ``clsim_index``: raw, and
    in the benchmark's order. Without it, they are read through Avalanche's data loading
    (eval transforms), and :func:`dataset_from_stream` gives the matching dataset.
    Task labels become task ids when the benchmark has more than one.
    """
    import_avalanche()
    train, test = benchmark.train_stream, benchmark.test_stream
    if len(test) != len(train):
        raise ValueError(
            f"benchmark {name!r} has {len(train)} training and {len(test)} test experiences; "
            "clsim pairs them one to one (test experience i tests training experience i)"
        )
    n_train = 0 if source is None else int(source.y_train.shape[0])
    read = ((lambda data: _by_index(data, source, n_train)) if source is not None
            else (lambda data: _materialise(data, batch_size)))
    experiences, tasks = [], set()
    for index, (train_exp, test_exp) in enumerate(zip(train, test, strict=True)):
        train_x, train_y, train_t = read(train_exp.dataset)
        test_x, test_y, _ = read(test_exp.dataset)
        tasks.update(train_t.unique().tolist())
        experiences.append(Experience(
            index=index,
            classes=tuple(dict.fromkeys(train_y.tolist())),
            train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
            task_id=int(train_t[0]) if len(train_t) else None,
        ))
    if len(tasks) <= 1:  # one task label: a class-incremental benchmark, ids hidden
        experiences = [_without_task(e) for e in experiences]
    labels = torch.cat([torch.cat([e.train_y, e.test_y]) for e in experiences])
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if source is not None:
        n_classes = max(n_classes, source.n_classes)
    order = tuple(dict.fromkeys(c for e in experiences for c in e.classes))
    return Stream(
        experiences=tuple(experiences),
        n_classes=n_classes,
        class_order=order,
        task_labels=len(tasks) > 1,
        description={"source": "avalanche", "benchmark": name},
    )


def dataset_from_stream(stream: Stream, *, name: str = "avalanche",
                        class_names: tuple[str, ...] | None = None) -> Dataset:
    """The clsim dataset of a stream read through Avalanche's data loading: every
    sample as Avalanche yields it (already the model's input, so ``to_input`` only
    converts to float32)."""
    exps = stream.experiences
    return Dataset(
        name=name,
        x_train=torch.cat([e.train_x for e in exps]),
        y_train=torch.cat([e.train_y for e in exps]),
        x_test=torch.cat([e.test_x for e in exps]),
        y_test=torch.cat([e.test_y for e in exps]),
        class_names=class_names or tuple(str(c) for c in range(stream.n_classes)),
        source="avalanche",
    )


def _by_index(data: Any, source: Dataset, n_train: int):
    """Raw samples, labels and task labels of an Avalanche dataset built over ``source``."""
    if not hasattr(data, INDEX_ATTRIBUTE):
        raise ValueError(
            f"an experience's dataset has no '{INDEX_ATTRIBUTE}' attribute: build the "
            "benchmark over clsim.interop.avalanche.avalanche_datasets(dataset), or pass "
            "no source to read samples through Avalanche's data loading"
        )
    index = torch.tensor(list(getattr(data, INDEX_ATTRIBUTE)), dtype=torch.long)
    is_test = index >= n_train
    if len(index) and bool(is_test.any()) != bool(is_test.all()):
        raise ValueError("an experience mixes clsim training and test samples")
    if len(index) and bool(is_test[0]):
        x, y = source.x_test[index - n_train], source.y_test[index - n_train]
    else:
        x, y = source.x_train[index], source.y_train[index]
    targets = torch.tensor(list(data.targets), dtype=torch.long)
    if not torch.equal(targets, y):
        raise ValueError("an experience's targets differ from the clsim dataset's labels")
    return x, y, _task_labels(data, len(y))


def _materialise(data: Any, batch_size: int):
    """Every sample of an Avalanche dataset, read in order through its data loading."""
    from torch.utils.data import DataLoader

    data = data.eval()
    xs, ys, ts = [], [], []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x, y = batch[0], batch[1]
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y, dtype=torch.long))
        ts.append(torch.as_tensor(batch[-1], dtype=torch.long) if len(batch) > 2
                  else torch.zeros(len(y), dtype=torch.long))
    if not xs:
        raise ValueError("an experience of the benchmark is empty")
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def _task_labels(data: Any, n: int) -> torch.Tensor:
    labels = getattr(data, "targets_task_labels", None)
    if labels is None:
        return torch.zeros(n, dtype=torch.long)
    return torch.tensor(list(labels), dtype=torch.long)


def _without_task(exp: Experience) -> Experience:
    from dataclasses import replace

    return replace(exp, task_id=None)


# ---------------------------------------------------------------------------
# Avalanche's strategies, run directly (the peer a clsim run is checked against)
# ---------------------------------------------------------------------------

STRATEGY_MODULE = "avalanche.training.supervised"


def avalanche_strategy(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                       batch_size: int, epochs: int, device: torch.device | str = "cpu",
                       **options: Any) -> Any:
    """Avalanche's strategy ``name`` (``Naive``, ``Replay``, ``LwF``, ``EWC``, ``ICaRL``,
    ``GDumb``...) on ``model``, with cross-entropy, Avalanche's defaults for what
    ``options`` leaves out, and an evaluator with no logger (silent)."""
    import_avalanche()
    from avalanche.training.plugins import EvaluationPlugin

    module = importlib.import_module(STRATEGY_MODULE)
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        known = sorted(n for n in dir(module) if n[:1].isupper())
        raise OptionError("strategy", f"Avalanche has no strategy {name!r} in "
                          f"{STRATEGY_MODULE} (it has {', '.join(known)})")
    kwargs: dict[str, Any] = dict(
        train_mb_size=batch_size, train_epochs=epochs, eval_mb_size=1024, device=device,
        evaluator=EvaluationPlugin(loggers=[]), **options,
    )
    if name == "ICaRL":  # iCaRL takes the feature extractor and classifier separately
        kwargs.update(feature_extractor=model.features, classifier=model.head)
    else:
        kwargs.update(model=model, criterion=torch.nn.CrossEntropyLoss())
    try:
        return cls(optimizer=optimizer, **kwargs)
    except TypeError as exc:
        raise OptionError("options", f"Avalanche's {name} rejected its options: {exc}") from None


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Argmax predictions of ``model`` (in eval mode) on model inputs ``x``."""
    model.eval()
    parts = [model(x[i : i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def run_avalanche(strategy: Any, stream: Stream, dataset: Dataset, *, seed: int):
    """Train ``strategy`` on ``stream`` experience by experience, as Avalanche's own
    ``train`` does, and evaluate its model after each on every test set; the
    :class:`clsim.metrics.AccuracyMatrix` of the run (clsim's scores apply to it)."""
    from clsim.metrics import from_predictions

    benchmark = benchmark_from_stream(stream, dataset)
    inputs = [dataset.to_input(e.test_x) for e in stream]
    rows = []
    torch.manual_seed(seed)  # Avalanche shuffles with torch's global generator
    for experience in benchmark.train_stream:
        strategy.train(experience)
        rows.append([predict(strategy.model, x).numpy() for x in inputs])
    return from_predictions(rows, [e.test_y.numpy() for e in stream])
