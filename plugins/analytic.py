"""Analytic class-incremental learning: ACIL and G-ACIL, with DS-AL's compensation stream.

References:

* Zhuang, Weng, Wei, Xie, Toh, Lin. "ACIL: Analytic Class-Incremental Learning with
  Absolute Memorization and Privacy Protection." NeurIPS 2022.
* Zhuang, Chen, Fang, He, Tong, Wei, Zeng, Chen. "G-ACIL: Analytic Learning for
  Exemplar-Free Generalized Class Incremental Learning." arXiv:2403.15706, 2024
  (NeurIPS 2024 as "GACL").
* Zhuang, He, Tong, Zeng, Chen, Lin. "DS-AL: A Dual-Stream Analytic Learning for
  Exemplar-Free Class-Incremental Learning." AAAI 2024.

The backbone is trained by backprop on a base phase, in the standard loop (the scenario's
optimizer and non-finite policy), then frozen. A fixed random "buffer" layer (d_f -> d_b,
no bias, float64, then ReLU) expands its features, and a ridge classifier on them is
learned by block recursive least squares, one batch at a time and each sample once, with
no gradient step. Because the recursion is exact, the classifier after any order and
batching of the data equals the joint ridge solution on all of it (the
*weight-invariance* property), which is why nothing is forgotten and no exemplar is kept.
What is kept instead is the inverse autocorrelation matrix R (d_b x d_b float64, 512 MiB
at d_b = 8192), W and the projection: the plugin holds them as plain tensors so the
memory ledger charges them (parts ``<plugin>.main.R``, ``.main.W``, ``.projection``,
``.seen``; with DS-AL also ``.compensation.R`` and ``.compensation.W``).

After the base phase the plugin owns each experience (``clsim_train_experience``): the
recursion is a closed-form solve, not gradient descent over epochs of mini-batches, and
a sample fitted twice would move it off the exact joint solution.

G-ACIL is the same recursion where a batch may mix seen and unseen classes and classes may
come back: W gains a zero column for every new label (it grows to the largest label seen
plus one) and the exactness argument is unchanged, so ACIL and G-ACIL share this code.

Defaults are the authors' published ones (official repository, CIFAR-100 B50 25 phases,
ResNet-32): buffer_size 8192, gamma 0.1 (the ACIL paper's own setting is not restated;
the official README gives 0.1 for CIFAR-100 and ImageNet-1k), DS-AL compensation ratio 0.6
with compensation gamma 0.1. Their base training runs 300 epochs; here the base phase
runs ``base_epochs`` when set, else ``training.epochs``. Computation is float64, fixed.

Reconstructed or adapted (the public record leaves these open for this setting):

* The buffer projection's entries are drawn i.i.d. uniform in [-1/sqrt(d_f), 1/sqrt(d_f)]
  (a linear layer's default initialisation, which the authors' buffer layer reuses), from
  the plugin's own seeded generator.
* The base phase is the first ``base_experiences`` experiences of the stream, trained by
  the engine's standard loop one after another; at its end the analytic classifier is
  re-fit on all base data with the frozen backbone (ACIL's re-alignment). With more than
  one base experience the plugin holds the earlier ones' raw samples until then, and the
  ledger charges them (the setup budget check covers the analytic state only).
* With hidden boundaries (task-agnostic streams) there is no base phase end to detect:
  set ``freeze_backbone_from_start`` (the model as built is the frozen backbone, as G-ACIL
  uses a given pre-trained one); otherwise the first experience is refused.
* DS-AL: the compensation stream is a second recursion on tanh of the same projection
  (before ReLU); per batch, after the main update, its target is the main stream's
  residual (one-hot minus prediction) with the columns of classes outside the current
  phase set to zero ("previous label cleansing"). The current phase's classes are the
  experience's ``classes``, or the labels of the data delivered when those are not given.
  Only the main stream is weight-invariant.
* Features are computed in eval mode in calls of exactly ``feature_batch`` rows, the last
  one zero-padded (:func:`~clsim_plugins.prototypes.fixed_chunk_features`, shared with
  ``nmc``): a float32 matrix product may round a row differently when the call has another
  height (a 1-row call against a 500-row one), which moved W off the joint solution by
  about 1e-7 with online parts of one sample. With every call the same height a sample's
  features are bit-identical however the stream was cut, so the invariance holds to
  float64 rounding for any parts. Predictions read a test batch's features in one call
  of its own height, through the simulator's feature cache.
* A label never seen gets no prediction: its (zero) column is excluded from the argmax.
  Prediction is class-incremental: task ids, where visible, are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from clsim_plugins.prototypes import fixed_chunk_features, frozen_outputs

from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.loop_types import ExperiencePlan
from clsim.stream import Experience

DTYPE = torch.float64  # fixed: the recursion's exactness needs double precision
_BYTES = 8  # float64


# ---------------------------------------------------------------------------
# the recursion, as a pure class
# ---------------------------------------------------------------------------


class RecursiveLeastSquares:
    """Ridge regression learned batch by batch, exactly (block recursive least squares).

    After fitting batches (X_i, Y_i) in any order and grouping, ``R`` equals
    (sum X_i^T X_i + gamma I)^-1 and ``W`` equals R sum X_i^T Y_i, with Y one-hot over the
    largest label seen plus one. Only R and W are kept, so the ledger sees exactly them.

    :param dim: input width d (the buffer size).
    :param gamma: ridge regularisation, > 0.
    """

    def __init__(
        self,
        dim: int,
        gamma: float,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = DTYPE,
    ) -> None:
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0; got {gamma}")
        self.R = torch.eye(dim, device=device, dtype=dtype) / gamma
        self.W = torch.zeros(dim, 0, device=device, dtype=dtype)

    @property
    def n_outputs(self) -> int:
        return int(self.W.shape[1])

    def grow(self, n_outputs: int) -> None:
        """Pad W with zero columns up to ``n_outputs`` (new classes start at zero)."""
        extra = n_outputs - self.n_outputs
        if extra > 0:
            pad = torch.zeros(self.W.shape[0], extra, device=self.W.device, dtype=self.W.dtype)
            self.W = torch.cat([self.W, pad], dim=1)

    @torch.no_grad()
    def fit(self, X: torch.Tensor, labels: torch.Tensor) -> None:
        """Learn a batch of inputs ``X`` (n, d) with integer class ids ``labels`` (n,)."""
        labels = labels.to(self.W.device, torch.long)
        if len(labels) == 0:
            return
        self.grow(int(labels.max()) + 1)
        Y = torch.zeros(len(labels), self.n_outputs, device=self.W.device, dtype=self.W.dtype)
        Y[torch.arange(len(labels), device=Y.device), labels] = 1.0
        self.fit_targets(X, Y)

    @torch.no_grad()
    def fit_targets(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Learn a batch with real-valued targets ``Y`` (n, k); columns past k count as 0.

        K = (I + X R X^T)^-1;  R <- R - R X^T K X R;  W <- W + R X^T (Y - X W).
        """
        X = X.to(self.R.device, self.R.dtype)
        Y = Y.to(self.R.device, self.R.dtype)
        if len(X) == 0:
            return
        self.grow(int(Y.shape[1]))
        if Y.shape[1] < self.n_outputs:
            Y = torch.cat([Y, Y.new_zeros(len(Y), self.n_outputs - Y.shape[1])], dim=1)
        RXt = self.R @ X.T  # (d, n)
        K_inv = torch.eye(len(X), device=X.device, dtype=X.dtype) + X @ RXt  # (n, n), SPD
        # R X^T K X R = B^T B with B = L^-1 X R, K^-1 = L L^T: symmetric by construction,
        # and R is updated in place (one d x d temporary, not three)
        B = torch.linalg.solve_triangular(torch.linalg.cholesky(K_inv), RXt.T, upper=False)
        self.R.sub_(B.T @ B)
        self.W = self.W + self.R @ (X.T @ (Y - X @ self.W))

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Scores ``X W`` (n, n_outputs)."""
        return X.to(self.W.device, self.W.dtype) @ self.W


def ridge_solution(
    X: torch.Tensor, labels: torch.Tensor, gamma: float, n_outputs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint ridge solution ``(W, R)`` on all data at once, the recursion's reference."""
    X = X.to(DTYPE)
    n_outputs = n_outputs or int(labels.max()) + 1
    Y = torch.nn.functional.one_hot(labels.long(), n_outputs).to(DTYPE)
    R = torch.linalg.inv(X.T @ X + gamma * torch.eye(X.shape[1], dtype=DTYPE, device=X.device))
    return R @ (X.T @ Y), R


