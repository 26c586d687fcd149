"""Language-guided heads: frozen class-name embeddings as the classifier (LingoCL).

Ni et al., "Enhancing Visual Continual Learning with Language-Guided Supervision"
(CVPR 2024, LingoCL) replace a continual learner's randomly initialised classifier with
*semantic targets*: the embedding of each class name from a pretrained language model,
computed once and frozen. The logit of class c is ``eta * cos(h(f(x)), t_c)``, with f
the backbone, h a learnable projection into the text space and eta a learnable scale.
Because the targets never move, a new task's classes cannot overwrite an old class's
classifier, and related names start close together. The host strategy's losses
(cross-entropy, replay, distillation) are computed on these logits unchanged: this plugin
only swaps ``model.head`` (for a :class:`clsim.models.heads.SemanticHead`) at setup,
before other plugins set up, so it composes with any strategy that trains through the
standard loop's logits (naive, replay, a user's distillation term). A host that needs
more than the logits reads the head through the fixed-target protocol
(:func:`clsim.models.heads.target_head`: frozen ``targets``, ``embed``, ``widened``),
never this plugin's class: MEMO widens it with every new block, PRD takes the targets as
prototypes in the embedded space. Nothing here knows about any host.

What this implementation does (METHODS.md section 7):

* targets ``T`` (C x 384) come from all-MiniLM-L6-v2 (:mod:`clsim.text_encoder`; mean
  pooling, L2 normalisation), one row per class name with ``prompt`` filled in; they are
  a registered buffer of the head, so the ledger charges ``C * 384 * 4`` bytes (in
  ``model.buffers``) and no optimizer ever sees them;
* h is a ``Linear(feature_dim, 384)`` with bias when the backbone's width differs from
  384, and the identity when it is 384 (METHODS: a projection "when dims differ"); it is
  charged in ``model.parameters`` with the backbone, as is eta (4 bytes);
* the text encoder itself is used once, at setup, and not kept: it is not part of the
  learner's memory, exactly as the paper's targets are precomputed;
* a masked head (:class:`clsim.models.heads.ActiveHead`, online and hierarchical streams)
  stays masked: outputs of classes not yet exposed get ``MASK_VALUE``.

*Reconstructed* (the paper evaluates several language models and does not fix these
details for this setting): the encoder is all-MiniLM-L6-v2, chosen because it ships its
weights offline in a Python package, not because the paper uses it; h is one linear
layer; eta is one plain learnable scalar (like LUCIR's cosine-classifier scale) starting
at ``init_scale = 16`` (an eta learned in log space made its own SGD steps grow with eta
and diverged at the first new task in our digits runs); the default prompt is
``"a photo of a {name}."``. A multi-level label space embeds each level's raw class
names (without the ``level/`` prefix of ``LabelSpace.names``).

``encoder: random_fallback`` (only when asked for) uses fixed random unit vectors drawn
from the run's seed instead of language: a control, not LingoCL. It is never chosen
silently: a missing encoder is an error that says how to install it, and the fallback is
recorded in the resolved config, in an event (``language_head_targets``), as a warning
and on the head (``head.encoder``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clsim.context import RunContext
from clsim.errors import ConfigError, OptionError
from clsim.hookspecs import hookimpl
from clsim.models.heads import ActiveHead, SemanticHead
from clsim.stream import Experience
from clsim.text_encoder import TEXT_DIM, TextEncoderMissing, encode_class_names


@dataclass
class LanguageHeadOptions:
    encoder: Literal["minilm", "random_fallback"] = field(
        default="minilm",
        metadata={
            "help": "minilm: all-MiniLM-L6-v2 name embeddings (needs clsim[text]); "
            "random_fallback: fixed random unit targets from the seed (a control)"
        },
    )
    prompt: str | None = field(
        default="a photo of a {name}.",
        metadata={"help": "template with {name} for each class name; null: the bare name"},
    )
    learn_scale: bool = field(default=True, metadata={"help": "learn the logit scale eta"})
    init_scale: float = field(
        default=16.0,
        metadata={"min": 0, "min_exclusive": True, "max": 1e4, "help": "eta at the start"},
    )

    def check(self) -> None:
        if self.prompt is not None and "{name}" not in self.prompt:
            raise OptionError(
                "prompt",
                f"the prompt must contain '{{name}}' (else every class gets the same target); "
                f"got {self.prompt!r}",
            )


def class_names(ctx: RunContext) -> list[str]:
    """The name of every output, in id order; each level's raw names for a multi-level
    label space (its ``names`` carry a ``level/`` prefix, which is not language)."""
    if ctx.labels is None:
        return [str(n) for n in ctx.data.class_names]
    return [str(n) for level in ctx.labels.class_names for n in level]


def random_targets(n_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Fixed random unit vectors (the explicit fallback), ``(n_classes, 384)`` float32."""
    return F.normalize(torch.randn(n_classes, TEXT_DIM, generator=generator), dim=1)


