"""Avalanche's classic benchmarks named in YAML (scenarios/extra/avalanche_split_mnist.yaml),
against the real avalanche-lib (run in .venv-avalanche by `make test`): clsim's stream
holds Avalanche's experiences sample for sample, a run from the YAML goes through `clsim
run`, and local files that torchvision would have to download are named, never fetched.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import REPO_ROOT, run_cli

from clsim.assembly import build_stream, load_scenario_data
from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.errors import ConfigError
from clsim.interop.avalanche_classic import arranged_root, checked_root, missing_files

SCENARIO = REPO_ROOT / "scenarios" / "extra" / "avalanche_split_mnist.yaml"
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


def scenario_from(text: str, path) -> object:
    path.write_text(text)
    return parse_scenario(text, source=str(path), base_dir=str(path.parent))


def line_of(text: str, prefix: str) -> int:
    return next(i for i, t in enumerate(text.splitlines(), 1) if t.strip().startswith(prefix))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data_root):
    """A fresh $CLSIM_CACHE: clsim unpacks MNIST there once for the whole module."""
    path = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("CLSIM_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def split_mnist(cache):
    """The shipped scenario's dataset and stream, and Avalanche's SplitMNIST built directly
    (n_experiences 5, seed 0) over the folder clsim arranged."""
    from avalanche.benchmarks.classic import SplitMNIST

    scenario = parse_scenario(SCENARIO.read_text(), source=str(SCENARIO),
                              base_dir=str(SCENARIO.parent))
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    with torch.random.fork_rng(devices=[]):
        theirs = SplitMNIST(n_experiences=5, seed=0,
                            dataset_root=arranged_root("SplitMNIST", None))
    return dataset, stream, theirs


def read_all(data) -> tuple[torch.Tensor, torch.Tensor]:
    """An Avalanche dataset's samples and labels, as its eval-mode loading yields them."""
    from torch.utils.data import DataLoader

    batches = list(DataLoader(data.eval(), batch_size=4096, shuffle=False))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_the_stream_holds_avalanches_experiences_exactly(split_mnist) -> None:
    """Experience by experience, train and test: the same float samples (bit for bit),
    the same labels in the same order, the classes Avalanche put there; the class order
    and the class count are Avalanche's; task ids hidden (one task label)."""
    _, stream, theirs = split_mnist
    assert len(stream) == 5
    assert list(stream.class_order) == list(theirs.classes_order)
    assert stream.n_classes == theirs.n_classes == 10
    for ours, train, test in zip(stream, theirs.train_stream, theirs.test_stream, strict=True):
        assert sorted(ours.classes) == sorted(train.classes_in_this_experience)
        assert ours.task_id is None
        for (x, y), data in (((ours.train_x, ours.train_y), train.dataset),
                             ((ours.test_x, ours.test_y), test.dataset)):
            their_x, their_y = read_all(data)
            assert x.dtype == torch.float32 and torch.equal(x, their_x)
            assert torch.equal(y, their_y.long())


def test_the_data_is_mnist_normalised_as_avalanche_does(split_mnist, shared_data_root) -> None:
    """The dataset is the whole benchmark: 60,000 + 10,000 float samples of shape
    (1, 28, 28). In each experience, the samples of each of its classes are exactly
    clsim's own MNIST samples of that class, in the files' order, put through Avalanche's
    transform (x / 255, then Normalize((0.1307,), (0.3081,))), bit for bit."""
    dataset, stream, _ = split_mnist
    mnist = load_dataset("mnist", root=shared_data_root)
    assert (dataset.name, dataset.sample_shape, dataset.x_train.dtype) == (
        "SplitMNIST", (1, 28, 28), torch.float32)
    assert (len(dataset.y_train), len(dataset.y_test), dataset.sample_bytes) == (
        60_000, 10_000, 28 * 28 * 4)
    for exp in stream:
        assert set(exp.train_y.tolist()) == set(exp.test_y.tolist()) == set(exp.classes)
        for c in exp.classes:
            for ours_x, ours_y, raw_x, raw_y in (
                    (exp.train_x, exp.train_y, mnist.x_train, mnist.y_train),
                    (exp.test_x, exp.test_y, mnist.x_test, mnist.y_test)):
                raw = raw_x[raw_y == c].float() / 255.0
                assert torch.equal(ours_x[ours_y == c], (raw - 0.1307) / 0.3081), c
    # the experiences are views into the dataset: the samples are in memory once
    assert stream[0].train_x.untyped_storage().data_ptr() == \
        dataset.x_train.untyped_storage().data_ptr()