# ---------------------------------------------------------------------------
# the plugin
# ---------------------------------------------------------------------------


@dataclass
class AnalyticOptions:
    buffer_size: int = field(
        default=8192,
        metadata={"min": 1, "help": "d_b, width of the random buffer layer (R is d_b^2 float64)"},
    )
    gamma: float = field(
        default=0.1,
        metadata={"min": 0, "min_exclusive": True, "help": "ridge regularisation of W"},
    )
    base_experiences: int = field(
        default=1,
        metadata={"min": 1, "help": "leading experiences trained by backprop before freezing"},
    )
    base_epochs: int | None = field(
        default=None,
        metadata={"min": 1, "help": "epochs of the base phase; default: training.epochs"},
    )
    freeze_backbone_from_start: bool = field(
        default=False,
        metadata={
            "help": "no base phase: the model as built is the frozen backbone "
            "(needed with hidden boundaries)"
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "samples per recursive update; default: training.batch_size "
            "(any value gives the same W)",
        },
    )
    feature_batch: int = field(
        default=256,
        metadata={
            "min": 1,
            "help": "rows per feature call (padded), so features do not depend on batching",
        },
    )
    compensation: bool = field(
        default=False, metadata={"help": "add DS-AL's compensation stream (doubles R's memory)"}
    )
    compensation_ratio: float = field(
        default=0.6, metadata={"min": 0, "help": "C: weight of the compensation stream"}
    )
    compensation_gamma: float = field(
        default=0.1,
        metadata={
            "min": 0,
            "min_exclusive": True,
            "help": "ridge regularisation of the compensation stream",
        },
    )


