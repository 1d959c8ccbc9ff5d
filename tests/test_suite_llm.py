"""The LLM suite's pieces on tiny models built on the fly: prompts, label scoring, LoRA, SLAO."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cmerge.errors import CmergeError
from cmerge.suites.llm import tasks as llm_tasks
from cmerge.suites.llm.lora import (LoraRecipe, LoraTrainer, adapted_weights, delta_weights, factor_pairs,
                                    merged_weights, weight_name)
from cmerge.suites.llm.scoring import LLMEvaluator, answer_nll, label_logprobs
from cmerge.suites.llm.sequential import slao_init, slao_merge, slao_merge_b, slao_start
from cmerge.suites.llm.tasks import Prompts, encode, task_splits
from cmerge.suites.text_data import TextTask
from llm_tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lm():
    return tiny_llama()


def random_prompts(seed: int = 0, n: int = 7, vocab: int = 400) -> Prompts:
    """Prompts with inputs of different lengths and answers of 1 to 3 tokens (none a prefix of another)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return tuple(torch.randint(10, vocab, (k,), generator=g).tolist())

    answers = ((11,), (12, 40, 41), (13, 42), (14, 43, 44), (15,))
    inputs = tuple(ids(int(torch.randint(1, 9, (1,), generator=g))) for _ in range(n))
    labels = tuple(int(torch.randint(0, len(answers), (1,), generator=g)) for _ in range(n))
    return Prompts("toy", ids(6), inputs, answers, labels)


def naive_logprobs(lm, prompts: Prompts) -> torch.Tensor:
    """One full forward pass per example and label: Σ_j log p(answer_j | prefix, input, answer_<j)."""
    out = torch.zeros(len(prompts), len(prompts.answers), dtype=torch.float64)
    with torch.no_grad():
        for i, inp in enumerate(prompts.inputs):
            for k, answer in enumerate(prompts.answers):
                seq = list(prompts.prefix) + list(inp) + list(answer)
                logp = lm(torch.tensor([seq])).logits[0].double().log_softmax(-1)
                start = len(seq) - len(answer)
                out[i, k] = sum(logp[start - 1 + j, t] for j, t in enumerate(answer))
    return out


# ------------------------------------------------------------------------------ prompts


def test_prompt_is_the_chat_template_with_the_text_in_place(tok):
    labels = ["act", "animal", "artifact"]
    examples = [("a domestic animal kept for company", 1), ("the act of running", 0)]
    p = encode(tok, "wordnet_noun", labels, examples)
    question, field = llm_tasks.INSTRUCTIONS["wordnet_noun"]
    for (text, _), inp in zip(examples, p.inputs):
        expected = tok.apply_chat_template(
            [{"role": "user", "content": f"{question} Answer with one of: act, animal, artifact.\n{field}: {text}"}],
            tokenize=False, add_generation_prompt=True)
        assert tok.decode(list(p.prefix) + list(inp)) == expected
    assert tok.decode(p.prefix).endswith(f"{field}:")
    assert [tok.decode(a) for a in p.answers] == labels
    assert p.labels == (1, 0) and len(p) == 2


def test_prompt_cuts_the_text_not_the_turn_end(tok):
    long = "computers are fast " * 30
    full = encode(tok, "fortune_topic", ["computers", "love"], [(long, 0)], max_text_tokens=1000)
    cut = encode(tok, "fortune_topic", ["computers", "love"], [(long, 0)], max_text_tokens=5)
    end = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert list(cut.inputs[0][-len(end):]) == end and len(cut.inputs[0]) == 5 + len(end)
    assert cut.inputs[0][:5] == full.inputs[0][:5]
    assert cut.fingerprint() != full.fingerprint()


def test_labels_whose_tokens_begin_another_label_are_refused(tok):
    with pytest.raises(CmergeError, match="begin those of"):
        encode(tok, "word_pos", ["noun", "noun noun"], [("x", 0)])
    with pytest.raises(CmergeError, match="no instruction"):
        encode(tok, "no_such_task", ["a", "b"], [("x", 0)])


