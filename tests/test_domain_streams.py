"""Domain-incremental streams (permuted and rotated inputs) and the three scenarios of van
de Ven et al.: labels, task ids, transforms, determinism, the multi-headed loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.data import load_dataset
from clsim.data.dataset import Dataset
from clsim.resources import estimate_run
from clsim.runner import run_scenario
from clsim.streams.domain_incremental import permute, permuted, rotate, rotated


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("scenario", ["domain", "class", "task"])
def test_permuted_labels_and_task_ids_follow_the_scenario(digits, scenario):
    stream = permuted(digits, seed=0, n_experiences=3, scenario=scenario)
    c = digits.n_classes
    shifted = scenario != "domain"
    assert stream.n_classes == (3 * c if shifted else c)
    assert stream.task_labels == (scenario == "task")
    for t, exp in enumerate(stream):
        offset = t * c if shifted else 0
        assert exp.classes == tuple(range(offset, offset + c))
        assert torch.equal(exp.train_y, digits.y_train + offset)
        assert torch.equal(exp.test_y, digits.y_test + offset)
        assert exp.task_id == (t if scenario == "task" else None)


def _position_coded(n_train: int = 6, n_test: int = 4) -> Dataset:
    """A dataset whose every sample holds its pixel's position as its value (8x8 uint8),
    so a transformed sample shows where each pixel went."""
    grid = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8)
    return Dataset("grid", grid.repeat(n_train, 1, 1, 1), torch.arange(n_train) % 2,
                   grid.repeat(n_test, 1, 1, 1), torch.arange(n_test) % 2, ("a", "b"))


def test_one_permutation_per_experience_shared_by_train_and_test():
    data = _position_coded()
    stream = permuted(data, seed=3, n_experiences=3)
    perms = []
    for exp in stream:
        assert exp.train_x.dtype == torch.uint8 and exp.train_x.shape == data.x_train.shape
        perm = exp.train_x[0].reshape(-1).long()
        assert sorted(perm.tolist()) == list(range(64))  # a bijection of the positions
        for x in (*exp.train_x, *exp.test_x):  # every sample, train and test, the same way
            assert torch.equal(x.reshape(-1).long(), perm)
        perms.append(perm)
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    again = permuted(data, seed=3, n_experiences=3)
    other = permuted(data, seed=4, n_experiences=3)
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(stream, again, strict=True))
    assert not torch.equal(stream[0].train_x, other[0].train_x)


def test_permute_moves_pixels_the_same_way_in_every_channel():
    x = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    perm = torch.tensor([3, 1, 0, 2])
    out = permute(x, perm)
    for c in range(3):
        assert torch.equal(out[:, c].reshape(2, -1), x[:, c].reshape(2, -1)[:, perm])


@pytest.mark.parametrize("shape", [(2, 12), (2, 3, 4)])
def test_permute_reorders_every_value_of_vectors_and_2d_samples(shape):
    x = torch.arange(24).reshape(shape)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    out = permute(x, perm)
    assert out.shape == x.shape
    assert torch.equal(out.reshape(2, -1), x.reshape(2, -1)[:, perm])


def test_keep_first_leaves_the_first_experience_untouched(digits):
    stream = permuted(digits, seed=0, n_experiences=2, keep_first=True)
    assert torch.equal(stream[0].train_x, digits.x_train)
    assert not torch.equal(stream[1].train_x, digits.x_train)
    turned = rotated(digits, seed=0, n_experiences=2, keep_first=True)
    assert turned.description["angles"][0] == 0.0
    assert torch.equal(turned[0].test_x, digits.x_test)


def test_rotation_by_right_angles_is_exact():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    for k in (1, 2, 3):
        assert torch.equal(rotate(x, 90 * k), torch.rot90(x, k, dims=(2, 3)))
    assert torch.equal(rotate(x, -360), x)


def test_rotation_of_a_non_square_image_turns_about_its_centre():
    """A dot a pixel right of the centre of a 16 x 32 image lands a pixel above it after
    90 degrees (counter-clockwise), not stretched by the aspect ratio."""
    x = torch.zeros(1, 1, 16, 32, dtype=torch.uint8)
    x[0, 0, 7, 20] = 200  # centre (7.5, 15.5): 4.5 right, 0.5 up
    turned = rotate(x, 90)[0, 0].float()
    rows, cols = torch.nonzero(turned, as_tuple=True)
    weights = turned[rows, cols]
    centre = (float((rows * weights).sum() / weights.sum()),
              float((cols * weights).sum() / weights.sum()))
    assert centre == pytest.approx((7.5 - 4.5, 15.5 - 0.5), abs=0.01)


def test_rotated_angles_given_or_drawn_from_the_seed(digits):
    given = rotated(digits, seed=0, n_experiences=2, angles=[90, 180])
    assert given.description["angles"] == [90.0, 180.0]
    assert torch.equal(given[0].train_x, torch.rot90(digits.x_train, 1, dims=(2, 3)))
    drawn = rotated(digits, seed=5, n_experiences=4, min_angle=10, max_angle=20)
    angles = drawn.description["angles"]
    assert all(10 <= a < 20 for a in angles) and len(set(angles)) == 4
    assert rotated(digits, seed=5, n_experiences=4, min_angle=10,
                   max_angle=20).description["angles"] == angles


def test_multi_headed_loss_is_cross_entropy_over_the_outputs_of_the_labels_task(digits):
    ctx = RunContext(strategy="s", model=nn.Linear(2, 8), device=torch.device("cpu"),
                     data=digits.info(), seed=0, epochs=1, batch_size=4)
    logits = torch.randn(5, 8)
    y = torch.tensor([0, 1, 3, 5, 7])
    assert torch.equal(ctx.task_loss(logits, y), F.cross_entropy(logits, y))  # no task met
    ctx.task_classes = {0: (0, 1), 1: (2, 3), 3: (4, 5)}  # task 2 not met, 6 and 7 in none
    expected = torch.stack([
        F.cross_entropy(logits[0:1, 0:2], y[0:1]),
        F.cross_entropy(logits[1:2, 0:2], y[1:2]),
        F.cross_entropy(logits[2:3, 2:4], y[2:3] - 2),
        F.cross_entropy(logits[3:4, 4:6], y[3:4] - 4),
        F.cross_entropy(logits[4:5], y[4:5]),  # a label of no task met: every output
    ]).mean()
    torch.testing.assert_close(ctx.task_loss(logits, y), expected)


SCENARIO = """
name: permuted_digits
seed: 0
threads: 1
data: {dataset: digits}
stream: {type: permuted, n_experiences: 3, scenario: SCENARIO}
model: {name: mlp, hidden: [32]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
strategies:
  naive: {plugins: [naive, 'test_domain_streams:HeadWatcher']}
"""


class HeadWatcher:
    """Keeps the head's weights at setup and after the first experience (a test probe)."""

    seen: dict[str, torch.Tensor] = {}

    def clsim_setup(self, ctx) -> None:
        HeadWatcher.seen["setup"] = ctx.model.head.weight.detach().clone()

    def clsim_after_experience(self, ctx, experience) -> None:
        if experience.index == 0:
            HeadWatcher.seen["after 0"] = ctx.model.head.weight.detach().clone()


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_task_scenario_trains_only_the_current_tasks_head(scenario):
    """Plain SGD: with task ids, the outputs of tasks not met get no gradient from the
    loss, so their rows of the head keep their initial weights; without, they move."""
    run_scenario(parse_scenario(SCENARIO.replace("SCENARIO", scenario)), None)
    before, after = HeadWatcher.seen["setup"], HeadWatcher.seen["after 0"]
    assert before.shape[0] == 30
    assert not torch.equal(before[:10], after[:10])
    assert torch.equal(before[10:], after[10:]) == (scenario == "task")


def test_task_ids_restrict_predictions_to_the_task():
    result = {s: run_scenario(parse_scenario(SCENARIO.replace("SCENARIO", s)), None)
              .summary["strategies"]["naive"] for s in ("task", "class")}
    # a 10-way choice among the task's own outputs against a 30-way one
    assert result["task"]["final_accuracy"] > result["class"]["final_accuracy"] + 0.2


def test_memory_estimate_counts_one_dataset_copy_per_experience():
    permuted_3 = estimate_run(parse_scenario(SCENARIO.replace("SCENARIO", "class")), None)
    parts = list(permuted_3.parts.values())
    (_, dataset), (key, copies) = parts[0], parts[1]
    assert copies == 3 * dataset and key == "stream.n_experiences"  # the key a fix changes