def test_clsim_run_from_the_yaml(cache, tmp_path) -> None:
    """`clsim run` on the shipped YAML (--limit 64): exit 0; per strategy a 5 x 5 accuracy
    matrix; the class order, the data description and the stored exemplar size are those
    of Avalanche's SplitMNIST (float32 samples of 3,136 bytes)."""
    from avalanche.benchmarks.classic import SplitMNIST

    out = tmp_path / "run"
    result = run_cli("run", str(SCENARIO), "--limit", "64", "--out", str(out),
                     env={"CLSIM_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    with torch.random.fork_rng(devices=[]):
        theirs = SplitMNIST(n_experiences=5, seed=0,
                            dataset_root=arranged_root("SplitMNIST", None))
    assert summary["class_order"] == list(theirs.classes_order)
    assert summary["stream"]["source"] == "avalanche"
    assert summary["stream"]["benchmark"] == "SplitMNIST"
    assert summary["dataset"] == {"name": "SplitMNIST", "n_classes": 10,
                                  "sample_shape": [1, 28, 28], "sample_dtype": "float32",
                                  "sample_bytes": 3136, "n_train": 60_000, "n_test": 10_000}
    assert summary["stream"]["experience_test_sizes"] == [64] * 5
    for name in ("naive", "replay"):
        entry = summary["strategies"][name]
        assert entry["status"] == "ok", entry["error"]
        matrix = entry["accuracy_matrix"]
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)


def test_another_seed_reads_the_benchmark_again(split_mnist) -> None:
    """A seed other than the scenario's (as `clsim run --seed` or a comparison's seeds
    ask) builds SplitMNIST again over the same folder: Avalanche's class order for that
    seed, over the same dataset."""
    from avalanche.benchmarks.classic import SplitMNIST

    dataset, stream, _ = split_mnist
    scenario = parse_scenario(SCENARIO.read_text(), source=str(SCENARIO),
                              base_dir=str(SCENARIO.parent))
    other = build_stream(scenario, dataset, 1)
    with torch.random.fork_rng(devices=[]):
        theirs = SplitMNIST(n_experiences=5, seed=1,
                            dataset_root=arranged_root("SplitMNIST", None))
    assert list(other.class_order) == list(theirs.classes_order) != list(stream.class_order)
    assert build_stream(scenario, dataset, 0).experiences is stream.experiences  # not re-read


# ---------------------------------------------------------------------------
# local files only, and errors at their keys
# ---------------------------------------------------------------------------


def with_root(root: str) -> str:
    return SCENARIO.read_text().replace("  args: {n_experiences: 5}",
                                        f"  args: {{n_experiences: 5}}\n  dataset_root: {root}")


def test_a_root_without_the_files_names_them_and_fetches_nothing(tmp_path) -> None:
    """dataset_root: an empty folder. Loading the scenario's data stops at the file and
    line of stream.dataset_root, naming the four unpacked idx files torchvision would
    download, and the folder stays empty: torchvision was never asked."""
    root = tmp_path / "tv"
    root.mkdir()
    text = with_root("tv")
    path = tmp_path / "s.yaml"
    with pytest.raises(ConfigError) as caught:
        load_scenario_data(scenario_from(text, path))
    message = str(caught.value)
    assert message.startswith(
        f"{path}:{line_of(text, 'dataset_root:')}: stream.dataset_root: SplitMNIST reads "
        "MNIST through torchvision, which would download what it does not find, and clsim "
        "never downloads: missing "), message
    for name in IDX_FILES:
        assert str(root / "MNIST" / "raw" / name) in message
    assert list(root.iterdir()) == []


def test_the_shared_gz_files_are_not_torchvisions(tmp_path, shared_data_root) -> None:
    """The shared folder's .gz files, copied into torchvision's layout, do not do: their
    checksums differ from the ones torchvision records (so it would download); the
    unpacked files are still named as missing."""
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        shutil.copy(shared_data_root / "mnist" / f"{name}.gz", raw)
    scenario = scenario_from(with_root("tv"), tmp_path / "s.yaml")
    with pytest.raises(ConfigError) as caught:
        load_scenario_data(scenario)
    assert caught.value.key_path == "stream.dataset_root"
    assert all(str(raw / name) in str(caught.value) for name in IDX_FILES)
    assert sorted(os.listdir(raw)) == sorted(f"{n}.gz" for n in IDX_FILES)


def test_unpacked_files_in_a_root_of_ones_own_are_accepted(cache, tmp_path) -> None:
    """dataset_root holding MNIST/raw/ with the four unpacked files (here linked from the
    folder clsim arranged, which the fixture's run read): nothing is missing; with one of
    them gone, exactly that one is named."""
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arranged = arranged_root("SplitMNIST", None) / "MNIST" / "raw"
    for name in IDX_FILES:
        (raw / name).symlink_to(arranged / name)
    assert missing_files("SplitMNIST", tmp_path / "tv") == []
    assert checked_root("SplitMNIST", tmp_path / "tv") == tmp_path / "tv"
    (raw / IDX_FILES[2]).unlink()
    assert missing_files("SplitMNIST", tmp_path / "tv") == [raw / IDX_FILES[2]]


@pytest.mark.parametrize(
    ("edit", "key", "message"),
    [
        (("data: {dataset: mnist}", "data: {dataset: digits}"), "data.dataset",
         "stream.benchmark SplitMNIST reads mnist; data.dataset says 'digits' (set it to mnist)"),
        (("data: {dataset: mnist}\nstream:\n  type: avalanche\n  benchmark: SplitMNIST",
          "data: {dataset: cifar10}\nstream:\n  type: avalanche\n  benchmark: SplitCIFAR10"),
         "stream.dataset_root", "SplitCIFAR10 needs a dataset_root: clsim's cifar10 cannot "
         "stand in for the files torchvision reads; expected torchvision's layout: "
         "<root>/cifar-10-batches-py/"),
        (("args: {n_experiences: 5}", "args: {n_experiences: 5, dataset_root: x}"),
         "stream.args.dataset_root", "give it as stream.dataset_root"),
        (("args: {n_experiences: 5}", "args: {n_experiencs: 5}"), "stream.args",
         "SplitMNIST rejected its arguments"),
        (("benchmark: SplitMNIST", "benchmark: class_incremental_benchmark\n  dataset_root: x"),
         "stream.dataset_root", "class_incremental_benchmark splits the scenario's dataset"),
    ],
)
def test_errors_name_the_key(cache, tmp_path, edit, key, message) -> None:
    text = SCENARIO.read_text().replace(*edit)
    assert text != SCENARIO.read_text()
    scenario = scenario_from(text, tmp_path / "s.yaml")
    with pytest.raises(ConfigError) as caught:
        build_stream(scenario, load_scenario_data(scenario), 0)
    assert caught.value.key_path == key
    assert message in str(caught.value), str(caught.value)


def test_a_stream_over_another_dataset_is_refused(shared_data_root) -> None:
    """SplitMNIST's stream over clsim's own (uint8) MNIST would feed the model samples
    its dataset does not describe: refused at stream.benchmark."""
    scenario = parse_scenario(SCENARIO.read_text(), source=str(SCENARIO))
    with pytest.raises(ConfigError) as caught:
        build_stream(scenario, load_dataset("mnist", root=shared_data_root), 0)
    assert caught.value.key_path == "stream.benchmark"
    assert "brings its own data" in str(caught.value)