def test_splits_hold_out_validation_from_train_unless_the_task_has_one():
    train = [(f"t{i}", i % 2) for i in range(20)]
    test = [(f"s{i}", 0) for i in range(9)]
    has_validation = "validation" in {f.name for f in dataclasses.fields(TextTask)}
    extra = {"validation": []} if has_validation else {}
    task = TextTask("t", ["a", "b"], ["a", "b"], train=train, test=test, **extra)
    s = task_splits(task, n_test=5, n_validation=4)
    assert s.train == train[:16] and s.validation == train[16:] and s.test == test[:5]
    own = SimpleNamespace(name="t", train=train, test=test, validation=[("v", 1)] * 10)  # a task with its own split
    s = task_splits(own, n_test=5, n_validation=4)
    assert s.train == train and s.validation == [("v", 1)] * 4


def test_standard_setting_is_olora_orders_over_our_four_tasks():
    assert set(llm_tasks.STANDARD_TASKS) == set(llm_tasks.OLORA_STANDARD.values())
    assert llm_tasks.STANDARD_ORDERS[0] == ("wordnet_noun", "food_sentiment", "fortune_topic", "wordnet_domain")
    assert llm_tasks.STANDARD_ORDERS[2] == ("fortune_topic", "food_sentiment", "wordnet_domain", "wordnet_noun")
    assert len(set(llm_tasks.LONG_TASKS)) == 8 and set(llm_tasks.STANDARD_TASKS) < set(llm_tasks.LONG_TASKS)
    assert set(llm_tasks.LONG_TASKS) <= set(llm_tasks.INSTRUCTIONS)


# ------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_label_scoring_equals_naive(lm, batch_size):
    prompts = random_prompts()
    fast = label_logprobs(lm, prompts, batch_size=batch_size)
    torch.testing.assert_close(fast, naive_logprobs(lm, prompts), atol=2e-5, rtol=0)


def test_training_loss_equals_naive_answer_nll(lm):
    prompts = random_prompts(seed=1)
    idx = [0, 3, 5, 6]
    nll, count = 0.0, 0
    for i in idx:
        answer = prompts.answers[prompts.labels[i]]
        seq = list(prompts.prefix) + list(prompts.inputs[i]) + list(answer)
        logits = lm(torch.tensor([seq])).logits[0]
        start = len(seq) - len(answer)
        nll += F.cross_entropy(logits[start - 1:len(seq) - 1], torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    torch.testing.assert_close(answer_nll(lm, prompts, idx).item(), nll / count, atol=2e-5, rtol=0)


def test_evaluator_scores_loaded_weights_and_restores_the_rest(lm):
    model = copy.deepcopy(lm)
    prompts = random_prompts(seed=2)
    ev = LLMEvaluator(model, {"toy": prompts}, batch_size=4)
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = model.state_dict()[name].clone()
    base = ev.evaluate({}, ["toy"])["toy"]
    scores = label_logprobs(model, prompts)
    assert base.accuracy == pytest.approx((scores.argmax(1) == torch.tensor(prompts.labels)).double().mean().item())
    ev.evaluate({name: w0 + 1.0}, ["toy"])
    assert torch.equal(model.state_dict()[name], w0 + 1.0)
    again = ev.evaluate({}, ["toy"])["toy"]
    assert torch.equal(model.state_dict()[name], w0) and again == base
    with pytest.raises(CmergeError, match="no task"):
        ev.evaluate({}, ["other"])


# ------------------------------------------------------------------------------ LoRA


def test_lora_training_steps_learn_and_keep_second_moments(lm):
    recipe = LoraRecipe(steps=4, batch_size=3, lr=1e-2, warmup_steps=0)
    trainer = LoraTrainer(lm, recipe)
    prompts = random_prompts(seed=3)
    trainer.reset(0)
    init = trainer.state()
    assert all(torch.count_nonzero(t) == 0 for n, t in init.items() if ".lora_B." in n)
    first = trainer.train([prompts])
    second = trainer.train([prompts])          # the same run again: deterministic
    assert first.losses == second.losses and len(first.losses) == 4
    assert all(torch.equal(first.state[n], second.state[n]) for n in first.state)
    assert set(first.exp_avg_sq) == set(first.state) == set(init)
    assert all(bool((v >= 0).all()) and float(v.sum()) > 0 for v in first.exp_avg_sq.values())
    assert any(not torch.equal(first.state[n], init[n]) for n in init if ".lora_B." in n)
    assert first.adam_metadata["adam_step"] == "4"
    # q_proj and v_proj of both layers, A and B each
    assert sorted({weight_name(n) for n in init}) == [f"model.layers.{i}.self_attn.{m}.weight"
                                                    for i in range(2) for m in ("q_proj", "v_proj")]


def test_delta_weights_match_peft_merge_and_unload(lm):
    recipe = LoraRecipe(alpha=24.0)
    trainer = LoraTrainer(lm, recipe)
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(t.shape, generator=g) for n, t in trainer.state().items()}
    trainer.load(state)
    merged_peft = copy.deepcopy(trainer.model).merge_and_unload().state_dict()
    base = adapted_weights(lm, recipe)
    ours = merged_weights(base, state, recipe.scaling)
    assert set(ours) == set(base) and len(ours) == 4
    for name, w in ours.items():
        torch.testing.assert_close(w, merged_peft[name], atol=1e-5, rtol=1e-5)
    a, b = factor_pairs(state)["model.layers.1.self_attn.v_proj.weight"]
    torch.testing.assert_close(delta_weights(state, 3.0)["model.layers.1.self_attn.v_proj.weight"], 3.0 * b @ a)


