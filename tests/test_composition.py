"""Strategies as lists of plugins over the one loop: what composes, and what is refused.

The distillation plugin below is written the way a user would write one in their own
package (LwF's term: Li and Hoiem, "Learning without Forgetting", TPAMI 2017): a frozen
copy of the model taken before each new experience, and a KL term between its softened
outputs and the current model's on the stream's samples of every batch. It records what
its hooks saw and reports it (``clsim_report``), so the tests read the run's summary the
way a user would.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import DIGITS_SCENARIO, run_cli

from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.loop_types import ForwardOutput
from clsim.models.heads import target_head
from clsim.runner import run_scenario
from clsim.stream import Batch, Experience
from clsim.text_encoder import TEXT_DIM

HIDDEN, N_CLASSES, CAPACITY, MEMORY_ROWS = 32, 10, 40, 16
DISTILL = "test_composition:LwfDistill"


@dataclass
class LwfDistillOptions:
    weight: float = field(default=1.0, metadata={"min": 0, "help": "weight of the KL term"})
    temperature: float = field(default=2.0, metadata={"min": 0, "min_exclusive": True})


class LwfDistill:
    """LwF: distil the previous model's outputs on old classes into the current model."""

    Options = LwfDistillOptions

    def __init__(self, options: LwfDistillOptions) -> None:
        self.options = options
        self.old_model: torch.nn.Module | None = None  # charged by the ledger
        self.old_classes: list[int] = []
        self.seen = {"batches": 0, "distilled": 0, "stream_rows": 0, "memory_rows": 0,
                     "memory_rows_of_seen_classes": 0, "memory_rows_of_earlier_classes": 0,
                     "semantic_logits": 0,
                     "features_width": 0, "logits_width": 0, "targets_match": 0}

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        if experience.index == 0:
            return
        self.old_model = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        self.old_classes = [c for c in ctx.seen_classes if c not in experience.classes]

    def clsim_loss(self, ctx: RunContext, batch: Batch, output: ForwardOutput
                   ) -> torch.Tensor | None:
        self._record(ctx, batch, output)
        if self.old_model is None:
            return None
        n, old = batch.n_stream, self.old_classes
        with torch.no_grad():
            teacher = self.old_model(output.inputs[:n])[:, old]
        student = output.logits[:n, old]
        t = self.options.temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1),
                      reduction="batchmean")
        self.seen["distilled"] += 1
        return self.options.weight * t * t * kl

    def _record(self, ctx: RunContext, batch: Batch, output: ForwardOutput) -> None:
        seen, n = self.seen, batch.n_stream
        seen["batches"] += 1
        seen["stream_rows"] += n
        memory = batch.y[n:]
        seen["memory_rows"] += len(memory)
        seen["memory_rows_of_seen_classes"] += int(torch.isin(memory, torch.tensor(
            ctx.seen_classes, dtype=memory.dtype)).sum())
        earlier = [c for c in ctx.seen_classes if c not in ctx.experience.classes]
        seen["memory_rows_of_earlier_classes"] += int(torch.isin(memory, torch.tensor(
            earlier, dtype=memory.dtype)).sum()) if earlier else 0
        head = target_head(ctx.model)
        if head is not None and torch.equal(output.logits, head(output.features)):
            seen["semantic_logits"] += 1
        seen["features_width"] = int(output.features.shape[1])
        seen["logits_width"] = int(output.logits.shape[1])
        seen["targets_match"] += int(torch.equal(output.targets, batch.y))

    def clsim_report(self) -> dict:
        return dict(self.seen)


def scenario(strategies: str, base: str = DIGITS_SCENARIO):
    return parse_scenario(base.replace("  naive:\n    plugins: [naive]\n", strategies))


def outcome_of(result, name: str) -> dict:
    return result.summary["strategies"][name]


# ---------------------------------------------------------------------------
# replay + language_head + a user's distillation: one strategy
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    head = "{language_head: {prompt: 'a handwritten digit {name}'}}"
    replay = f"{{replay: {{capacity: {CAPACITY}, batch_size_mem: {MEMORY_ROWS}}}}}"
    text = f"  all_three:\n    plugins: [{head}, {replay}, {DISTILL}]\n"
    out = tmp_path_factory.mktemp("composed") / "out"
    return run_scenario(scenario(text), out), out


def test_the_three_plugins_run_in_one_strategy(composed) -> None:
    result, _ = composed
    outcome = outcome_of(result, "all_three")
    assert outcome["status"] == "ok", outcome["error"]
    assert len(outcome["accuracy_matrix"]) == 5


def test_the_distillation_sees_replays_rows_and_the_semantic_heads_logits(composed) -> None:
    seen = outcome_of(composed[0], "all_three")["plugins"]["LwfDistill"]
    batches = seen["batches"]
    assert batches > 0
    # replay's before_batch ran first: every batch but the very first carries 16 memory rows
    # after the stream's, samples of classes met so far, from experience 1 on of earlier ones
    assert seen["memory_rows"] == MEMORY_ROWS * (batches - 1)
    assert seen["memory_rows_of_seen_classes"] == seen["memory_rows"]
    assert seen["memory_rows_of_earlier_classes"] > 0
    # output: the MLP's features, and logits of the language head (scored against targets)
    assert seen["semantic_logits"] == batches
    assert (seen["features_width"], seen["logits_width"]) == (HIDDEN, N_CLASSES)
    assert seen["targets_match"] == batches  # one view: the targets are the batch's labels
    # the KL term was computed on every batch from experience 1 on
    assert 0 < seen["distilled"] < batches


