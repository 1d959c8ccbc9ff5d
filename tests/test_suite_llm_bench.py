"""The LLM benchmark end to end on a tiny random Llama and synthetic tasks: rows, resuming, the table."""
from __future__ import annotations

import json

import pytest

from cmerge.errors import CmergeError
from cmerge.evaluation.results import load_results
from cmerge.suites.llm import bench as llm_bench
from cmerge.suites.llm.bench import PromptConfig, leaderboard_markdown, parse_rows, run_llm_bench, setting_orders
from cmerge.suites.llm.lora import LoraRecipe, LoraTrainer
from cmerge.suites.llm.tasks import STANDARD_ORDERS, STANDARD_TASKS
from cmerge.suites.text_data import TextTask
from llm_tiny import tiny_backbone_folder

LABELS = {"wordnet_noun": ["act", "animal", "artifact"], "food_sentiment": ["great", "other"],
          "wordnet_domain": ["chemistry", "music"], "fortune_topic": ["computers", "love"]}
WORDS = "a domestic animal kept for company tool used to cut wood lovely tea fast law politics".split()


def synthetic_task(name: str, **_) -> TextTask:
    labels = LABELS[name]

    def examples(n, offset):
        return [(" ".join(WORDS[(i + offset + j) % len(WORDS)] for j in range(1 + i % 5)), i % len(labels))
                for i in range(n)]

    return TextTask(name, labels, labels, train=examples(12, 0), validation=examples(4, 3), test=examples(5, 7))


def test_rows_parse_with_the_on_key():
    rows = parse_rows("opcm:on=ab,opcm:alpha=0.3,seqlora,slao,ties:lam=0.2:on=dw")
    assert [(r.label, r.kind, r.on) for r in rows] == [
        ("opcm:on=ab", "merge", "ab"), ("opcm:alpha=0.3", "merge", "dw"), ("seqlora", "seqlora", "dw"),
        ("slao", "slao", "dw"), ("ties:lam=0.2:on=dw", "merge", "dw")]
    assert rows[1].spec.params == {"alpha": 0.3} and rows[0].spec.method == "opcm"
    for bad in ("opcm:on=xy", "nosuch", "opcm,opcm", "opcm:experts=linear"):
        with pytest.raises(CmergeError):
            parse_rows(bad)


def test_orders_are_olora_s_for_standard_and_shuffled_for_long():
    assert setting_orders("standard", STANDARD_TASKS, 2, 0) == [list(o) for o in STANDARD_ORDERS[:2]]
    with pytest.raises(CmergeError, match="3 fixed orders"):
        setting_orders("standard", STANDARD_TASKS, 4, 0)
    long = setting_orders("long", list("abcdefgh"), 3, 0)
    assert len(long) == 3 and all(sorted(o) == list("abcdefgh") for o in long)


def test_bench_end_to_end_on_a_tiny_llama(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_bench, "load_task", synthetic_task)
    folder = tiny_backbone_folder(tmp_path / "backbone")
    kwargs = dict(setting="standard", methods="opcm:on=ab,opcm,average,seqlora,slao", n_orders=2,
                  recipe=LoraRecipe(steps=2, batch_size=2, warmup_steps=0),
                  prompts=PromptConfig(n_test=3, n_validation=2),
                  sweeps=["task_arithmetic:lam=0.2/0.4"], device="cpu", backbone=folder, cache_dir=tmp_path / "cache",
                  progress=False)
    first = run_llm_bench(tmp_path / "out", **{**kwargs, "n_orders": 1})
    results = run_llm_bench(tmp_path / "out", **kwargs)  # extends the one-order run with the second order

    assert results["tasks"] == list(STANDARD_TASKS)
    for name, entry in first["methods"].items():
        assert results["methods"][name]["matrices"][0] == entry["matrices"][0], name
    assert set(results["reference"]) >= {"pretrained", "finetuned", "multitask"}
    assert list(results["methods"]) == ["opcm:on=ab", "opcm", "average", "seqlora", "slao"]
    for name, entry in results["methods"].items():
        assert entry["orders"] == [list(o) for o in STANDARD_ORDERS[:2]]
        assert [len(row) for row in entry["matrices"][0]] == [1, 2, 3, 4]
        assert all(v is not None for m in entry["matrices"] for row in m for v in row), name
        assert entry["split"] == "test"
    assert results["methods"]["opcm:on=ab"]["params"]["project"] == [llm_bench.FACTOR_PATTERN]
    assert results["methods"]["opcm:on=ab"]["on"] == "ab" and results["methods"]["opcm"]["on"] == "dw"
    assert results["sweeps"]["task_arithmetic.lam"]["split"] == "validation"
    # SeqLoRA and SLAO start every order from the task's individual expert; later adapters differ
    experts = results["suite"]["experts"]
    for kind in ("seqlora", "slao"):
        chains = results["methods"][kind]["adapters"]
        assert [c[0] for c in chains] == [experts[o[0]] for o in STANDARD_ORDERS[:2]]
        assert chains[0][1] != experts[STANDARD_ORDERS[0][1]]
    assert results["methods"]["seqlora"]["adapters"][0][:2] == results["methods"]["seqlora"]["adapters"][1][:2]
    assert results["methods"]["slao"]["adapters"][0][1] != results["methods"]["seqlora"]["adapters"][0][1]
    out = tmp_path / "out"
    assert (out / "report.md").is_file() and "OPCM (on A and B)" in (out / "leaderboard.md").read_text()
    saved = load_results(out / "results.json")
    assert json.dumps(saved["methods"]["slao"]["matrices"]) == json.dumps(results["methods"]["slao"]["matrices"])

    # resuming: nothing is trained again, and the document is the same
    def no_training(*args, **kwargs):
        raise AssertionError("a cached adapter was trained again")

    monkeypatch.setattr(LoraTrainer, "train", no_training)
    again = run_llm_bench(tmp_path / "out", **kwargs)
    assert again["methods"].keys() == results["methods"].keys()
    assert again["reference"] == saved["reference"]

    # a row stopped at its second order keeps the first; the rerun finishes it as the whole run did
    calls, real = [], llm_bench.run_method

    def stop_at_second(*args, **kw):
        calls.append(args[5])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(llm_bench, "run_method", stop_at_second)
    cut = {**kwargs, "methods": "opcm", "sweeps": []}
    with pytest.raises(KeyboardInterrupt):
        run_llm_bench(tmp_path / "cut", **cut)
    assert load_results(tmp_path / "cut" / "results.json")["methods"]["opcm"]["orders"] == calls[0]
    monkeypatch.setattr(llm_bench, "run_method", real)
    finished = run_llm_bench(tmp_path / "cut", **cut)["methods"]["opcm"]
    assert finished["matrices"] == results["methods"]["opcm"]["matrices"]


def test_leaderboard_sits_beside_the_published_llama_numbers():
    results = {"suite": {"setting": "standard"}, "reference": {"multitask": {"a": 50.0}},
               "methods": {"slao": {"acc_mean": 40.0, "acc_std": 1.0, "bwt_mean": -2.0, "bwt_std": 0.5,
                                    "orders": [["a"]]}}}
    table = leaderboard_markdown(results)
    assert "| SLAO | 40.0 ± 1.0 | -2.0 ± 0.5 | 1 | 80.4 |" in table
    assert "| Multi-task LoRA | 50.0 | — | — | 80.9 |" in table
    assert "Llama-2-7B-chat" in table
