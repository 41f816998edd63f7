"""Routing rows to tasks on real text: a trained router and the training-free one."""

import pytest
import torch

from synthetic import planted
from vlora import SharedSubspace
from vlora.router import AdapterMatchRouter, TaskRouter, pooled_features
from vlora.testbed import load_task

TASKS = ["chat_topic_en", "guardian_pandemic", "rt_sentiment", "debate_trump_clinton"]
MODULES = [f"encoder.layer.{i}.attention.self.value" for i in range(6)]


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    from transformers import AutoModel
    return AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="module")
def rows(encoder, tokenizer):
    data = {}
    for split, (lo, hi) in (("train", (0, 40)), ("eval", (0, 20))):
        texts, labels = [], []
        for t in TASKS:
            tr, _, ev, _, _ = load_task(t, 60, 30, 0)
            chosen = (tr if split == "train" else ev)[lo:hi]
            texts += chosen
            labels += [t] * len(chosen)
        batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        feats, inputs = pooled_features(encoder, batch, MODULES)
        data[split] = (feats, inputs, labels)
    return data


def accuracy(picked, labels):
    return sum(p == y for p, y in zip(picked, labels)) / len(labels)


def test_trained_router_picks_the_right_task_on_held_out_rows(rows):
    feats, _, labels = rows["train"]
    router = TaskRouter(feats.shape[1], TASKS)
    losses = router.fit(feats, labels, epochs=150)
    assert losses[-1] < losses[0] / 10
    acc = accuracy(router.pick(rows["eval"][0]), rows["eval"][2])
    assert acc > 0.75, acc  # chance is 0.25
    weights = router(rows["eval"][0])
    assert weights.shape == (len(rows["eval"][2]), len(TASKS))
    torch.testing.assert_close(weights.sum(1), torch.ones(weights.shape[0]))
    # per row, not per batch: a row's weights do not depend on the other rows
    torch.testing.assert_close(router(rows["eval"][0][:3]), weights[:3])


def test_top_k_keeps_k_tasks_per_row(rows):
    feats, _, labels = rows["train"]
    router = TaskRouter(feats.shape[1], TASKS, hidden=16, top_k=2)
    router.fit(feats, labels, epochs=50)
    assert bool(((router(feats) > 0).sum(1) <= 2).all())
    with pytest.raises(ValueError, match="not in task_order"):
        router.fit(feats, ["nope"] * feats.shape[0])


def test_adapter_match_router_beats_chance_without_training(rows, make_peft_adapter):
    from vlora.examples import example_adapter_dir
    sub = SharedSubspace.from_adapters([example_adapter_dir(t) for t in TASKS], task_ids=TASKS)
    router = AdapterMatchRouter(sub, [f"bert.{m}" for m in MODULES])
    _, inputs, labels = rows["eval"]
    acc = accuracy(router.pick({f"bert.{m}": x for m, x in inputs.items()}), labels)
    assert acc > 0.25, acc  # chance; a heuristic, measured in the closing note


def test_adapter_match_scores_are_exact_on_quantized_bases():
    # the score is ||dW_t h|| / ||dW_t||; quantized bases are not orthonormal, so the
    # shortcut through C_t V^T alone would be off (and route some rows elsewhere)
    ads = planted(4, dim=6, noise=0.2, seed=3)
    sub = SharedSubspace.from_adapters(ads, task_ids=list("abcd"), num_components=5)
    sub.quantize(4)
    h = torch.randn(50, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    router = AdapterMatchRouter(sub)
    want = 0
    for m in sub.modules:
        dws = [sub.reconstruct(t, dtype=torch.float64).delta_weight(m) for t in "abcd"]
        want = want + torch.stack([(h @ dw.T).norm(dim=1) / dw.norm() for dw in dws], 1)
    torch.testing.assert_close(router.scores({m: h for m in sub.modules}), want, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match=r"must be \(rows, 32\)"):
        router.scores({m: h[:, :10] for m in sub.modules})


def test_task_router_checks_its_arguments_and_leaves_the_global_rng_alone():
    for bad in ({"temperature": 0}, {"temperature": float("nan")}, {"top_k": 0}):
        with pytest.raises(ValueError):
            TaskRouter(4, ["a", "b"], **bad)
    router, one_row = TaskRouter(4, ["a", "b"]), torch.randn(1, 4)
    state = torch.random.get_rng_state()
    router.fit(one_row, ["a"], epochs=3)  # one row: a std of 0, not NaN
    assert torch.equal(torch.random.get_rng_state(), state)
    assert bool(torch.isfinite(router(torch.randn(2, 4))).all())
    with pytest.raises(ValueError, match=r"must be \(rows, 4\)"):
        router(torch.randn(2, 5))
