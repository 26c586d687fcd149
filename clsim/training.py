"""The standard training loop: epochs of shuffled mini-batches, every hook in sight."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from clsim.compute import (
    TRAINING_BACKWARD,
    TRAINING_FORWARD,
    ComputeMeter,
    state_sizes,
    structure_key,
)
from clsim.config import OptimizerConfig, TrainingConfig
from clsim.context import RunContext
from clsim.errors import TrainingError
from clsim.hookspecs import LOOP_HOOKS
from clsim.loop_types import (
    ExperiencePlan,
    ForwardOutput,
    Trainable,
    as_trainables,
    trainable_parameters,
)
from clsim.memory import measure
from clsim.models.base import has_feature_head
from clsim.models.heads import expose_labels
from clsim.plugin_manager import HookRunner
from clsim.stream import Batch

# A non-finite loss is detected from the running loss sum, read every this many batches
# and at the end of each epoch: one device synchronisation per window, not per batch.
# With ``training.nonfinite_loss: skip_batch`` every batch's loss is read before its
# backward pass instead (one synchronisation per batch: the price of skipping exactly).
CHECK_EVERY = 50

# The regions of a step memoised apart (clsim.compute) and the hooks that run in each: a
# region's signature holds the sizes of what those hooks' plugins hold, so a buffer that
# replay fills in clsim_after_batch does not make every forward pass count again.
_REGION_HOOKS = {
    "before_batch": ("clsim_before_batch",),
    "forward": ("clsim_inputs", "clsim_forward", "clsim_task_loss", "clsim_loss"),
    "after_backward": ("clsim_after_backward",),
    "after": ("clsim_after_update", "clsim_after_batch"),
}


def make_optimizer(
    groups: list[tuple[list[nn.Parameter], float]], config: OptimizerConfig
) -> torch.optim.Optimizer:
    """The scenario's optimizer over ``groups`` of ``(parameters, lr_scale)``: every group
    at ``lr_scale`` times the configured learning rate, the other settings shared."""
    param_groups = [{"params": params, "lr": config.lr * scale} for params, scale in groups]
    if config.name == "sgd":
        return torch.optim.SGD(
            param_groups, lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    if config.name == "adam":
        return torch.optim.Adam(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)


def _carried(optimizer: torch.optim.Optimizer) -> list[tuple[str, Any]]:
    """The ledger's part for the optimizer state the loop carries (``loop.optimizer``)."""
    return [("loop.optimizer", optimizer.state)]