class LanguageHeadPlugin:
    """LingoCL: a cosine head against frozen class-name embeddings replaces ``model.head``."""

    Options = LanguageHeadOptions

    def __init__(self, options: LanguageHeadOptions) -> None:
        self.options = options

    @property
    def uses_random_fallback(self) -> bool:
        return self.options.encoder == "random_fallback"

    # tryfirst: the head is swapped before any plugin sizes its memory from the model
    @hookimpl(tryfirst=True)
    def clsim_setup(self, ctx: RunContext) -> None:
        model = ctx.model
        old = getattr(model, "head", None)
        feature_dim = getattr(model, "feature_dim", None)
        if not isinstance(old, nn.Linear) or feature_dim is None:
            raise ConfigError(
                "language_head replaces a model's linear classifier 'head' (a ClassifierModel "
                f"with feature_dim); got head {type(old).__name__}: list language_head before "
                "plugins that replace the head themselves"
            )
        names = class_names(ctx)
        if len(names) != old.out_features:
            raise ConfigError(
                f"language_head: the model has {old.out_features} outputs but the label space "
                f"names {len(names)} classes"
            )
        targets = self._targets(ctx, names)
        head = SemanticHead(
            feature_dim,
            targets.to(ctx.device),
            init_scale=self.options.init_scale,
            learn_scale=self.options.learn_scale,
            generator=ctx.torch_generator("language_head", "projection"),
            active=old.active if isinstance(old, ActiveHead) else None,
            encoder=self.options.encoder,
            prompt=self.options.prompt,
        )
        model.head = head
        ctx.log(
            "language_head_targets",
            encoder=self.options.encoder,
            random_fallback=self.uses_random_fallback,
            prompt=self.options.prompt,
            n_classes=len(names),
            text_dim=TEXT_DIM,
            projection="identity" if isinstance(head.projection, nn.Identity) else "linear",
            targets_bytes=head.targets.numel() * head.targets.element_size(),
            projection_bytes=sum(
                p.numel() * p.element_size() for p in head.projection.parameters()
            ),
        )

    def _targets(self, ctx: RunContext, names: list[str]) -> torch.Tensor:
        if self.uses_random_fallback:
            warnings.warn(
                f"strategy {ctx.strategy!r}: language_head uses encoder: random_fallback, "
                "fixed random targets instead of class-name embeddings (not LingoCL)",
                UserWarning,
                stacklevel=1,
            )
            return random_targets(len(names), ctx.torch_generator("language_head", "targets"))
        try:
            return encode_class_names(names, self.options.prompt)
        except TextEncoderMissing as exc:
            raise TextEncoderMissing(
                exc.reason,
                context="language_head: ",
                advice="or set encoder: random_fallback to run with fixed random targets "
                "(a control, recorded in the results)",
            ) from None

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        # the head is read from the model, where a host may have replaced it (one that
        # grows with the backbone, say); the plugin keeps no reference, so nothing is
        # charged twice
        head = getattr(ctx.model, "head", None)
        if isinstance(head, SemanticHead):
            ctx.log(
                "language_head_scale",
                experience=experience.index,
                scale=float(head.scale.detach()),
            )
