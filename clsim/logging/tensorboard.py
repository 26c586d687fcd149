"""TensorBoard event files, one run folder per strategy (tensorboard --logdir OUT/tensorboard).

TensorBoard writes from a background thread; a write that fails there (disk full) is
raised again by the writer's next call, which :class:`TensorBoardLogger` turns into a
:class:`clsim.results.ResultsWriteError` naming the folder. The thread's own traceback is
not printed: the error is reported once, plainly, by the command.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from clsim.errors import ResultsWriteError
from clsim.results import write_failure


class TensorBoardLogger:
    """Scalars per experience: accuracy on seen data, per-experience accuracy, ledger
    bytes, and what the strategy computed."""

    def __init__(self, log_dir: Path | None) -> None:
        self._writer = None
        self.log_dir = log_dir
        self.failure: ResultsWriteError | None = None
        if log_dir is not None:
            self._writer = self._call(open_summary_writer, log_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._call(self._writer.add_scalar, tag, value, step)

    def experience(
        self,
        step: int,
        seen_accuracy: float,
        row: list[float],
        loss: float,
        total_bytes: int,
        parts: dict[str, int],
    ) -> None:
        if self._writer is None:
            return
        self.scalar("accuracy/seen", seen_accuracy, step)
        for j, accuracy in enumerate(row):
            self.scalar(f"accuracy/experience_{j}", accuracy, step)
        self.scalar("train/loss", loss, step)
        self.scalar("memory/total_bytes", total_bytes, step)
        for part, nbytes in parts.items():
            self.scalar(f"memory/{part}", nbytes, step)
        self._call(self._writer.flush)

    def compute(self, step: int, rows: list[dict[str, Any]]) -> None:
        """What the strategy computed, at experience ``step``: ``rows`` are the compute
        meter's rows so far (:meth:`clsim.compute.ComputeRow.to_dict`), the last one this
        experience's. Per experience: learning GFLOP (every FLOP but the test
        predictions'), optimizer steps, samples forwarded, GFLOP per part (evaluation
        included), inference FLOPs per test sample; and the learning GFLOP so far, the
        figure a compute budget bounds."""
        if self._writer is None or not rows:
            return
        row = rows[-1]
        self.scalar("compute/learning_gflop", _learning(row) / 1e9, step)
        self.scalar("compute/learning_gflop_so_far", sum(map(_learning, rows)) / 1e9, step)
        self.scalar("compute/steps", row["optimizer_steps"], step)
        for kind, samples in row["samples_forwarded"].items():
            self.scalar(f"compute/samples_forwarded/{kind}", samples, step)
        if row.get("inference_flops_per_sample") is not None:
            self.scalar("compute/inference_flops_per_sample",
                        row["inference_flops_per_sample"], step)
        for part, flops in row["parts"].items():
            self.scalar(f"compute/gflop/{part}", flops / 1e9, step)
        self._call(self._writer.flush)

    def anytime(self, position: int, seen_accuracy: float) -> None:
        """Anytime accuracy of an online stream, stepped by training samples seen."""
        self.scalar("anytime/seen_accuracy", seen_accuracy, position)

    def check(self) -> None:
        """Raise the write failure met so far, if any."""
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Close the writer (flushing what it holds) and put back the thread hook."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self._call(writer.close)

    def _call(self, method, *args: Any) -> Any:
        """``method(*args)``; an OSError (now or from the writer thread) is remembered
        and raised as a ResultsWriteError."""
        if self.failure is not None:
            raise self.failure
        try:
            return method(*args)
        except OSError as exc:
            self.failure = ResultsWriteError(write_failure(self.log_dir, exc))
            writer, self._writer = self._writer, None
            if writer is not None:  # stop its thread and put back the thread hook
                try:
                    writer.close()
                except OSError:
                    pass  # the failure already kept
            raise self.failure from None


def _learning(row: dict[str, Any]) -> int:
    """A compute row's FLOPs but its test predictions'."""
    return row["flops"] - row["evaluation_flops"]


def open_summary_writer(log_dir: Path) -> Any:
    """A ``SummaryWriter`` on ``log_dir`` whose writer thread fails quietly (its error
    comes back on the next call from this thread). The quiet thread hook is installed
    while a writer is open and the previous ``threading.excepthook`` is put back when the
    last one closes (``close()``, or leaving its ``with`` block)."""
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

    class _QuietWriter(SummaryWriter):
        _quiet = False

        def close(self) -> None:
            try:
                super().close()
            finally:
                if self._quiet:
                    self._quiet = False
                    _release_quiet_hook()

    _hold_quiet_hook()
    try:
        writer = _QuietWriter(log_dir=str(log_dir))
    except BaseException:
        _release_quiet_hook()
        raise
    writer._quiet = True
    return writer


_lock = threading.Lock()
_holders = 0  # open writers that need the quiet hook
_previous_hook = threading.excepthook


def _hold_quiet_hook() -> None:
    """Install the thread hook that skips TensorBoard's writer threads' OSErrors (the
    first open writer installs it)."""
    global _holders, _previous_hook
    with _lock:
        if _holders == 0 and threading.excepthook is not _skip_writer_thread_errors:
            _previous_hook = threading.excepthook
            threading.excepthook = _skip_writer_thread_errors
        _holders += 1


def _release_quiet_hook() -> None:
    """Put the previous thread hook back when the last open writer closes (unless someone
    replaced ours since: theirs stays)."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders == 0 and threading.excepthook is _skip_writer_thread_errors:
            threading.excepthook = _previous_hook


def _skip_writer_thread_errors(args: threading.ExceptHookArgs) -> None:
    if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(
            args.exc_type, OSError):
        return  # re-raised by the writer's next write, flush or close
    _previous_hook(args)
