"""Metrics checked against numbers worked out by hand."""

import json

import numpy as np
import pytest

from clsim.metrics import (
    AccuracyMatrix,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    forward_transfer,
    from_predictions,
    per_experience_forgetting,
    seen_accuracy,
    summarize,
)

EXACT = 1e-12


def approx(value: float) -> object:
    return pytest.approx(value, abs=EXACT)


# Three experiences with unequal test sets: 100, 50 and 250 samples (400 in all).
#
#   correct                      R = correct / counts
#   after 0: [ 90, 10,  25]      [0.9, 0.2, 0.1]
#   after 1: [ 60, 45,  50]      [0.6, 0.9, 0.2]
#   after 2: [ 70, 30, 200]      [0.7, 0.6, 0.8]
#
# initial (untrained) correct: [10, 10, 25] -> b = [0.1, 0.2, 0.1]
@pytest.fixture
def m3() -> AccuracyMatrix:
    return AccuracyMatrix(
        correct=np.array([[90, 10, 25], [60, 45, 50], [70, 30, 200]]),
        counts=np.array([100, 50, 250]),
        initial_correct=np.array([10, 10, 25]),
    )


def test_accuracy_matrix(m3: AccuracyMatrix) -> None:
    expected = [[0.9, 0.2, 0.1], [0.6, 0.9, 0.2], [0.7, 0.6, 0.8]]
    np.testing.assert_allclose(m3.accuracy(), expected, rtol=0, atol=EXACT)
    assert m3.accuracy().dtype == np.float64
    assert m3.correct.dtype == np.int64 and m3.counts.dtype == np.int64
    assert m3.n_experiences == 3


def test_final_accuracy_is_sample_weighted(m3: AccuracyMatrix) -> None:
    # (70 + 30 + 200) / (100 + 50 + 250) = 300 / 400 = 0.75
    assert final_accuracy(m3) == approx(0.75)
    # the unweighted mean of the last row would be (0.7 + 0.6 + 0.8) / 3 = 0.7
    assert final_accuracy(m3) != approx(0.7)


def test_seen_accuracy(m3: AccuracyMatrix) -> None:
    assert seen_accuracy(m3, 0) == approx(0.9)  # 90 / 100
    assert seen_accuracy(m3, 1) == approx(0.7)  # (60 + 45) / (100 + 50) = 105 / 150
    assert seen_accuracy(m3, 2) == approx(0.75)  # 300 / 400, the final accuracy
    with pytest.raises(IndexError):
        seen_accuracy(m3, 3)
    with pytest.raises(IndexError):
        seen_accuracy(m3, -1)


def test_average_incremental_accuracy(m3: AccuracyMatrix) -> None:
    # (0.9 + 0.7 + 0.75) / 3 = 2.35 / 3
    assert average_incremental_accuracy(m3) == approx(2.35 / 3)


def test_forgetting(m3: AccuracyMatrix) -> None:
    # j = 0: max(R[0,0], R[1,0]) - R[2,0] = max(0.9, 0.6) - 0.7 = 0.2
    # j = 1: max(R[1,1])         - R[2,1] = 0.9 - 0.6            = 0.3
    np.testing.assert_allclose(per_experience_forgetting(m3), [0.2, 0.3], rtol=0, atol=EXACT)
    assert forgetting(m3) == approx(0.25)  # (0.2 + 0.3) / 2


def test_backward_transfer(m3: AccuracyMatrix) -> None:
    # ((R[2,0] - R[0,0]) + (R[2,1] - R[1,1])) / 2 = ((0.7 - 0.9) + (0.6 - 0.9)) / 2 = -0.25
    assert backward_transfer(m3) == approx(-0.25)


def test_forward_transfer(m3: AccuracyMatrix) -> None:
    # j = 1: R[0,1] - b[1] = 0.2 - 0.2 = 0.0
    # j = 2: R[1,2] - b[2] = 0.2 - 0.1 = 0.1     -> (0.0 + 0.1) / 2 = 0.05
    assert forward_transfer(m3) == approx(0.05)


def test_forward_transfer_needs_initial_evaluation(m3: AccuracyMatrix) -> None:
    m = AccuracyMatrix(correct=m3.correct, counts=m3.counts)
    assert m.initial_accuracy() is None
    assert forward_transfer(m) is None
    assert summarize(m)["forward_transfer"] is None
    assert summarize(m)["initial_accuracy"] is None


def test_forgetting_uses_the_best_earlier_accuracy() -> None:
    # Experience 0 rises from 0.5 to 0.8 while learning experience 1, then falls to 0.6.
    #   R = [[0.5, 0.1, 0.0],
    #        [0.8, 0.7, 0.1],
    #        [0.6, 0.7, 0.9]]          (10 test samples each)
    m = AccuracyMatrix(
        correct=np.array([[5, 1, 0], [8, 7, 1], [6, 7, 9]]), counts=np.array([10, 10, 10])
    )
    # j = 0: max(0.5, 0.8) - 0.6 = 0.2 (R[0,0] - R[2,0] would say -0.1)
    # j = 1: max(0.7) - 0.7 = 0.0
    np.testing.assert_allclose(per_experience_forgetting(m), [0.2, 0.0], rtol=0, atol=EXACT)
    assert forgetting(m) == approx(0.1)
    # BWT compares with R[j, j] only: ((0.6 - 0.5) + (0.7 - 0.7)) / 2 = 0.05
    assert backward_transfer(m) == approx(0.05)