# ------------------------------------------------------------------------------ SLAO


def test_slao_init_is_the_signed_qr_of_the_previous_a():
    g = torch.Generator().manual_seed(0)
    a_prev, b_prev = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g)
    a0, b0 = slao_init(a_prev, b_prev)
    assert a0.shape == a_prev.shape and torch.equal(b0, b_prev) and b0 is not b_prev
    torch.testing.assert_close(a0 @ a0.T, torch.eye(4, dtype=torch.float64))     # orthonormal rows
    r = a0 @ a_prev.T                                                              # Q R = Aᵀ  ⇒  R = Qᵀ Aᵀ
    torch.testing.assert_close(r, torch.triu(r))
    assert bool((torch.diagonal(r) >= 0).all())
    torch.testing.assert_close(r.T @ a0, a_prev)                                   # A = Rᵀ Qᵀ: same row space
    flipped, _ = slao_init(-a_prev, b_prev)                                        # unique: signs follow A
    torch.testing.assert_close(flipped, -a0)


def test_slao_merge_rule_replaces_a_and_averages_b_with_inverse_sqrt_weights():
    ft1 = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.full((4, 2), 2.0)}
    ft2 = {"m.lora_A.weight": torch.full((2, 3), 5.0), "m.lora_B.weight": torch.full((4, 2), 6.0)}
    merged = slao_merge(None, ft1, 1)
    assert torch.equal(merged["m.lora_B.weight"], ft1["m.lora_B.weight"])
    merged = slao_merge(merged, ft2, 2)
    assert torch.equal(merged["m.lora_A.weight"], ft2["m.lora_A.weight"])
    torch.testing.assert_close(merged["m.lora_B.weight"], torch.full((4, 2), 2.0 + (6.0 - 2.0) / 2 ** 0.5))
    torch.testing.assert_close(slao_merge_b(torch.zeros(1), torch.ones(1), 9), torch.full((1,), 1 / 3))
    start = slao_start(ft2)
    assert set(start) == set(ft2) and torch.equal(start["m.lora_B.weight"], ft2["m.lora_B.weight"])
