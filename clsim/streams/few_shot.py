"""Few-shot continual streams: a large base session, then small N-way K-shot sessions.

This is the FSCIL protocol of CEC and FACT (CIFAR-100: 60 base classes with all their
training data, then 8 sessions of 5-way 5-shot). The shots are drawn from the seed, or
read from the published split files (``session_2.txt`` ...) so that results compare with
papers; :func:`write_index_dir` freezes a seeded draw in that same format to share it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.data.guards import read_text
from clsim.errors import DataError, OptionError
from clsim.labels import LabelSpace
from clsim.stream import Experience, Stream
from clsim.streams.class_incremental import resolve_class_order
from clsim.streams.common import TimingOptions

_SEED_SALT = 0xF5C1  # this builder's own random stream, apart from the other builders'


@dataclass
class FewShotOptions(TimingOptions):
    """Defaults are the CIFAR-100 FSCIL protocol: 60 base classes, 8 sessions 5-way 5-shot.

    The timing defaults (offline, visible boundaries) are TimingOptions' own: every
    session is a separate experience trained for the configured epochs.
    """

    base_classes: int = field(
        default=60, metadata={"min": 1, "help": "classes of the base session (all their data)"}
    )
    ways: int = field(default=5, metadata={"min": 1, "help": "new classes per few-shot session"})
    shots: int = field(default=5, metadata={"min": 1, "help": "training samples per new class"})
    sessions: int = field(
        default=8, metadata={"min": 0, "help": "few-shot sessions after the base session"}
    )
    class_order: list[int] | None = field(
        default=None,
        metadata={"help": "explicit class order; default 0..C-1 (the standard splits)"},
    )
    shuffle_classes: bool = field(
        default=False, metadata={"help": "true: a class order drawn from the seed"}
    )
    index_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder of session_2.txt ... (CEC/FACT format) listing the shots' "
            "training-set indices, used instead of drawing them from the seed"
        },
    )

    def check(self) -> None:
        super().check()


def _check_bounds(base_classes: int, ways: int, shots: int, sessions: int) -> None:
    """The dataclass bounds, again, for callers that skip the YAML validation."""
    for key, value, low in (
        ("base_classes", base_classes, 1),
        ("ways", ways, 1),
        ("shots", shots, 1),
        ("sessions", sessions, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise OptionError(key, f"expected an integer >= {low}; got {value!r}")


def _class_label(dataset: Dataset, c: int) -> str:
    return f"class {dataset.class_names[c]!r} (id {c})"


def session_file(folder: str | os.PathLike[str], session: int) -> Path:
    """File of few-shot session ``session`` (1-based): CEC numbers the base session 1."""
    return Path(folder) / f"session_{session + 1}.txt"


def _draw_shots(
    y_train: np.ndarray,
    session_classes: list[list[int]],
    shots: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    """``shots`` indices per class without replacement, sorted within the class."""
    drawn = []
    for classes in session_classes:
        picked = []
        for c in classes:
            pool = np.flatnonzero(y_train == c)
            picked.extend(np.sort(rng.choice(pool, size=shots, replace=False)).tolist())
        drawn.append([int(i) for i in picked])
    return drawn


def _read_shots(
    folder: str,
    y_train: np.ndarray,
    session_classes: list[list[int]],
    shots: int,
    dataset: Dataset,
) -> list[list[int]]:
    """Shots listed in ``folder``, checked line by line; ordered like a seeded draw."""
    if not Path(folder).is_dir():
        raise OptionError(
            "index_dir",
            f"expected a folder holding session_2.txt ... "
            f"session_{len(session_classes) + 1}.txt; {folder!r} is not a folder",
        )
    n_train = len(y_train)
    out = []
    for session, classes in enumerate(session_classes, start=1):
        path = session_file(folder, session)
        if not os.path.lexists(path):  # a pipe or a dangling link is named by read_text
            raise OptionError(
                "index_dir",
                f"missing {path} (session {session} of "
                f"{len(session_classes)}; the folder needs session_2.txt ... "
                f"session_{len(session_classes) + 1}.txt)",
            )
        wanted = set(classes)
        seen: dict[int, int] = {}  # index -> line
        per_class: dict[int, list[int]] = {c: [] for c in classes}
        first_line: dict[int, int] = {}
        try:
            text = read_text(path, "few-shot index file")
        except DataError as exc:
            raise OptionError("index_dir", str(exc)) from None
        for number, line in enumerate(text.splitlines(), start=1):
            text = line.strip()
            if not text:
                continue
            where = f"{path}:{number}"
            try:
                index = int(text)
            except ValueError:
                raise OptionError(
                    "index_dir",
                    f"{where}: expected one training-set index (an integer) per line; got {text!r}",
                ) from None
            if not 0 <= index < n_train:
                raise OptionError(
                    "index_dir",
                    f"{where}: index {index} is outside the "
                    f"training set (0..{n_train - 1} for {dataset.name})",
                )
            if index in seen:
                raise OptionError("index_dir", f"{where}: index {index} repeats line {seen[index]}")
            seen[index] = number
            c = int(y_train[index])
            if c not in wanted:
                raise OptionError(
                    "index_dir",
                    f"{where}: index {index} is a sample of "
                    f"{_class_label(dataset, c)}, not one of session {session}'s "
                    f"classes {classes}",
                )
            per_class[c].append(index)
            first_line.setdefault(c, number)
            if len(per_class[c]) > shots:
                raise OptionError(
                    "index_dir",
                    f"{where}: more than shots={shots} indices of {_class_label(dataset, c)}",
                )
        for c in classes:
            if len(per_class[c]) != shots:
                where = f"{path}:{first_line[c]}" if c in first_line else str(path)
                raise OptionError(
                    "index_dir",
                    f"{where}: expected shots={shots} indices of "
                    f"{_class_label(dataset, c)}; got {len(per_class[c])}",
                )
        out.append([i for c in classes for i in sorted(per_class[c])])
    return out


def few_shot(
    dataset: Dataset,
    *,
    seed: int,
    base_classes: int = 60,
    ways: int = 5,
    shots: int = 5,
    sessions: int = 8,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    index_dir: str | None = None,
) -> Stream:
    """A base session with every training sample of ``base_classes`` classes, then
    ``sessions`` sessions of ``ways`` new classes with ``shots`` training samples each.

    Each session tests on the test samples of its own classes (the evaluator keeps the
    earlier sessions' tests, so a session is scored on every class seen). Labels keep
    their dataset ids. Classes after the last session are left out of the stream.
    """
    _check_bounds(base_classes, ways, shots, sessions)
    n_classes = dataset.n_classes
    needed = base_classes + ways * sessions
    if needed > n_classes:
        raise OptionError(
            "sessions",
            f"base_classes + ways * sessions = {base_classes} + "
            f"{ways} * {sessions} = {needed} classes, but {dataset.name} has "
            f"{n_classes}",
        )
    try:
        order = resolve_class_order(n_classes, class_order, seed, shuffle=False)
    except ValueError as exc:
        raise OptionError("class_order", str(exc)) from None
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SEED_SALT]))
    if class_order is None and shuffle_classes:
        order = tuple(int(c) for c in rng.permutation(n_classes))
    used = order[:needed]
    session_classes = [
        list(used[base_classes + s * ways : base_classes + (s + 1) * ways]) for s in range(sessions)
    ]

    y_train = dataset.y_train.numpy()
    y_test = dataset.y_test.numpy()
    train_counts = np.bincount(y_train, minlength=n_classes)
    for classes in session_classes:
        for c in classes:
            if train_counts[c] < shots:
                raise OptionError(
                    "shots",
                    f"shots={shots}, but {_class_label(dataset, c)} "
                    f"has only {int(train_counts[c])} training samples",
                )
    if index_dir is None:
        shot_indices = _draw_shots(y_train, session_classes, shots, rng)
    else:
        shot_indices = _read_shots(str(index_dir), y_train, session_classes, shots, dataset)

    base = list(used[:base_classes])
    train_parts = [np.flatnonzero(np.isin(y_train, base))]
    train_parts += [np.asarray(idx, dtype=np.int64) for idx in shot_indices]
    experiences = []
    for index, (classes, train_idx) in enumerate(
        zip([base, *session_classes], train_parts, strict=True)
    ):
        test_idx = np.flatnonzero(np.isin(y_test, classes))
        if len(train_idx) == 0 or len(test_idx) == 0:
            split = "training" if len(train_idx) == 0 else "test"
            key = "base_classes" if index == 0 else "sessions"
            raise OptionError(
                key,
                f"session {index} (classes {classes}) has no {split} "
                f"samples in {dataset.name}; every session needs at least one",
            )
        train_t = torch.from_numpy(train_idx)
        test_t = torch.from_numpy(test_idx)
        experiences.append(
            Experience(
                index=index,
                classes=tuple(int(c) for c in classes),
                train_x=dataset.x_train[train_t],
                train_y=dataset.y_train[train_t],
                test_x=dataset.x_test[test_t],
                test_y=dataset.y_test[test_t],
            )
        )
    return Stream(
        experiences=tuple(experiences),
        n_classes=n_classes,
        class_order=tuple(int(c) for c in used),
        description={
            "type": "few_shot",
            "base_classes": base_classes,
            "ways": ways,
            "shots": shots,
            "sessions": sessions,
            "session_classes": [[int(c) for c in base]] + session_classes,
            "shot_indices": shot_indices,
            "source": "seed" if index_dir is None else str(index_dir),
        },
        labels=LabelSpace.flat(dataset.class_names),
        family="few_shot",
    )


def write_index_dir(
    stream_or_indices: Stream | Sequence[Sequence[int]], folder: str | os.PathLike[str]
) -> list[Path]:
    """Write the shots as ``session_2.txt`` ... (one training-set index per line), so a
    seeded split can be frozen, shared and read back with ``index_dir``.

    Takes a few-shot stream or its ``description["shot_indices"]``; creates ``folder``
    and overwrites the session files in it. Returns the files written.
    """
    if isinstance(stream_or_indices, Stream):
        if stream_or_indices.description.get("type") != "few_shot":
            raise ValueError(
                "write_index_dir needs a few_shot stream; got one of type "
                f"{stream_or_indices.description.get('type')!r}"
            )
        indices = stream_or_indices.description["shot_indices"]
    else:
        indices = stream_or_indices
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    for session, idx in enumerate(indices, start=1):
        path = session_file(folder, session)
        path.write_text("".join(f"{int(i)}\n" for i in idx))
        written.append(path)
    return written