def test_negative_forgetting_when_last_experience_helps() -> None:
    # R column 0: 0.4 after experience 0, 0.6 after experience 1 -> f[0] = 0.4 - 0.6
    m = AccuracyMatrix(correct=np.array([[4, 0], [6, 9]]), counts=np.array([10, 10]))
    assert forgetting(m) == approx(-0.2)
    assert backward_transfer(m) == approx(0.2)


def test_single_experience() -> None:
    m = AccuracyMatrix(correct=np.array([[7]]), counts=np.array([10]))
    assert final_accuracy(m) == approx(0.7)
    assert seen_accuracy(m, 0) == approx(0.7)
    assert average_incremental_accuracy(m) == approx(0.7)
    assert per_experience_forgetting(m).shape == (0,)
    assert forgetting(m) == 0.0
    assert backward_transfer(m) == 0.0
    assert forward_transfer(m) is None
    with_initial = AccuracyMatrix(
        correct=np.array([[7]]), counts=np.array([10]), initial_correct=np.array([1])
    )
    assert forward_transfer(with_initial) == 0.0
    summary = summarize(with_initial)
    assert summary["accuracy_matrix"] == [[0.7]]
    assert summary["per_experience_forgetting"] == []
    assert summary["initial_accuracy"] == [0.1]


def test_summarize_keys_values_and_json_round_trip(m3: AccuracyMatrix) -> None:
    summary = summarize(m3)
    for key in (
        "accuracy_matrix",
        "final_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "backward_transfer",
        "forward_transfer",
    ):
        assert key in summary
    assert summary["final_accuracy"] == final_accuracy(m3)
    assert summary["average_incremental_accuracy"] == average_incremental_accuracy(m3)
    assert summary["forgetting"] == forgetting(m3)
    assert summary["backward_transfer"] == backward_transfer(m3)
    assert summary["forward_transfer"] == forward_transfer(m3)
    assert summary["seen_accuracy"] == [seen_accuracy(m3, i) for i in range(3)]
    # plain Python types only
    assert all(type(v) is float for row in summary["accuracy_matrix"] for v in row)
    for key in ("final_accuracy", "forgetting", "backward_transfer", "forward_transfer"):
        assert type(summary[key]) is float
    text = json.dumps(summary, sort_keys=True)
    assert json.loads(text) == summary
    assert json.dumps(summarize(m3), sort_keys=True) == text  # deterministic


def test_raw_counts_round_trip(m3: AccuracyMatrix) -> None:
    data = json.loads(json.dumps(m3.to_dict()))
    back = AccuracyMatrix.from_dict(data)
    assert np.array_equal(back.correct, m3.correct)
    assert np.array_equal(back.counts, m3.counts)
    assert back.initial_correct is not None and m3.initial_correct is not None
    assert np.array_equal(back.initial_correct, m3.initial_correct)
    no_initial = AccuracyMatrix(correct=m3.correct, counts=m3.counts)
    assert AccuracyMatrix.from_dict(no_initial.to_dict()).initial_correct is None


def test_from_predictions() -> None:
    targets = [np.array([0, 1, 1, 0]), np.array([2, 3])]
    preds = [
        [np.array([0, 1, 0, 0]), np.array([0, 0])],  # after 0: 3 of 4, 0 of 2
        [np.array([2, 1, 1, 2]), np.array([2, 3])],  # after 1: 2 of 4, 2 of 2
    ]
    initial = [np.array([1, 1, 1, 1]), np.array([3, 3])]  # 2 of 4, 1 of 2
    m = from_predictions(preds, targets, initial_preds=initial)
    assert m.correct.tolist() == [[3, 0], [2, 2]]
    assert m.counts.tolist() == [4, 2]
    assert m.initial_correct is not None and m.initial_correct.tolist() == [2, 1]
    assert final_accuracy(m) == approx(4 / 6)
    assert from_predictions(preds, targets).initial_correct is None


def test_from_predictions_rejects_mismatched_shapes() -> None:
    targets = [np.array([0, 1]), np.array([2, 3])]
    with pytest.raises(ValueError, match="rows"):
        from_predictions([[np.array([0, 1]), np.array([2, 3])]], targets)
    with pytest.raises(ValueError, match="experience 1"):
        from_predictions([[np.array([0, 1]), np.array([2])]] * 2, targets)


@pytest.mark.parametrize(
    ("correct", "counts", "initial", "match"),
    [
        ([[1, 2]], [3, 3], None, "shape"),
        ([[1, 2], [3, 4]], [3], None, "shape"),
        ([[1, 2], [3, 4]], [3, 3], None, r"\[0, counts"),
        ([[1, -1], [3, 3]], [3, 3], None, r"\[0, counts"),
        ([[1, 2], [3, 3]], [3, 0], None, "at least one sample"),
        ([[0.5, 2], [3, 3]], [3, 3], None, "integer"),
        ([[1, 2], [3, 3]], [3, 3], [1], "initial_correct"),
        ([[1, 2], [3, 3]], [3, 3], [1, 4], "initial_correct"),
    ],
)
def test_invalid_matrices_rejected(
    correct: list, counts: list, initial: list | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        AccuracyMatrix(
            correct=np.array(correct),
            counts=np.array(counts),
            initial_correct=None if initial is None else np.array(initial),
        )