class AnalyticPlugin:
    """ACIL / G-ACIL (optionally DS-AL): a frozen backbone and a recursive ridge classifier."""

    Options = AnalyticOptions

    def __init__(self, options: AnalyticOptions | None = None) -> None:
        self.options = options or AnalyticOptions()
        # created when the backbone freezes; None during the base phase
        self.projection: torch.Tensor | None = None  # (d_f, d_b) float64
        self.main: RecursiveLeastSquares | None = None
        self.compensation: RecursiveLeastSquares | None = None
        self.seen: torch.Tensor | None = None  # bool, one per column of W: label trained on
        # raw samples of earlier base experiences, held until the base phase ends
        self.base_x: list[torch.Tensor] = []
        self.base_y: list[torch.Tensor] = []

    # -- setup: does the analytic state fit the budget? -----------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        feature_dim = getattr(ctx.model, "feature_dim", None)
        if not isinstance(feature_dim, int) or not hasattr(ctx.model, "features"):
            raise ConfigError(
                "analytic: the model must have 'features' and 'feature_dim' "
                "(every model of the clsim zoo does)"
            )
        if ctx.budget_bytes is not None:
            self._check_budget(ctx, feature_dim)
        if self.options.freeze_backbone_from_start:
            self._freeze(ctx)

    def state_bytes(self, feature_dim: int, n_classes: int, buffer_size: int) -> int:
        """Bytes of the analytic state at its largest: projection, R, W (all classes seen),
        the seen-label mask, and the compensation stream's R and W when enabled."""
        streams = 2 if self.options.compensation else 1
        d = buffer_size
        return _BYTES * (feature_dim * d + streams * (d * d + d * n_classes)) + n_classes

    def _check_budget(self, ctx: RunContext, feature_dim: int) -> None:
        model = ctx.model_bytes()
        need = model + self.state_bytes(feature_dim, ctx.n_classes, self.options.buffer_size)
        if need <= ctx.budget_bytes:
            return
        fits = self._largest_buffer(ctx.budget_bytes - model, feature_dim, ctx.n_classes)
        advice = (
            f"buffer_size {fits} is the largest that fits this budget"
            if fits
            else "not even buffer_size 1 fits next to the model"
        )
        streams = "R and W of both streams" if self.options.compensation else "R and W"
        raise ConfigError(
            f"analytic: a budget of {ctx.budget_bytes} bytes leaves no room for the analytic "
            f"state of buffer_size {self.options.buffer_size}: the model takes {model} bytes "
            f"and the state (projection {feature_dim}x{self.options.buffer_size}, {streams}, "
            f"float64) {need - model} bytes; the minimum budget is {need} bytes; {advice}"
        )

    def _largest_buffer(self, room: int, feature_dim: int, n_classes: int) -> int:
        """The largest d_b whose state fits in ``room`` bytes (0 if none)."""
        streams = 2 if self.options.compensation else 1
        a, b = _BYTES * streams, _BYTES * (feature_dim + streams * n_classes)
        c = n_classes - room
        if c > 0:
            return 0
        d = int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
        while d > 0 and self.state_bytes(feature_dim, n_classes, d) > room:
            d -= 1
        while self.state_bytes(feature_dim, n_classes, d + 1) <= room:
            d += 1
        return d

    # -- the stream -----------------------------------------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        if self.projection is None and experience.n_train == 0:
            # only a hidden-boundary stream shows an experience without its data
            raise ConfigError(
                "analytic: with hidden boundaries there is no end of a base phase at which "
                "to freeze the backbone; set freeze_backbone_from_start: true"
            )

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any | None:
        """Base phase: None, and the standard loop trains the backbone. After it, one
        recursive least-squares pass over the experience (closed form, each sample once:
        why the plugin owns it, see the module docstring)."""
        if self.projection is None:
            return None
        self._learn(ctx, experience.train_x, experience.train_y, experience.classes)
        return True

    def clsim_plan_experience(self, plan: ExperiencePlan) -> ExperiencePlan | None:
        """The base phase trains for ``base_epochs`` when set (the scenario's otherwise)."""
        if self.options.base_epochs is None:
            return None
        return replace(plan, epochs=self.options.base_epochs)

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if self.projection is not None:
            return
        if experience.index < self.options.base_experiences - 1:  # more base to come
            self.base_x.append(experience.train_x.clone())
            self.base_y.append(experience.train_y.clone())
            return
        x = torch.cat([*self.base_x, experience.train_x])
        y = torch.cat([*self.base_y, experience.train_y])
        self.base_x, self.base_y = [], []
        self._freeze(ctx)
        self._learn(ctx, x, y, ())  # re-alignment: the classifier re-fit on the base data
        ctx.log(
            "analytic_frozen",
            experience=experience.index,
            base_samples=len(y),
            buffer_size=self.options.buffer_size,
        )

    # -- freezing and learning ------------------------------------------------

    def _freeze(self, ctx: RunContext) -> None:
        """Freeze the backbone; draw the buffer layer; start R = I / gamma and empty W."""
        ctx.model.features.eval()
        for p in ctx.model.features.parameters():
            p.requires_grad_(False)
        d_f, d_b = ctx.model.feature_dim, self.options.buffer_size
        generator = ctx.torch_generator("analytic", "projection")
        bound = 1.0 / math.sqrt(d_f)
        uniform = torch.rand(d_f, d_b, generator=generator, dtype=DTYPE)
        self.projection = ((uniform * 2 - 1) * bound).to(ctx.device)
        self.main = RecursiveLeastSquares(d_b, self.options.gamma, device=ctx.device)
        if self.options.compensation:
            self.compensation = RecursiveLeastSquares(
                d_b, self.options.compensation_gamma, device=ctx.device
            )
        self.seen = torch.zeros(0, dtype=torch.bool, device=ctx.device)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activation of the buffer layer, float64."""
        return features.to(DTYPE) @ self.projection

    @torch.no_grad()
    def _learn(
        self, ctx: RunContext, x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]
    ) -> None:
        """One pass over raw samples ``x``: a recursive update per batch."""
        if len(y) == 0:
            return
        y = y.to(ctx.device, torch.long)
        features = fixed_chunk_features(ctx, x, self.options.feature_batch)
        batch = self.options.batch_size or ctx.batch_size
        phase = torch.as_tensor(classes if classes else y.unique().tolist(), device=ctx.device)
        for start in range(0, len(y), batch):
            pre = self._project(features[start : start + batch])
            labels = y[start : start + batch]
            hidden = torch.relu(pre)
            self.main.fit(hidden, labels)
            self._mark_seen(labels)
            if self.compensation is not None:
                self._compensate(pre, hidden, labels, phase)

    def _mark_seen(self, labels: torch.Tensor) -> None:
        width = self.main.n_outputs
        if len(self.seen) < width:
            pad = torch.zeros(width - len(self.seen), dtype=torch.bool, device=self.seen.device)
            self.seen = torch.cat([self.seen, pad])
        self.seen[labels] = True

    def _compensate(
        self, pre: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor, phase: torch.Tensor
    ) -> None:
        """DS-AL: fit the main stream's residual on the current phase's classes only."""
        width = self.main.n_outputs
        target = torch.zeros(len(labels), width, dtype=DTYPE, device=labels.device)
        target[torch.arange(len(labels), device=labels.device), labels] = 1.0
        residual = target - self.main.predict(hidden)
        keep = torch.zeros(width, dtype=torch.bool, device=labels.device)
        keep[phase[phase < width]] = True
        residual[:, ~keep] = 0.0
        self.compensation.fit_targets(torch.tanh(pre), residual)

    # -- evaluation ----------------------------------------------------------

    @torch.no_grad()
    def clsim_predict(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor | None:
        if self.main is None or not bool(self.seen.any()):
            return None  # base phase, or nothing learned yet: the model's own argmax
        features = frozen_outputs(ctx.model.features, x)
        pre = self._project(features)
        scores = self.main.predict(torch.relu(pre))
        if self.compensation is not None:  # kept as wide as the main stream by _learn
            scores = scores + self.options.compensation_ratio * self.compensation.predict(
                torch.tanh(pre)
            )
        scores = scores.masked_fill(~self.seen, float("-inf"))
        labels = ctx.labels
        if labels is None or labels.n_levels == 1:
            return scores.argmax(dim=1)
        # several label levels: the best seen label within each level, -1 where none is seen
        columns = []
        for level in range(labels.n_levels):
            part = labels.level_slice(level)
            start, stop = part.start, min(part.stop, scores.shape[1])
            if start >= stop or not bool(self.seen[start:stop].any()):
                columns.append(torch.full((len(x),), -1, dtype=torch.long, device=scores.device))
            else:
                columns.append(scores[:, start:stop].argmax(dim=1) + start)
        return torch.stack(columns, dim=1)
