"""Metrics, orders and the results document, checked against hand-computed numbers."""
from __future__ import annotations

import json
import math

import pytest

from cmerge.errors import CmergeError
from cmerge.evaluation.metrics import (
    accuracy_curve,
    average_accuracy,
    backward_transfer,
    check_matrix,
    final_accuracy,
    mean_std,
    summarize,
)
from cmerge.evaluation.orders import check_orders, shuffled_orders
from cmerge.evaluation.results import (
    add_method,
    combine_results,
    load_results,
    method_entry,
    new_results,
    save_results,
)

# Order A: tasks a, b, c. Row t = after step t on the tasks seen so far.
A = [[90.0],
     [80.0, 70.0],
     [60.0, 50.0, 40.0]]
# Order B: tasks c, a, b.
B = [[100.0],
     [90.0, 80.0],
     [70.0, 60.0, 50.0]]


def test_acc_is_mean_of_last_row():
    assert average_accuracy(A) == pytest.approx(50.0)
    assert average_accuracy(B) == pytest.approx(60.0)


def test_bwt_excludes_last_task():
    # (60 − 90) and (50 − 70) over T − 1 = 2; the last task's 40 − 40 is not counted.
    assert backward_transfer(A) == pytest.approx(-25.0)
    assert backward_transfer(B) == pytest.approx(-25.0)
    # a matrix where including the last task would change the result
    m = [[80.0], [70.0, 10.0]]
    assert backward_transfer(m) == pytest.approx(-10.0)


def test_bwt_positive_and_single_task():
    assert backward_transfer([[50.0], [60.0, 90.0]]) == pytest.approx(10.0)
    assert math.isnan(backward_transfer([[75.0]]))


def test_curve_and_final():
    assert accuracy_curve(A) == pytest.approx([90.0, 75.0, 50.0])
    assert final_accuracy(B, ["c", "a", "b"]) == {"c": 70.0, "a": 60.0, "b": 50.0}
    with pytest.raises(ValueError, match="order names 2 tasks"):
        final_accuracy(A, ["a", "b"])


def test_check_matrix_rejects_non_triangular():
    with pytest.raises(ValueError, match="row 1"):
        check_matrix([[1.0], [1.0]])
    with pytest.raises(ValueError, match="at least one row"):
        check_matrix([])


def test_none_is_nan():
    assert math.isnan(average_accuracy([[None]]))


def test_mean_std_uses_population_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_summarize_over_orders():
    s = summarize([A, B], [["a", "b", "c"], ["c", "a", "b"]])
    assert s["acc"] == pytest.approx([50.0, 60.0])
    assert (s["acc_mean"], s["acc_std"]) == pytest.approx((55.0, 5.0))
    assert (s["bwt_mean"], s["bwt_std"]) == pytest.approx((-25.0, 0.0))
    assert s["curve_mean"] == pytest.approx([95.0, 80.0, 55.0])
    assert s["curve_std"] == pytest.approx([5.0, 5.0, 5.0])
    # final accuracy per task name: a = (60, 60), b = (50, 50), c = (40, 70)
    assert s["final_mean"] == pytest.approx({"a": 60.0, "b": 50.0, "c": 55.0})
    assert s["final_std"] == pytest.approx({"a": 0.0, "b": 0.0, "c": 15.0})


def test_orders_are_seeded_distinct_permutations():
    tasks = ["a", "b", "c", "d"]
    first = shuffled_orders(tasks, 10, seed=3)
    assert first == shuffled_orders(tasks, 10, seed=3)
    assert first != shuffled_orders(tasks, 10, seed=4)
    assert len({tuple(o) for o in first}) == 10
    assert all(sorted(o) == tasks for o in first)
    # more orders than permutations: every permutation appears
    assert len({tuple(o) for o in shuffled_orders(["a", "b"], 5)}) == 2


def test_check_orders_refuses_unknown_or_repeated_tasks():
    with pytest.raises(CmergeError, match="unknown task 'z'"):
        check_orders([["a", "z"]], ["a", "b"])
    with pytest.raises(CmergeError, match="at most once"):
        check_orders([["a", "a"]], ["a", "b"])


def test_method_entry_from_outside_the_runner(tmp_path):
    entry = method_entry([A, B], [["a", "b", "c"], ["c", "a", "b"]], method="continual_finetune",
                         params={"lr": 1e-5}, note="trained elsewhere")
    assert entry["acc_mean"] == pytest.approx(55.0)
    assert entry["note"] == "trained elsewhere"
    results = new_results(["a", "b", "c"], {"pretrained": {"a": 50.0, "b": 40.0, "c": float("nan")}})
    add_method(results, "C. fine-tuned", entry)
    with pytest.raises(ValueError, match="already hold"):
        add_method(results, "C. fine-tuned", entry)
    path = save_results(results, tmp_path / "r.json")
    json.loads(path.read_text())  # strict JSON: NaN was written as null
    loaded = load_results(path)
    assert loaded["reference"]["pretrained"]["c"] is None
    assert loaded["methods"]["C. fine-tuned"]["matrices"] == [A, B]


def test_method_entry_checks_shapes():
    with pytest.raises(ValueError, match="one matrix per order"):
        method_entry([A], [["a", "b", "c"], ["c", "a", "b"]])
    with pytest.raises(ValueError, match="order 0 names 2 tasks"):
        method_entry([A], [["a", "b"]])


def test_load_results_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CmergeError, match="not valid JSON"):
        load_results(bad)
    with pytest.raises(CmergeError, match="cannot read"):
        load_results(tmp_path / "missing.json")
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"tasks": ["a"], "methods": {"m": {"orders": [["a"]], "matrices": [[[1, 2]]]}}}))
    with pytest.raises(CmergeError, match="method 'm': row 0"):
        load_results(shape)


def test_combine_results_unites_methods():
    one = new_results(["a", "b", "c"], {"pretrained": {"a": 1.0, "b": 2.0, "c": 3.0}})
    two = new_results(["a", "b", "c"])
    add_method(one, "x", method_entry([A], [["a", "b", "c"]]))
    add_method(two, "y", method_entry([B], [["c", "a", "b"]]))
    both = combine_results(one, two)
    assert list(both["methods"]) == ["x", "y"]
    assert both["reference"]["pretrained"]["c"] == 3.0
    with pytest.raises(ValueError, match="different task lists"):
        combine_results(one, new_results(["a"]))