def test_the_ledger_charges_the_buffer_the_old_model_and_the_semantic_head(composed) -> None:
    result, _ = composed
    parts = outcome_of(result, "all_three")["ledger"][-1]["parts"]
    sample_bytes = result.summary["dataset"]["sample_bytes"]
    # the semantic head: frozen targets (a buffer of the model) and the projection to them
    assert parts["model.buffers"] == N_CLASSES * TEXT_DIM * 4
    projection = (HIDDEN * TEXT_DIM + TEXT_DIM + 1) * 4  # Linear(32, 384) and the scale
    mlp_body = (64 * HIDDEN + HIDDEN) * 4
    assert parts["model.parameters"] == mlp_body + projection
    # the distillation's old model: a whole copy, semantic head included
    assert parts["LwfDistill.old_model.parameters"] == parts["model.parameters"]
    assert parts["LwfDistill.old_model.buffers"] == parts["model.buffers"]
    # replay's full buffer: CAPACITY raw samples
    assert parts["replay.buffer.x"] == CAPACITY * sample_bytes


# ---------------------------------------------------------------------------
# refused at start-up
# ---------------------------------------------------------------------------


def test_an_owner_beside_replay_is_refused_by_clsim_run(tmp_path) -> None:
    """nmc owns its experiences (class means, no gradient step), so replay's batch hooks
    would never fire: the strategy stops before its first experience, naming both."""
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO + "  means_and_replay:\n    plugins: [nmc, "
                    "{replay: {capacity: 20}}]\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--out", str(out), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    message = ("plugin 'nmc' owns the training of an experience (clsim_train_experience), "
               "so the standard loop's hooks of plugin 'replay' (clsim_before_batch, "
               "clsim_after_batch) would never fire")
    assert message in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"]["naive"]["status"] == "ok"
    assert message in summary["strategies"]["means_and_replay"]["error"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "experience_start"
                and e.get("strategy") == "means_and_replay"]


def test_clsim_validate_refuses_the_same_pair(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO + "  bad:\n    plugins: [{replay: {capacity: 20}}, "
                    "analytic]\n", encoding="utf-8")
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "clsim: error: strategy 'bad': plugin 'analytic' owns the training" in proc.stderr
    assert "plugin 'replay' (clsim_before_batch, clsim_after_batch)" in proc.stderr


def test_two_owners_are_refused_naming_both() -> None:
    result = run_scenario(scenario("  two_owners:\n    plugins: [nmc, analytic]\n"), None)
    error = outcome_of(result, "two_owners")["error"]
    assert error.startswith("plugins 'nmc' and 'analytic' both own the training of an "
                            "experience (clsim_train_experience)")


# ---------------------------------------------------------------------------
# malformed contributions to one batch
# ---------------------------------------------------------------------------


class DropsARow:
    """Returns one input row fewer than the batch has: not a whole number of views."""

    def clsim_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs[:-1]


class TwoViews:
    """Two whole views (the inputs and their negation): a valid multi-view batch."""

    def __init__(self) -> None:
        self.views_seen: list[int] = []

    def clsim_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([inputs, -inputs])

    def clsim_loss(self, batch: Batch, output: ForwardOutput) -> None:
        assert output.views == 2 and torch.equal(output.targets, batch.y.repeat(2))
        assert torch.equal(output.view(output.inputs, 1), -output.view(output.inputs, 0))
        self.views_seen.append(output.views)

    def clsim_report(self) -> dict:
        return {"batches_with_two_views": len(self.views_seen)}


class WeighsTheTaskLoss:
    def clsim_task_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor:
        return 2.0 * ctx.task_loss(output.logits, output.targets)


class ReplacesTheTaskLoss:
    def clsim_task_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor:
        return ctx.task_loss(output.logits, output.targets)


def test_inputs_that_are_not_whole_views_are_an_error() -> None:
    result = run_scenario(scenario("  drops:\n    plugins: [test_composition:DropsARow]\n"),
                          None)
    error = outcome_of(result, "drops")["error"]
    assert "the model inputs have 63 rows for a batch of 64 samples (plugins with " \
           "clsim_inputs: DropsARow)" in error


def test_whole_views_train_with_targets_repeated_per_view() -> None:
    result = run_scenario(scenario("  views:\n    plugins: [test_composition:TwoViews]\n"),
                          None)
    outcome = outcome_of(result, "views")
    assert outcome["status"] == "ok", outcome["error"]
    assert outcome["plugins"]["TwoViews"]["batches_with_two_views"] > 0


def test_two_replacements_of_the_task_loss_are_an_error_naming_both() -> None:
    text = ("  two_losses:\n    plugins: [test_composition:WeighsTheTaskLoss, "
            "test_composition:ReplacesTheTaskLoss]\n")
    error = outcome_of(run_scenario(scenario(text), None), "two_losses")["error"]
    assert "plugins 'WeighsTheTaskLoss' and 'ReplacesTheTaskLoss' both replaced the task " \
           "loss of one batch" in error
