"""End to end on the toy suite: runner, sweep, report files and the two CLI commands."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmerge.evaluation import TaskResult
from cmerge.cli import main
from cmerge.evaluation.report import write_report
from cmerge.evaluation.results import add_sweep, combine_results, extend_entry, load_results, save_results, to_jsonable
from cmerge.evaluation.runner import run_continual, run_method, similarity_block
from cmerge.evaluation.similarity import cosine_similarity_matrix
from cmerge.evaluation.sweep import run_sweep
from cmerge.evaluation.toy import build_toy_suite
from cmerge.errors import CmergeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite():
    return build_toy_suite(n_tasks=4, seed=0, n_train=256, n_test=256)


@pytest.fixture(scope="module")
def results(suite):
    opcm = run_continual("opcm", {"alpha": 0.5}, suite.base, suite.experts, suite, n_orders=3, seed=7,
                         progress=False)
    average = run_continual("average", {}, suite.base, suite.experts, suite,
                            orders=opcm["methods"]["opcm"]["orders"], reference=opcm["reference"],
                            name="Average (SWA)", progress=False)
    combined = combine_results(opcm, average)
    add_sweep(combined, run_sweep("opcm", "alpha", [0.3, 0.7], suite.base, suite.experts, suite,
                                  orders=opcm["methods"]["opcm"]["orders"][:2], progress=False))
    combined["similarity"] = similarity_block(suite.base, suite.experts)
    return combined


def test_toy_suite_is_a_meaningful_benchmark(suite):
    pretrained = suite.evaluate(suite.base, suite.tasks)
    for task in suite.tasks:
        own = suite.evaluate(suite.experts[task], [task])[task]
        assert isinstance(own, TaskResult) and math.isfinite(own.loss)
        assert own.accuracy > pretrained[task].accuracy + 0.1


def test_toy_suite_is_deterministic(suite):
    again = build_toy_suite(n_tasks=4, seed=0, n_train=256, n_test=256)
    for task in suite.tasks:
        for name, tensor in suite.experts[task].items():
            torch.testing.assert_close(again.experts[task][name], tensor, rtol=0, atol=0)


def test_runner_matrices_have_the_protocol_shape(results, suite):
    entry = results["methods"]["opcm"]
    assert results["tasks"] == suite.tasks
    assert entry["method"] == "opcm" and entry["params"] == {"alpha": 0.5}
    assert len(entry["orders"]) == len(entry["matrices"]) == 3
    for order, matrix in zip(entry["orders"], entry["matrices"]):
        assert sorted(order) == sorted(suite.tasks)
        assert [len(row) for row in matrix] == [1, 2, 3, 4]
        assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    for key in ("acc_mean", "acc_std", "bwt_mean", "bwt_std"):
        assert math.isfinite(entry[key])
    assert set(results["reference"]) == {"pretrained", "finetuned"}
    assert set(results["reference"]["finetuned"]) == set(suite.tasks)


def test_first_row_is_the_expert_and_reference_rows_are_consistent(results):
    # After step 1, OPCM's merged model is the first expert itself (λ_1 = 1).
    entry = results["methods"]["opcm"]
    finetuned = results["reference"]["finetuned"]
    for order, matrix in zip(entry["orders"], entry["matrices"]):
        assert matrix[0][0] == pytest.approx(finetuned[order[0]], abs=1e-9)


def test_orders_are_reproducible_from_the_seed(suite, results):
    again = run_continual("opcm", {"alpha": 0.5}, suite.base, suite.experts, suite, n_orders=3, seed=7,
                          reference=results["reference"], progress=False)
    assert results["seed"] == again["seed"] == 7
    assert again["methods"]["opcm"]["orders"] == results["methods"]["opcm"]["orders"]
    assert again["methods"]["opcm"]["matrices"] == results["methods"]["opcm"]["matrices"]
    other = run_continual("average", {}, suite.base, suite.experts, suite, n_orders=3, seed=8,
                          reference=results["reference"], progress=False)
    assert other["methods"]["average"]["orders"] != results["methods"]["opcm"]["orders"]


def test_diagnostics_follow_the_paper(results):
    opcm = results["methods"]["opcm"]
    for lambdas, norms, distances in zip(opcm["lambdas"], opcm["task_norms"], opcm["merged_norms"]):
        assert lambdas[0] == pytest.approx(1.0)
        # adaptive scaling keeps ‖θ_merged − θ0‖ at the running mean of ‖τ_i‖ (Eq. 10)
        np.testing.assert_allclose(distances, np.cumsum(norms) / np.arange(1, len(norms) + 1), rtol=1e-4)
    average = results["methods"]["Average (SWA)"]
    assert "lambdas" not in average
    assert len(average["merged_norms"]) == 3


def test_a_row_extended_to_more_orders_is_the_row_run_on_all_of_them(results, suite):
    whole = results["methods"]["opcm"]
    orders = whole["orders"]
    first = run_method("opcm", {"alpha": 0.5}, suite.base, suite.experts, suite, orders[:1], progress=False)
    rest = run_method("opcm", {"alpha": 0.5}, suite.base, suite.experts, suite, orders[1:], progress=False)
    extended = extend_entry(json.loads(json.dumps(to_jsonable(first))), rest)  # the first part as read back from disk
    assert to_jsonable(extended) == to_jsonable(whole)
    assert len(extended["lambdas"]) == len(extended["task_norms"]) == 3
    with pytest.raises(CmergeError, match="'params' differs"):
        extend_entry(first, {**rest, "params": {"alpha": 0.7}})
    with pytest.raises(CmergeError, match="lacks 'lambdas'"):
        extend_entry(first, {k: v for k, v in rest.items() if k != "lambdas"})


def test_sweep_reports_curve_and_best(results):
    sweep = results["sweeps"]["opcm.alpha"]
    assert sweep["values"] == [0.3, 0.7] and len(sweep["entries"]) == 2
    assert [e["params"]["alpha"] for e in sweep["entries"]] == [0.3, 0.7]
    assert all(len(e["orders"]) == 2 for e in sweep["entries"])
    assert sweep["best"]["acc_mean"] == max(sweep["acc_mean"])
    assert sweep["best"]["value"] == sweep["values"][sweep["best"]["index"]]


def test_sweep_refuses_an_undeclared_parameter(suite):
    with pytest.raises(CmergeError, match="no parameter 'lam'"):
        run_sweep("opcm", "lam", [0.1], suite.base, suite.experts, suite, n_orders=1, progress=False)


def test_runner_refuses_a_percent_accuracy(suite):
    class Percent:
        def evaluate(self, model, tasks):
            return {t: TaskResult(accuracy=87.0) for t in tasks}

    with pytest.raises(CmergeError, match="fraction in \\[0, 1\\]"):
        run_continual("average", {}, suite.base, suite.experts, Percent(), n_orders=1, progress=False)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def test_report_writes_every_file(results, tmp_path):
    written = write_report(results, tmp_path)
    names = {p.name for p in written}
    expected_pngs = {"accuracy_vs_tasks.png", "accuracy_matrix_opcm.png", "accuracy_matrix_Average_SWA.png",
                     "lambda_vs_sqrt_t.png", "sweep_opcm.alpha.png", "similarity.png"}
    assert expected_pngs <= names
    assert {"table.md", "report.md", "summary.csv", "steps.csv", "sweeps.csv"} <= names
    for name in expected_pngs:
        _assert_png(tmp_path / name)
    table = (tmp_path / "table.md").read_text()
    assert "| Pre-trained |" in table and "| Fine-tuned (individual) |" in table and "| opcm |" in table
    steps = (tmp_path / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 2 * 3 * (1 + 2 + 3 + 4)


def test_json_round_trip_and_report_command(results, tmp_path):
    path = save_results(results, tmp_path / "results.json")
    loaded = load_results(path)
    assert loaded["methods"]["opcm"]["matrices"] == results["methods"]["opcm"]["matrices"]
    out = tmp_path / "rendered"
    run = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert run.exit_code == 0, run.output
    _assert_png(out / "accuracy_vs_tasks.png")
    assert (out / "table.md").exists()


def test_report_command_bad_input_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": ["a"]}))
    run = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "out")])
    assert run.exit_code == 2
    assert run.output.startswith("error: ") and "methods" in run.output
    assert not (tmp_path / "out").exists()


def test_similarity_command(suite, tmp_path):
    paths = []
    for name, sd in [("base", suite.base), *suite.experts.items()]:
        paths.append(tmp_path / f"{name}.pt")
        torch.save(sd, paths[-1])
    heatmap = tmp_path / "heatmap.png"
    run = CliRunner().invoke(main, ["similarity", *map(str, paths), "-o", str(heatmap), "--json"])
    assert run.exit_code == 0, run.output
    _assert_png(heatmap)
    matrix = json.loads(run.stdout)
    want = cosine_similarity_matrix(suite.base, [suite.experts[t] for t in suite.tasks])
    np.testing.assert_allclose(np.array(matrix), want, atol=1e-12)

    named = CliRunner().invoke(main, ["similarity", *map(str, paths[:3]), "--json", "--names", "x,y"])
    assert named.exit_code == 0 and len(json.loads(named.stdout)) == 2
    wrong = CliRunner().invoke(main, ["similarity", *map(str, paths[:3]), "--json", "--names", "x"])
    assert wrong.exit_code == 2
    neither = CliRunner().invoke(main, ["similarity", *map(str, paths[:3])])
    assert neither.exit_code == 2
    missing = CliRunner().invoke(main, ["similarity", str(paths[0]), str(tmp_path / "nope.pt"), "--json"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_the_similarity_heatmap_scales_to_the_off_diagonal_values(tmp_path):
    """The user report: a ±0.00035 scale with the diagonal (1.0) drawn as the same dark red as the maximum."""
    from cmerge.evaluation.plots import plot_similarity, similarity_colours

    m = np.eye(3) + np.array([[0, 2e-4, -3.5e-4], [2e-4, 0, 1e-4], [-3.5e-4, 1e-4, 0]])
    shown, scale = similarity_colours(m)
    assert scale == pytest.approx(3.5e-4)
    assert shown.mask.diagonal().all() and not shown.mask[~np.eye(3, dtype=bool)].any()
    m[0, 1] = float("nan")
    assert similarity_colours(m)[0].mask[0, 1] and similarity_colours(np.eye(2))[1] == 1.0
    assert plot_similarity(m.tolist(), ["a", "b", "c"], tmp_path / "s.png").stat().st_size > 0
