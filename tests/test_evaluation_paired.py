"""Paired comparisons over orders (metrics.paired_difference, results.paired_comparisons) and how the
report shows them; the report's run labels. Plain numbers, no models."""
from __future__ import annotations

import math

import pytest

from cmerge.errors import CmergeError
from cmerge.evaluation.metrics import paired_difference
from cmerge.evaluation.report import run_text, table1_markdown, write_report
from cmerge.evaluation.results import (
    add_method, load_results, method_entry, new_results, paired_comparisons, refresh_summaries, save_results,
)

# Student t quantiles, from printed tables (Abramowitz & Stegun 26.10): t_{0.975, df}.
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977934, 9: 2.2621571628540993}


def final_rows_matrix(order, finals):
    """A two-task accuracy matrix whose last row is ``finals`` (the diagonal is 50)."""
    return [[50.0], [finals[order[0]], finals[order[1]]]]


def entry_with_acc(orders, accs, method="opcm", **extra):
    """A method entry over two-task orders whose per-order ACC is ``accs`` exactly."""
    matrices = [[[50.0], [a - 1.0, a + 1.0]] for a in accs]
    return method_entry(matrices, orders, method=method, **extra)


def test_paired_difference_against_the_textbook_formula():
    a = [70.1, 69.4, 71.0, 70.6, 69.9]
    b = [69.0, 69.5, 69.8, 70.0, 68.7]
    out = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)   # sample sd, n - 1
    half = T975[4] * sd / math.sqrt(5)
    assert out["n"] == 5 and out["diff"] == pytest.approx(d, abs=1e-12)
    assert out["mean"] == pytest.approx(mean, abs=1e-12) and out["sd"] == pytest.approx(sd, abs=1e-12)
    assert (out["low"], out["high"]) == (pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))
    assert (out["wins"], out["losses"], out["ties"]) == (4, 1, 0)
    ten = paired_difference([float(i % 3) for i in range(10)], [0.0] * 10)
    sd10 = math.sqrt(sum((i % 3 - ten["mean"]) ** 2 for i in range(10)) / 9)
    assert ten["high"] - ten["mean"] == pytest.approx(T975[9] * sd10 / math.sqrt(10), abs=1e-9)
    assert paired_difference([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], confidence=0.5)["high"] < \
        paired_difference([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])["high"]


def test_paired_difference_edge_cases():
    one = paired_difference([70.0], [69.0])
    assert one["mean"] == 1.0 and math.isnan(one["sd"]) and math.isnan(one["low"]) and math.isnan(one["high"])
    same = paired_difference([70.0, 71.0], [70.0, 71.0])
    assert same["mean"] == 0.0 and same["low"] == same["high"] == 0.0 and same["ties"] == 2
    with pytest.raises(ValueError, match="one value per order"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0)


def test_paired_comparisons_match_orders_by_their_task_sequence():
    orders = [["a", "b"], ["b", "a"], ["a", "b"]]
    results = new_results(["a", "b"])
    add_method(results, "opcm", entry_with_acc(orders, [70.0, 71.0, 72.0]))
    add_method(results, "ta", entry_with_acc(orders, [69.0, 69.0, 73.0], method="task_arithmetic"))
    # a row run on the orders in another sequence, and on fewer of them (like continual fine-tuning)
    add_method(results, "cft", entry_with_acc([["b", "a"]], [75.0], method=None))
    paired = paired_comparisons(results, "opcm")
    assert paired["reference"] == "opcm" and set(paired["rows"]) == {"ta", "cft"}
    assert paired["rows"]["ta"]["diff"] == pytest.approx([-1.0, -2.0, 1.0])
    # order ["a", "b"] runs twice: the k-th run pairs with the reference's k-th run of it
    assert paired["rows"]["cft"]["diff"] == pytest.approx([4.0]) and paired["rows"]["cft"]["orders"] == 1
    assert "Student-t" in paired["interval"] and paired["confidence"] == 0.95


def test_refresh_keeps_or_changes_the_reference_and_refuses_an_unknown_one():
    orders = [["a", "b"], ["b", "a"]]
    results = new_results(["a", "b"])
    add_method(results, "opcm", entry_with_acc(orders, [70.0, 71.0]))
    add_method(results, "average", entry_with_acc(orders, [60.0, 61.0], method="average"))
    refresh_summaries(results)
    assert results["paired"]["reference"] == "opcm" and list(results["paired"]["rows"]) == ["average"]
    refresh_summaries(results, "average")
    assert results["paired"]["rows"]["opcm"]["mean"] == pytest.approx(10.0)
    refresh_summaries(results)   # the document's own choice is kept
    assert results["paired"]["reference"] == "average"
    with pytest.raises(CmergeError, match="no row 'nope' to compare with; the rows are opcm, average"):
        refresh_summaries(results, "nope")
    without = new_results(["a", "b"])
    add_method(without, "average", entry_with_acc(orders, [60.0, 61.0], method="average"))
    assert "paired" not in refresh_summaries(without)   # no opcm row: nothing to pair with