class Trainer:
    """The one training loop: every strategy's gradient steps run here, under the
    scenario's optimizer, non-finite policy and accounting."""

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
        self.meter = ComputeMeter("off")  # the engine sets the run's (clsim.compute)
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

    def held(self) -> list[tuple[str, Any]]:
        """What the loop itself holds from one part of an experience to the next, for the
        ledger: the optimizer state (momentum, Adam's moments) carried to the next part of
        an online experience. Gradients and the state of an optimizer that lives inside one
        :meth:`fit` are working memory of a step, dropped before any measuring point."""
        kept = self._last_optimizer
        return [] if kept is None else _carried(kept[1])

    def carried_state_bytes(self) -> int:
        """Bytes of the optimizer state :meth:`held` will charge while an online experience
        trains the model's parameters as they are now (every one with ``requires_grad``,
        as if each gets a gradient): 0 offline, where the optimizer lives inside one
        :meth:`fit`, and for a stateless optimizer. Measured, not derived: the scenario's
        optimizer takes one zero-gradient step over zero copies of those parameters, and
        the ledger reads its state as it reads the loop's. Parameters a plugin adds with
        ``clsim_trainable`` are not counted (their plugins may not be set up yet)."""
        if not self.online:
            return 0
        groups = [([nn.Parameter(torch.zeros_like(p)) for p in params], scale)
                  for params, scale in trainable_parameters(self.ctx.model, [])]
        if not groups:
            return 0
        copies = nn.ParameterList([p for params, _ in groups for p in params])
        for p in copies:
            p.grad = torch.zeros_like(p)
        optimizer = make_optimizer(groups, self.config.optimizer)
        optimizer.step()
        return measure(copies, held=_carried(optimizer)).bytes_of("loop.optimizer")

    def metrics(self) -> dict[str, int]:
        """What the loop adds to the strategy's metrics: the skipped-batch count, when
        ``nonfinite_loss`` is ``skip_batch``."""
        if self.config.nonfinite_loss != "skip_batch":
            return {}
        return {"skipped_batches": self.skipped_batches}

    def state_dict(self) -> dict[str, Any]:
        """What the loop carries from one experience to the next, for a checkpoint: the
        batch-order generator's state and the skipped-batch count. Taken between
        experiences, where :meth:`end_experience` has dropped everything else."""
        return {"generator": self.generator.get_state(),
                "skipped_batches": self.skipped_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (the generator in place)."""
        self.generator.set_state(state["generator"])
        self.skipped_batches = int(state["skipped_batches"])

    def n_batches(self, n_samples: int, epochs: int | None = None) -> int:
        per_epoch = -(-n_samples // self.config.batch_size)
        return per_epoch * (self.config.epochs if epochs is None else epochs)

    # -- the loop ------------------------------------------------------------

    def fit(self, plan: ExperiencePlan, *, shuffle: bool = True,
            keep_optimizer: bool = False) -> float:
        """Train on ``plan``; returns the mean loss of the last epoch.

        ``shuffle=False`` keeps the plan's order (online streams); ``keep_optimizer``
        continues with the previous fit's optimizer state (the next part of the same
        online experience) when the trained parameters have not changed.
        """
        ctx, hooks, model = self.ctx, self.hooks, self.ctx.model
        x, y, task_ids = plan.x, plan.y, plan.task_ids
        ctx.optimizer = optimizer = self._optimizer(keep_optimizer)
        batch_size, n = self.config.batch_size, plan.n_samples
        skip_nonfinite = self.config.nonfinite_loss == "skip_batch"
        active = self._active_hooks()  # looked up once: the batch loop is the hot path
        mean_loss = float("nan")
        model.train(not plan.eval_mode)
        meter = self.meter
        memo = meter.memo() if meter.idle else meter.memo(structure_key(
            model, [p for group in optimizer.param_groups for p in group["params"]]))
        # whose state a region's signature reads: the plugins whose hooks run in it
        owners = {region: self._plugins_of(active, hooks_of)
                  for region, hooks_of in _REGION_HOOKS.items()} if memo.active else {}

        def held(region: str) -> tuple:
            return state_sizes(owners[region]) if memo.active else ()
        allowance = ctx.compute_budget  # the compute budget's share of this experience
        if allowance is not None:
            allowance.begin_fit()
        per_epoch, stopped = self.n_batches(n, 1), False
        for epoch in range(plan.epochs):
            order = torch.randperm(n, generator=self.generator) if shuffle else None
            loss_sum = torch.zeros((), device=ctx.device)
            window: list[torch.Tensor] = []  # losses since the last check, to name the batch
            trained = 0
            for start in range(0, n, batch_size):
                step = start // batch_size + 1
                drawn = min(batch_size, n - start)
                if allowance is not None and not allowance.allows_step(meter, drawn):
                    # the share is spent: the rest of the plan is cut, as in budgeted CL
                    cut = per_epoch - step + 1 + (plan.epochs - epoch - 1) * per_epoch
                    allowance.cut(cut, epoch, step)
                    if self.progress is not None:
                        self.progress.update(cut)
                    stopped = True
                    break
                index = slice(start, start + batch_size) if order is None else \
                    order[start : start + batch_size]
                batch = Batch(x[index], y[index], None if task_ids is None else task_ids[index])
                # plugins may replace the batch (replay mixes memory samples in)
                signature = (tuple(batch.x.shape), task_ids is None)
                if "clsim_before_batch" in active:
                    with memo.region(("before_batch", signature, held("before_batch"))):
                        batch = hooks.chain("clsim_before_batch", "batch", batch, Batch,
                                            ctx=ctx)
                    signature += (tuple(batch.x.shape), batch.n_stream, batch.task_id is None)
                expose_labels(model, batch.y)  # a growing head switches on new classes
                # forward: the task loss (or a plugin's replacement) plus every extra term
                signature += held("forward")  # the backward pass follows from the forward
                with memo.region(("forward", signature)), meter.named(TRAINING_FORWARD):
                    output = self.forward(batch, active)
                    loss = self._total_loss(batch, output, active)
                meter.training_rows(int(output.inputs.shape[0]))
                if skip_nonfinite and not bool(torch.isfinite(loss)):
                    # discarded as if never drawn: no backward, no step, no after_* hooks
                    self._skip(loss, epoch, step)
                    if self.progress is not None:
                        self.progress.update(1)
                    continue
                # backward and update
                with memo.region(("backward", signature)):
                    optimizer.zero_grad(set_to_none=True)
                    with meter.named(TRAINING_BACKWARD):
                        loss.backward()
                if "clsim_after_backward" in active:
                    with memo.region(("after_backward", signature, held("after_backward"))):
                        hooks.call("clsim_after_backward", ctx=ctx, batch=batch, loss=loss)
                with memo.region(("step", signature)):
                    optimizer.step()
                loss = loss.detach()
                if "clsim_after_update" in active or "clsim_after_batch" in active:
                    with memo.region(("after", signature, held("after"))):
                        if "clsim_after_update" in active:
                            hooks.call("clsim_after_update", ctx=ctx, batch=batch)
                        if "clsim_after_batch" in active:
                            hooks.call("clsim_after_batch", ctx=ctx, batch=batch,
                                       logits=output.logits.detach(), loss=loss,
                                       output=output)
                meter.optimizer_step()
                if allowance is not None:  # a skipped batch (above) predicts no step
                    allowance.stepped(drawn, int(output.inputs.shape[0]))
                loss_sum += loss
                trained += 1
                self._experience_batches[0] += 1
                window.append(loss)
                if self.progress is not None:
                    self.progress.update(1)
                if step % CHECK_EVERY == 0 or start + batch_size >= n:
                    self._check_finite(loss_sum, window, epoch, step)
                    window.clear()
            if stopped:
                if window:  # the losses of the cut epoch's last steps are checked too
                    self._check_finite(loss_sum, window, epoch, step - 1)
                if trained:
                    mean_loss = float(loss_sum) / trained
                break
            mean_loss = float(loss_sum) / max(1, trained)
        ctx.optimizer = None
        # gradients are not state to keep between experiences (plugins' parameters too)
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        return mean_loss

    def forward(self, batch: Batch, active: frozenset[str] | None = None) -> ForwardOutput:
        """Model inputs (with every view plugins stacked), features and logits of ``batch``,
        plus the auxiliary outputs plugins add. ``active``: the loop hooks implemented
        (looked up here when not given)."""
        ctx, hooks, model = self.ctx, self.hooks, self.ctx.model
        active = self._active_hooks() if active is None else active
        inputs = ctx.to_input(batch.x)
        views = 1
        if "clsim_inputs" in active:
            inputs = hooks.chain("clsim_inputs", "inputs", inputs, torch.Tensor, ctx=ctx,
                                 batch=batch)
            views = self._views(inputs, batch)
        if "split_forward" in active:
            features = model.features(inputs)
            logits = model.head(features)
        else:
            features, logits = None, model(inputs)
        targets = batch.y.to(ctx.device, non_blocking=True)
        if views > 1:
            targets = targets.repeat(views)
        output = ForwardOutput(inputs, features, logits, targets, views)
        if "clsim_forward" in active:
            for plugin, extra in hooks.collect("clsim_forward", ctx=ctx, batch=batch,
                                               output=output):
                self._add_aux(plugin, extra, output)
        return output

    def _total_loss(self, batch: Batch, output: ForwardOutput,
                    active: frozenset[str]) -> torch.Tensor:
        """The task loss (cross-entropy, or the one plugin's replacement) plus every
        plugin's extra term."""
        ctx, hooks = self.ctx, self.hooks
        replaced = hooks.collect("clsim_task_loss", ctx=ctx, batch=batch, output=output) \
            if "clsim_task_loss" in active else []
        if len(replaced) > 1:
            names = " and ".join(repr(name) for name, _ in replaced)
            raise self.hooks.fault(replaced[1][0], "clsim_task_loss",
                                   f"plugins {names} both replaced the task loss of one batch; "
                                   "a batch has one task loss (add the others with clsim_loss)")
        if replaced:
            loss = self._scalar(replaced[0][0], "clsim_task_loss", replaced[0][1],
                                output.logits.device)
        else:
            loss = ctx.task_loss(output.logits, output.targets)
        if "clsim_loss" in active:
            for plugin, extra in hooks.collect("clsim_loss", ctx=ctx, batch=batch,
                                               logits=output.logits, output=output):
                loss = loss + self._scalar(plugin, "clsim_loss", extra, loss.device)
        return loss

    # -- services for a plugin that owns an experience -------------------------

    def new_optimizer(self, params: nn.Module | list[nn.Parameter] | list[Trainable]
                      ) -> torch.optim.Optimizer:
        """The scenario's optimizer over parameters a plugin trains in a loop of its own."""
        return make_optimizer(trainable_parameters(None, as_trainables(params)),
                              self.config.optimizer)

    def backward_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
        """One gradient step of a plugin's own loop under the scenario's non-finite policy:
        ``stop`` raises naming the experience, ``skip_batch`` counts the batch and returns
        False without a step; else zero the gradients, backward, step and return True."""
        if not bool(torch.isfinite(loss.detach())):
            if self.config.nonfinite_loss != "skip_batch":
                raise TrainingError(
                    f"strategy {self.ctx.strategy!r}: the loss became "
                    f"{float(loss.detach())}{self._where()}; lower the learning rate, check "
                    "the plugins' loss terms, or set training.nonfinite_loss: skip_batch")
            self._skip(loss, None, self._experience_batches[0] + self._experience_batches[1] + 1)
            return False
        optimizer.zero_grad(set_to_none=True)
        with self.meter.named(TRAINING_BACKWARD):
            loss.backward()
        optimizer.step()
        self.meter.optimizer_step()
        self._experience_batches[0] += 1
        return True

    # -- helpers ---------------------------------------------------------------

    def _active_hooks(self) -> frozenset[str]:
        """The loop hooks some plugin implements, and ``split_forward`` when the model's
        features can be handed to plugins without a second forward pass."""
        active = {hook for hook in LOOP_HOOKS if self.hooks.implemented(hook)}
        if has_feature_head(self.ctx.model):
            active.add("split_forward")
        return frozenset(active)

    def _plugins_of(self, active: frozenset[str], hooks: tuple[str, ...]
                    ) -> list[tuple[str, Any]]:
        """The strategy's ``(name, plugin)`` pairs implementing any of ``hooks``."""
        names = {name for hook in hooks if hook in active for name in self.hooks.order(hook)}
        return [(name, plugin) for name, plugin in self.ctx._plugins if name in names]

    def _plugin_trainables(self) -> list[Trainable]:
        if not self.hooks.implemented("clsim_trainable"):
            return []
        found: list[Trainable] = []
        for plugin, result in self.hooks.collect("clsim_trainable", ctx=self.ctx):
            try:
                found.extend(as_trainables(result))
            except TypeError as exc:
                raise self.hooks.fault(plugin, "clsim_trainable", str(exc)) from None
        return found

    def _optimizer(self, keep: bool) -> torch.optim.Optimizer:
        groups = trainable_parameters(self.ctx.model, self._plugin_trainables())
        params = [p for group, _ in groups for p in group]
        kept = self._last_optimizer
        if keep and kept is not None and len(kept[0]) == len(params) and all(
            a is b for a, b in zip(kept[0], params, strict=True)
        ):
            return kept[1]
        optimizer = make_optimizer(groups, self.config.optimizer)
        self._last_optimizer = (params, optimizer) if self.online else None
        return optimizer

    def _views(self, inputs: torch.Tensor, batch: Batch) -> int:
        rows, n = int(inputs.shape[0]), len(batch)
        if n == 0 or rows % n:
            plugins = ", ".join(self.hooks.order("clsim_inputs")) or "none"
            raise TrainingError(
                f"strategy {self.ctx.strategy!r}: the model inputs have {rows} rows for a "
                f"batch of {n} samples (plugins with clsim_inputs: {plugins}); views are "
                "stacked whole, view after view")
        return rows // n

    def _add_aux(self, plugin: str, extra: object, output: ForwardOutput) -> None:
        if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
            raise self.hooks.fault(plugin, "clsim_forward", f"returned a "
                                   f"{type(extra).__name__}; expected a dict of named tensors")
        taken = sorted(set(extra) & set(output.aux))
        if taken:
            raise self.hooks.fault(plugin, "clsim_forward", f"output names {taken} are "
                                   "already taken by an earlier plugin")
        output.aux.update(extra)

    def _scalar(self, plugin: str, hook: str, extra: object,
                device: torch.device) -> torch.Tensor:
        """A plugin's loss term, if it is a scalar tensor on the loss's device."""
        if not isinstance(extra, torch.Tensor) or extra.numel() != 1:
            got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
            raise self.hooks.fault(plugin, hook, f"returned {got}; expected a scalar "
                                   "tensor or None")
        if extra.device != device:
            raise self.hooks.fault(plugin, hook, f"returned a tensor on {extra.device}; "
                                   f"the loss is on {device}")
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

    def _skip(self, loss: torch.Tensor, epoch: int | None, step: int) -> None:
        """Count and log a batch discarded for its non-finite loss (``skip_batch``);
        ``epoch`` None for a plugin's own loop (its batches counted over the experience)."""
        self.skipped_batches += 1
        self._experience_batches[1] += 1
        experience = self.ctx.experience
        self.ctx.log("batch_skipped", experience=None if experience is None else experience.index,
                     epoch=None if epoch is None else epoch + 1, batch=step,
                     loss=str(float(loss.detach())))
