"""The values the standard training loop and the plugins hand each other.

A method's algorithm box becomes hooks over one loop when the loop's inputs and outputs
are values a plugin can read and return: the plan of an experience (what data, how many
epochs, whether to take gradient steps at all), the parameters to train beyond the
model's own, and the output of one forward pass (logits *and* features, with every view).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class ExperiencePlan:
    """What the standard loop trains on for one experience (or one part of an online one).

    ``clsim_plan_experience`` passes it from plugin to plugin; each may return a changed
    copy (``dataclasses.replace``). ``x``/``y``/``task_ids`` are raw samples, labels and
    task ids in training order (MEMO and iCaRL append their exemplars); ``epochs`` the
    passes over them (MEMO's first and later tasks); ``train=False`` says the experience
    takes no gradient step at all (a few-shot prototype session), so no batch hook fires;
    ``eval_mode=True`` trains with the model in eval mode (BatchNorm keeps the statistics
    it has, dropout is off: fine-tuning on a few shots that cannot estimate statistics).
    """

    x: torch.Tensor
    y: torch.Tensor
    task_ids: torch.Tensor | None
    epochs: int
    train: bool = True
    eval_mode: bool = False

    @property
    def n_samples(self) -> int:
        return int(self.y.shape[0])

    def extended(
        self, x: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor | None = None
    ) -> ExperiencePlan:
        """This plan with ``(x, y)`` appended after its own samples (task id -1 when the
        plan carries task ids and none are given)."""
        x = x.to(self.x.device, self.x.dtype)
        y = y.to(self.y.device, self.y.dtype)
        tasks = self.task_ids
        if tasks is not None:
            extra = task_ids if task_ids is not None else torch.full_like(y, -1)
            tasks = torch.cat([tasks, extra.to(tasks)])
        return replace(self, x=torch.cat([self.x, x]), y=torch.cat([self.y, y]),
                       task_ids=tasks)


@dataclass(frozen=True, eq=False)
class Trainable:
    """Parameters a plugin adds to the scenario's optimizer (a projector, prototypes, an
    auxiliary head), trained at ``lr_scale`` times the scenario's learning rate.

    The plugin keeps the module or parameters on itself, where the ledger charges them
    under the attribute's name; the loop only trains them. Parameters that also belong to
    the model take the plugin's ``lr_scale`` (a plugin can slow a part of the model down).
    """

    params: nn.Module | nn.Parameter | Iterable[nn.Parameter]
    lr_scale: float = 1.0

    def parameters(self) -> Iterator[nn.Parameter]:
        if isinstance(self.params, nn.Module):
            yield from self.params.parameters()
        elif isinstance(self.params, nn.Parameter):
            yield self.params
        else:
            yield from self.params


@dataclass(frozen=True, eq=False)
class ForwardOutput:
    """The model's output on one training batch, as every loss hook sees it.

    With ``views`` V (``clsim_inputs`` may stack V augmented views of the batch's N
    samples, view after view) every tensor has V x N rows: ``inputs`` the model inputs,
    ``features`` ``model.features(inputs)`` (None for a model without a feature
    extractor), ``logits`` ``model.head(features)``, ``targets`` the labels repeated per
    view, on the model's device. ``aux`` holds named outputs plugins added in
    ``clsim_forward`` (a projector's embedding, say), so a later plugin reads them instead
    of computing them again and nothing is parked on a module.
    """

    inputs: torch.Tensor
    features: torch.Tensor | None
    logits: torch.Tensor
    targets: torch.Tensor
    views: int = 1
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def view(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """Rows of ``tensor`` (V x N rows, like the fields) that belong to view ``index``."""
        n = tensor.shape[0] // self.views
        return tensor[index * n : (index + 1) * n]


def as_trainables(result: object) -> list[Trainable]:
    """A ``clsim_trainable`` result (or ``ctx.new_optimizer`` argument) as Trainable items:
    a module, a parameter or a Trainable, or a list of them; bare parameters of one list
    share one group. A ``TypeError`` names anything else."""
    if isinstance(result, Trainable | nn.Module | nn.Parameter):
        result = [result]
    if not isinstance(result, Iterable):
        raise TypeError(f"got a {type(result).__name__}; expected modules, parameters or "
                        "Trainable")
    items: list[Trainable] = []
    bare: list[nn.Parameter] = []
    for item in result:
        if isinstance(item, nn.Parameter):
            bare.append(item)
        elif isinstance(item, nn.Module):
            items.append(Trainable(item))
        elif isinstance(item, Trainable):
            items.append(item)
        else:
            raise TypeError(f"got a {type(item).__name__}; expected modules, parameters "
                            "or Trainable")
    return ([Trainable(bare)] if bare else []) + items


def trainable_parameters(
    model: nn.Module | None, extra: Iterable[Trainable]
) -> list[tuple[list[nn.Parameter], float]]:
    """The optimizer's parameter groups: each plugin group with its ``lr_scale``, then the
    model's remaining trainable parameters at scale 1 (none without a model); each
    parameter once, frozen ones (``requires_grad`` off) left out."""
    seen: set[int] = set()
    groups: list[tuple[list[nn.Parameter], float]] = []
    for trainable in extra:
        params = [p for p in trainable.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append((params, float(trainable.lr_scale)))
    own = [] if model is None else \
        [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if own:
        groups.insert(0, (own, 1.0))
    return groups
