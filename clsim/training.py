"""The standard training loop: epochs of shuffled mini-batches, every hook in sight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clsim.config import OptimizerConfig, TrainingConfig
from clsim.context import RunContext
from clsim.errors import TrainingError
from clsim.models.heads import expose_labels
from clsim.plugin_manager import HookRunner
from clsim.stream import Batch

# A non-finite loss is detected from the running loss sum, read every this many batches
# and at the end of each epoch: one device synchronisation per window, not per batch.
# With ``training.nonfinite_loss: skip_batch`` every batch's loss is read before its
# backward pass instead (one synchronisation per batch: the price of skipping exactly).
CHECK_EVERY = 50


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the model's trainable parameters (rebuilt for every fit,
    so parameters a plugin adds or freezes between experiences are always right)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Trains ``ctx.model`` on tensors; plugins reach it through ``ctx.fit``."""

    def __init__(
        self,
        ctx: RunContext,
        hooks: HookRunner,
        config: TrainingConfig,
        generator: torch.Generator,
        progress=None,
    ) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.config = config
        self.generator = generator
        self.progress = progress  # a tqdm-like object with update(n), or None
        self.online = False  # the engine sets it: optimizers then carry over between parts
        self._last_optimizer: tuple[list[nn.Parameter], torch.optim.Optimizer] | None = None
        self.skipped_batches = 0  # batches discarded for a non-finite loss (skip_batch)
        self._experience_batches = [0, 0]  # [trained, skipped] since the experience began

    def end_experience(self) -> None:
        """Drop the optimizer kept for the next part of an online experience; with
        ``skip_batch``, an experience whose every batch was skipped is an error (nothing
        was learned from it, and the weights or a plugin's loss term are broken)."""
        self._last_optimizer = None
        trained, skipped = self._experience_batches
        self._experience_batches = [0, 0]
        if skipped and not trained:
            raise TrainingError(
                f"strategy {self.ctx.strategy!r}: every batch{self._where()} had a non-finite "
                f"loss ({skipped} skipped, none trained), so nothing was learned; lower the "
                "learning rate or check the plugins' loss terms"
            )

    def metrics(self) -> dict[str, int]:
        """What the loop adds to the strategy's metrics: the skipped-batch count, when
        ``nonfinite_loss`` is ``skip_batch``."""
        if self.config.nonfinite_loss != "skip_batch":
            return {}
        return {"skipped_batches": self.skipped_batches}

    def n_batches(self, n_samples: int, epochs: int | None = None) -> int:
        per_epoch = -(-n_samples // self.config.batch_size)
        return per_epoch * (epochs or self.config.epochs)

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int | None = None,
        task_ids: torch.Tensor | None = None,
        shuffle: bool = True,
        keep_optimizer: bool = False,
    ) -> float:
        """Train on ``(x, y)``; returns the mean loss of the last epoch.

        ``shuffle=False`` keeps the given order (online streams); ``keep_optimizer``
        continues with the previous fit's optimizer state (the next part of the same
        online experience) when the trainable parameters have not changed.
        """
        ctx, hooks, model = self.ctx, self.hooks, self.ctx.model
        ctx.optimizer = optimizer = self._optimizer(keep_optimizer)
        batch_size, n = self.config.batch_size, int(y.shape[0])
        task_loss = F.cross_entropy if ctx.labels is None else ctx.labels.cross_entropy
        skip_nonfinite = self.config.nonfinite_loss == "skip_batch"
        mean_loss = float("nan")
        model.train()
        for epoch in range(epochs or self.config.epochs):
            order = torch.randperm(n, generator=self.generator) if shuffle else None
            loss_sum = torch.zeros((), device=ctx.device)
            window: list[torch.Tensor] = []  # losses since the last check, to name the batch
            trained = 0
            for start in range(0, n, batch_size):
                step = start // batch_size + 1
                index = slice(start, start + batch_size) if order is None else \
                    order[start : start + batch_size]
                batch = Batch(x[index], y[index], None if task_ids is None else task_ids[index])
                # plugins may replace the batch (replay mixes memory samples in)
                if hooks.implemented("clsim_before_batch"):
                    batch = hooks.chain("clsim_before_batch", "batch", batch, Batch, ctx=ctx)
                expose_labels(model, batch.y)  # a growing head switches on new classes
                # forward: task loss plus every plugin's extra terms
                logits = model(ctx.to_input(batch.x))
                loss = task_loss(logits, batch.y.to(ctx.device, non_blocking=True))
                for plugin, extra in hooks.collect("clsim_loss", ctx=ctx, batch=batch,
                                                   logits=logits):
                    loss = loss + self._loss_term(plugin, extra, loss)
                if skip_nonfinite and not bool(torch.isfinite(loss)):
                    # discarded as if never drawn: no backward, no step, no after_* hooks
                    self._skip(loss, epoch, step)
                    if self.progress is not None:
                        self.progress.update(1)
                    continue
                # backward and update
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                hooks.call("clsim_after_backward", ctx=ctx, batch=batch, loss=loss)
                optimizer.step()
                hooks.call("clsim_after_update", ctx=ctx, batch=batch)
                loss = loss.detach()
                hooks.call(
                    "clsim_after_batch", ctx=ctx, batch=batch, logits=logits.detach(), loss=loss
                )
                loss_sum += loss
                trained += 1
                self._experience_batches[0] += 1
                window.append(loss)
                if self.progress is not None:
                    self.progress.update(1)
                if step % CHECK_EVERY == 0 or start + batch_size >= n:
                    self._check_finite(loss_sum, window, epoch, step)
                    window.clear()
            mean_loss = float(loss_sum) / max(1, trained)
        ctx.optimizer = None
        model.zero_grad(set_to_none=True)  # gradients are not state to keep between experiences
        return mean_loss

    def _optimizer(self, keep: bool) -> torch.optim.Optimizer:
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        kept = self._last_optimizer
        if keep and kept is not None and len(kept[0]) == len(params) and all(
            a is b for a, b in zip(kept[0], params, strict=True)
        ):
            return kept[1]
        optimizer = make_optimizer(self.ctx.model, self.config.optimizer)
        self._last_optimizer = (params, optimizer) if self.online else None
        return optimizer

    def _loss_term(self, plugin: str, extra: object, loss: torch.Tensor) -> torch.Tensor:
        """A plugin's loss term, if it is a scalar tensor on the loss's device."""
        if not isinstance(extra, torch.Tensor) or extra.numel() != 1:
            got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
            raise self.hooks.fault(plugin, "clsim_loss", f"returned {got}; expected a scalar "
                                   "tensor or None")
        if extra.device != loss.device:
            raise self.hooks.fault(plugin, "clsim_loss", f"returned a tensor on {extra.device}; "
                                   f"the loss is on {loss.device}")
        return extra.reshape(())

    def _where(self) -> str:
        experience = self.ctx.experience
        return "" if experience is None else f" of experience {experience.index}"

    def _check_finite(self, loss_sum: torch.Tensor, window: list[torch.Tensor], epoch: int,
                      step: int) -> None:
        """Stop on a non-finite loss sum (``nonfinite_loss: stop``), naming the first
        batch of the window ``window`` (the losses of batches ``first..step``) at fault."""
        value = float(loss_sum)
        if math.isfinite(value):
            return
        first = step - len(window) + 1
        losses = torch.stack(window).float().cpu() if window else torch.zeros(0)
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        if bad:  # else finite losses overflowed the sum: report the sum
            value = float(losses[bad[0]])
        at = f" (first at batch {first + bad[0]})" if bad else ""
        raise TrainingError(
            f"strategy {self.ctx.strategy!r}: the loss became {value} in epoch {epoch + 1}, "
            f"batches {first}-{step}{self._where()}{at}; lower the learning rate, check the "
            "plugins' loss terms, or set training.nonfinite_loss: skip_batch"
        )

    def _skip(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Count and log a batch discarded for its non-finite loss (``skip_batch``)."""
        self.skipped_batches += 1
        self._experience_batches[1] += 1
        experience = self.ctx.experience
        self.ctx.log("batch_skipped", experience=None if experience is None else experience.index,
                     epoch=epoch + 1, batch=step, loss=str(float(loss.detach())))
