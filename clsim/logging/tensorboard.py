"""TensorBoard event files, one run folder per strategy (tensorboard --logdir OUT/tensorboard)."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    """Scalars per experience: accuracy on seen data, per-experience accuracy, ledger bytes."""

    def __init__(self, log_dir: Path | None) -> None:
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

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
        self._writer.add_scalar("accuracy/seen", seen_accuracy, step)
        for j, accuracy in enumerate(row):
            self._writer.add_scalar(f"accuracy/experience_{j}", accuracy, step)
        self._writer.add_scalar("train/loss", loss, step)
        self._writer.add_scalar("memory/total_bytes", total_bytes, step)
        for part, nbytes in parts.items():
            self._writer.add_scalar(f"memory/{part}", nbytes, step)
        self._writer.flush()

    def anytime(self, position: int, seen_accuracy: float) -> None:
        """Anytime accuracy of an online stream, stepped by training samples seen."""
        if self._writer is not None:
            self._writer.add_scalar("anytime/seen_accuracy", seen_accuracy, position)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