def test_report_shows_the_paired_column_section_csv_and_figure(tmp_path):
    orders = [["a", "b"], ["b", "a"], ["a", "b"]]
    results = new_results(["a", "b"], {"pretrained": {"a": 50.0, "b": 40.0}})
    add_method(results, "opcm", entry_with_acc(orders, [70.0, 71.0, 72.0], split="test"))
    add_method(results, "task_arithmetic", entry_with_acc(orders, [69.0, 69.0, 70.0], method="task_arithmetic",
                                                          split="test", params={"lam": 0.3},
                                                          chosen={"lam": "best of sweep task_arithmetic.lam "
                                                                          "on the validation split"}))
    written = write_report(results, tmp_path)
    names = {p.name for p in written}
    assert {"paired.csv", "paired_vs_opcm.png"} <= names
    table = (tmp_path / "table.md").read_text()
    assert "Δ ACC vs opcm [95% CI], orders won" in table
    mean = -5.0 / 3
    sd = math.sqrt(((-1 - mean) ** 2 + (-2 - mean) ** 2 + (-2 - mean) ** 2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    assert f"-1.7 [{mean - half:.1f}, {mean + half:.1f}], 0/3" in table
    assert "| opcm |" in table and "reference" in table
    assert "`task_arithmetic(lam=0.3†)`" in table
    report = (tmp_path / "report.md").read_text()
    assert "## Paired comparison with opcm" in report and "Every row is scored on the test split" in report
    assert len((tmp_path / "paired.csv").read_text().splitlines()) == 1 + 3


def test_report_command_takes_a_paired_reference_and_refuses_a_missing_row(tmp_path, cli):
    orders = [["a", "b"], ["b", "a"]]
    results = new_results(["a", "b"])
    add_method(results, "opcm", entry_with_acc(orders, [70.0, 71.0]))
    add_method(results, "average", entry_with_acc(orders, [60.0, 62.0], method="average"))
    path = save_results(results, tmp_path / "results.json")
    ok = cli("report", path, "-o", tmp_path / "out", "--paired-reference", "average")
    assert ok.exit_code == 0, ok.stderr
    assert "Δ ACC vs average" in (tmp_path / "out" / "table.md").read_text()
    assert load_results(path).get("paired") is None   # the report does not rewrite the results
    bad = cli("report", path, "-o", tmp_path / "bad", "--paired-reference", "nope")
    from helpers import assert_one_sentence_error
    assert_one_sentence_error(bad, "no row 'nope'")


def test_run_labels_tell_every_variant_apart():
    """The user report: `fisher_merge()` for both the align=ridge and the experts=linear rows."""
    orders = [["a", "b"]]
    entries = {
        "fisher_merge": entry_with_acc(orders, [60.0], method="fisher_merge", experts="standard"),
        "fisher_merge:align=ridge": entry_with_acc(orders, [60.0], method="fisher_merge", experts="standard",
                                                   alignment={"align": "ridge", "samples": 128}),
        "fisher_merge:experts=linear": entry_with_acc(orders, [60.0], method="fisher_merge", experts="linear"),
        "fisher_merge:experts=linear:align=ridge": entry_with_acc(orders, [60.0], method="fisher_merge",
                                                                  experts="linear", alignment={"align": "ridge"}),
        "opcm": entry_with_acc(orders, [60.0], params={"alpha": 0.5}),
        "opcm:keep_diagonal=true": entry_with_acc(orders, [60.0], params={"keep_diagonal": True, "alpha": 0.5}),
    }
    labels = {name: run_text(e) for name, e in entries.items()}
    assert len(set(labels.values())) == len(labels), labels
    assert labels["fisher_merge:experts=linear:align=ridge"] == "`fisher_merge(experts=linear, align=ridge)`"
    assert labels["fisher_merge"] == "`fisher_merge()`"
    results = new_results(["a", "b"])
    for name, e in entries.items():
        add_method(results, name, e)
    rows = [line for line in table1_markdown(results).splitlines() if line.startswith("| fisher_merge")]
    assert len({line.rsplit("|", 2)[-2] for line in rows}) == 4
