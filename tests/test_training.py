"""Training a task inside the subspace (Share): gradients, exact write-back, absorb, gauge
freedom and the transformers Trainer path, on the real MiniLM test bed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("yaml")

from vlora import LoRAWeights, SharedSubspace, load_adapter  # noqa: E402
from vlora.examples import example_adapter_dirs  # noqa: E402
from vlora.model import VLoRAModel  # noqa: E402
from vlora.testbed import (  # noqa: E402
    build_testbed,
    load_adapter_model,
    load_minilm_classifier,
    load_task,
    tokenize,
)
from vlora.training import SubspaceTrainer, lora_equivalent_lr, orthogonal_init  # noqa: E402

NEW_TASKS = ["rt_subjectivity", "chat_topic_es", "chat_topic_it"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[list[LoRAWeights], list[str]]:
    """Real adapters of the test bed: the shipped examples, else three tiny fresh ones."""
    dirs = example_adapter_dirs()
    if len(dirs) < 3:
        dirs = build_testbed(["rt_sentiment", "chat_topic_en", "word_polarity"], [0],
                             cache_dir=tmp_path_factory.mktemp("tb"), progress=False, steps=8,
                             batch_size=8, max_train=64, max_eval=16, threads=None)
    tasks = [json.loads((d / "metrics.json").read_text())["task"] for d in dirs]
    return [load_adapter(d) for d in dirs], tasks


@pytest.fixture(scope="module")
def new_task(adapters):
    """A real task none of the subspace's adapters was trained on."""
    task = next(t for t in NEW_TASKS if t not in adapters[1])
    tr_x, tr_y, ev_x, ev_y, labels = load_task(task, max_train=192, max_eval=96, seed=0)
    return task, tr_x, tr_y, ev_x, ev_y, labels


def fresh_subspace(adapters, **kw) -> SharedSubspace:
    ads, tasks = adapters
    return SharedSubspace.from_adapters(ads, task_ids=tasks, **{"num_components": 8, **kw})


def batch_of(new_task, n=8, start=0):
    _, tr_x, tr_y, *_ = new_task
    return tokenize(tr_x[start:start + n], 32), torch.tensor(tr_y[start:start + n])


def loss_of(st, enc, y):
    return torch.nn.functional.cross_entropy(st.model(**enc).logits, y)


def trainer(sub, new_task, seed=0, **kw) -> SubspaceTrainer:
    labels = new_task[-1]
    return SubspaceTrainer(sub, "new", model=load_minilm_classifier(len(labels), seed),
                           lr=kw.pop("lr", 1e-2), seed=seed, **kw)


def test_orthogonal_init_is_zero_and_gets_gradients(adapters, new_task):
    sub = fresh_subspace(adapters, num_components=None, variance_threshold=0.6)
    ks = {(b.k_out, b.k_in) for b in sub.modules.values()}
    assert len(ks) > 1  # modules of different k
    t = orthogonal_init(sub, "zero", rank=3, seed=1)
    assert t.error == 0 and t.weight == 0 and "zero" in sub
    for m, b in sub.modules.items():
        assert t.coords_b[m].shape == (b.k_out, 3) and t.coords_a[m].shape == (b.k_in, 3)
        assert not sub.core("zero", m).any() and t.coords_a[m].abs().sum() > 0
    enc, y = batch_of(new_task)
    base = load_minilm_classifier(len(new_task[-1]), 0)
    with torch.no_grad():
        ref = base(**enc).logits
    st = SubspaceTrainer(sub, "zero", model=base, num_expand=2, train_modules_to_save=False)
    out = st.model(**enc).logits
    assert torch.equal(out.detach(), ref)  # dW = 0 exactly: the bare base, bit for bit
    torch.nn.functional.cross_entropy(out, y).backward()
    for d in st.module.deltas:
        assert d.lb.grad.abs().sum() > 0 and d.xb.grad.abs().sum() > 0
        assert not d.eu.grad.any() and not d.ev.grad.any()  # X_B = 0: the directions wait a step
    st.optimizer.step()
    st.optimizer.zero_grad()
    torch.nn.functional.cross_entropy(st.model(**enc).logits, y).backward()
    for d in st.module.deltas:
        assert d.eu.grad.abs().sum() > 0 and d.ev.grad.abs().sum() > 0


def test_one_step_moves_the_loss_and_only_the_coordinates(adapters, new_task):
    sub = fresh_subspace(adapters)
    st = trainer(sub, new_task, train_modules_to_save=False)
    before = {k: v.clone() for k, v in st.model.model.state_dict().items()}
    coords = [(d.lb.detach().clone(), d.la.detach().clone()) for d in st.module.deltas]
    enc, y = batch_of(new_task)
    first = st.step(loss_of(st, enc, y))
    assert loss_of(st, enc, y).item() != pytest.approx(first, abs=1e-5)
    after = st.model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # base weights, bitwise
    for d, (lb, la) in zip(st.module.deltas, coords):
        assert not torch.equal(d.lb, lb)
        assert torch.equal(d.la, la)  # while L_B = 0 the gradient of L_A is exactly zero
    assert st.num_trainable_params == {"adapter": sum(8 * (b.k_out + b.k_in) for b in sub.modules.values()),
                                       "heads": 0}
    with_heads = trainer(fresh_subspace(adapters), new_task)
    assert with_heads.num_trainable_params["heads"] == 384 * len(new_task[-1]) + len(new_task[-1])
    assert all(not p.requires_grad for n, p in with_heads.model.model.named_parameters()
               if not n.startswith("classifier"))


def test_each_side_of_the_coordinates_steps_at_its_own_rate(adapters, new_task):
    """Adam's first step moves every number by about its lr: L_B (and X_B) by ``lr``,
    L_A (and X_A) by ``a_lr``, even with extra directions."""
    st = trainer(fresh_subspace(adapters), new_task, lr=4e-2, a_lr=4e-3, num_expand=2,
                 train_modules_to_save=False)
    enc, y = batch_of(new_task)
    st.step(loss_of(st, enc, y))  # L_B moves off zero, so L_A now gets gradients
    d = st.module.deltas[0]
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    st.step(loss_of(st, enc, y))
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in d.named_parameters()}
    # Adam's step is at most lr / (1 - beta1) = 10 lr per number on its second step
    assert 4e-2 * 0.5 < max(moved["lb"], moved["xb"]) <= 4e-1 + 1e-6
    assert 4e-3 * 0.5 < max(moved["la"], moved["xa"]) <= 4e-2 + 1e-6
    for name in ("eu", "ev"):  # the directions step at a_lr
        assert 4e-3 * 0.5 < moved[name] <= 4e-2 + 1e-6
    assert {g["name"]: g["lr"] for g in st.optimizer.param_groups} == {
        "coordinates_b": 4e-2, "coordinates_a": 4e-3, "directions": 4e-3}
    groups = trainer(fresh_subspace(adapters), new_task, num_expand=1, direction_lr=1e-3).param_groups
    assert {g["name"]: g["lr"] for g in groups}["directions"] == 1e-3


def test_lora_equivalent_lr_follows_the_shapes(adapters):
    """B side: ``s lr sqrt(r (d_out + d_in) / (p (k_out + k_in)))``; A side: ``lr``."""
    sub = fresh_subspace(adapters)
    b = next(iter(sub.modules.values()))
    assert all((m.d_out, m.d_in, m.k_out, m.k_in) == (b.d_out, b.d_in, b.k_out, b.k_in)
               for m in sub.modules.values())
    rates = lora_equivalent_lr(sub, lr=5e-3, lora_alpha=16, r=8, pseudo_rank=2)
    expected = 5e-3 * 2 * (8 * (b.d_out + b.d_in) / (2 * (b.k_out + b.k_in))) ** 0.5
    assert rates == {"lr": pytest.approx(expected), "a_lr": 5e-3}
    assert lora_equivalent_lr(sub, 5e-3, 16, 8)["lr"] == pytest.approx(expected / 2)  # p = r


def test_write_back_without_expansion_is_exact(adapters, new_task, tmp_path):
    sub = fresh_subspace(adapters)
    st = trainer(sub, new_task, pseudo_rank=4)
    st.model.model.train()
    for i in range(3):
        st.step(loss_of(st, *batch_of(new_task, start=8 * i)))
    st.model.model.eval()
    enc, _ = batch_of(new_task, n=16, start=40)
    with torch.no_grad():
        trained = st.model(**enc).logits
    assert st.write_back() == {}  # nothing else moved
    t = sub.get_task("new")
    assert t.error == 0 and t.ranks() == {m: 4 for m in sub.modules} and "classifier.weight" in t.extra
    for m, d in zip(sub.modules, st.module.deltas):
        assert torch.equal(t.coords_b[m], d.lb.detach()) and torch.equal(t.coords_a[m], d.la.detach())
    st.model.set_task("new")
    with torch.no_grad():
        torch.testing.assert_close(st.model(**enc).logits, trained, atol=1e-5, rtol=0)
    # Served from the subspace alone: another base model, another head, same function.
    vm = VLoRAModel(load_minilm_classifier(len(new_task[-1]), 7), sub)
    with torch.no_grad():
        torch.testing.assert_close(vm(**enc, task_ids=["new"] * 16).logits, trained, atol=1e-5, rtol=0)
    # An adapter like any other: exported, PEFT computes the same function.
    vm.export("new", tmp_path / "new")
    peft_model = load_adapter_model(tmp_path / "new", len(new_task[-1]))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**enc).logits, trained, atol=1e-5, rtol=0)


def test_write_back_with_expansion_absorbs_the_new_directions(adapters, new_task):
    sub = fresh_subspace(adapters)
    old = list(sub.tasks)
    st = trainer(sub, new_task, num_expand=2, lr=5e-2)
    d0, m0 = st.module.deltas[0], next(iter(sub.modules))
    start = d0.eu.detach().double().clone()
    torch.testing.assert_close(start.T @ start, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
    st.model.model.train()
    for i in range(3):
        st.step(loss_of(st, *batch_of(new_task, start=8 * i)))
    assert float((d0.eu.detach().double() - start).abs().max()) > 1e-4  # the directions trained
    u_old = sub.modules[m0].U.double().clone()
    eu = d0.bases()[0][:, d0.k_out:].detach().double()  # as they act: outside U, always
    assert float((u_old.T @ eu).abs().max()) < 1e-5
    n = st.num_trainable_params["adapter"]
    assert n == sum(8 * (b.k_out + b.k_in) + 2 * (b.d_out + b.d_in) + 2 * 2 * 8
                    for b in sub.modules.values())
    report = st.write_back()
    assert sorted(report) == sorted(old) and all(r.drift >= 0 for r in report.values())
    assert sub.tasks[-1] == "new" and "classifier.weight" in sub.get_task("new").extra
    # The new basis reaches into the trained directions, all outside the old one.
    assert float((sub.modules[m0].U.double().T @ eu).norm()) > 1e-3
    model = st.model.unwrap()  # the bases moved: unwrap (allowed now) and wrap again
    assert not any(type(m).__name__ == "SubspaceLinear" for m in model.modules())
    VLoRAModel(model, sub).set_task("new")


def test_gauge_free(adapters, new_task):
    """Training depends on the adapters through dW only: gauged adapters give the same
    trained task; and a gauge on the trained coordinates changes nothing stored."""
    ads, tasks = adapters
    gen = torch.Generator().manual_seed(3)
    gauged = []
    for a in ads:
        b, aa = {}, {}
        for m in a.layer_names:
            g = torch.randn(a.lora_a[m].shape[0], a.lora_a[m].shape[0], generator=gen, dtype=torch.float64)
            g = g + 4 * torch.eye(g.shape[0], dtype=torch.float64)
            b[m] = (a.lora_b[m].double() @ g).float()
            aa[m] = (torch.linalg.solve(g, a.lora_a[m].double())).float()
        gauged.append(LoRAWeights(a.layer_names, aa, b, a.scales, a.extra, a.config))
    enc, y = batch_of(new_task)
    runs = []
    for items in (ads, gauged):
        st = trainer(SharedSubspace.from_adapters(items, task_ids=tasks, num_components=8), new_task)
        runs.append((st.step(loss_of(st, enc, y)), st.step(loss_of(st, enc, y)), st))
    assert runs[0][:2] == pytest.approx(runs[1][:2], abs=1e-4)
    st = runs[0][2]
    with torch.no_grad():
        ref = st.model(**enc).logits
        cores = {m: d.lb.double() @ d.la.double().T for m, d in zip(st.subspace.modules, st.module.deltas)}
        for d in st.module.deltas:
            r = d.lb.shape[1]
            g = torch.randn(r, r, generator=gen, dtype=torch.float64) + 4 * torch.eye(r, dtype=torch.float64)
            d.lb.copy_(d.lb.double() @ g)
            d.la.copy_(d.la.double() @ torch.linalg.inv(g).T)
        torch.testing.assert_close(st.model(**enc).logits, ref, atol=1e-5, rtol=0)
    st.write_back()
    for m in cores:
        torch.testing.assert_close(st.subspace.core("new", m), cores[m], atol=1e-5, rtol=1e-4)


def test_hf_trainer_trains_only_the_coordinates_and_resumes(adapters, new_task, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from vlora.integrations.huggingface import COORDINATES_NAME, VLoRATrainer
    from vlora.testbed import minilm_tokenizer
    from vlora.testbed.train import majority_accuracy, predict

    _, tr_x, tr_y, ev_x, ev_y, labels = new_task
    tok = minilm_tokenizer()
    data = [{**tok(x, truncation=True, max_length=32), "labels": y} for x, y in zip(tr_x, tr_y)]

    def run(steps, resume=None):
        sub = fresh_subspace(adapters)
        st = trainer(sub, new_task, lr=5e-2, a_lr=2e-2, head_lr=3e-2, num_expand=1, direction_lr=1e-2)
        args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=steps,
                                 save_steps=20, logging_steps=1, report_to=[],
                                 use_cpu=True, disable_tqdm=True, seed=0, warmup_steps=2)
        hf = VLoRATrainer(st, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tok))
        frozen = {n: p.clone() for n, p in st.model.model.named_parameters() if not p.requires_grad}
        hf.train(resume_from_checkpoint=resume)
        held = {id(p) for g in hf.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in st.parameters()}  # exactly these, nothing of the base
        # each side at its own rate, the schedule scaling them alike
        assert {g["name"]: g["initial_lr"] for g in hf.optimizer.param_groups} == {
            "coordinates_b": 5e-2, "coordinates_a": 2e-2, "directions": 1e-2, "heads": 3e-2}
        assert all(torch.equal(p, frozen[n]) for n, p in st.model.model.named_parameters() if n in frozen)
        return st, hf

    st, hf = run(24)
    losses = [h["loss"] for h in hf.state.log_history if "loss" in h]
    acc = sum(int(p == g) for p, g in zip(predict(st.model, ev_x, max_length=32), ev_y)) / len(ev_y)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert acc > majority_accuracy(ev_y) + 0.05
    ckpt = tmp_path / "checkpoint-20"
    assert {p.name for p in ckpt.iterdir()} >= {COORDINATES_NAME, "optimizer.pt", "trainer_state.json"}
    assert not any(p.name.startswith("model") for p in ckpt.iterdir())  # no base weights
    resumed, _ = run(24, resume=str(ckpt))
    for a, b in zip(st.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_hf_trainer_warns_that_its_single_learning_rate_is_not_used(adapters, new_task, tmp_path):
    from transformers import TrainingArguments

    from vlora.integrations.huggingface import VLoRATrainer

    st = trainer(fresh_subspace(adapters), new_task, lr=5e-2, a_lr=5e-3)
    args = TrainingArguments(str(tmp_path), learning_rate=1e-4, report_to=[], use_cpu=True)
    with pytest.warns(UserWarning, match="ignores args.learning_rate=0.0001"):
        VLoRATrainer(st, args=args, train_dataset=[])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_where_the_model_is(adapters, new_task):
    sub = fresh_subspace(adapters)
    model = load_minilm_classifier(len(new_task[-1]), 0).cuda()
    st = SubspaceTrainer(sub, "new", model=model, lr=1e-2, num_expand=2)
    assert all(p.is_cuda for p in st.parameters())
    enc, y = batch_of(new_task)
    enc, y = enc.to("cuda"), y.cuda()
    first = st.step(loss_of(st, enc, y))
    assert loss_of(st, enc, y).item() != pytest.approx(first, abs=1e-5)
    st.module.cpu()  # the coordinates move with the model
    assert not any(p.is_cuda for p in st.parameters())
    assert st.write_back()


def test_state_dict_round_trips_the_extra_directions_and_refuses_another_layout(adapters, new_task):
    enc, y = batch_of(new_task)
    st = trainer(fresh_subspace(adapters), new_task, num_expand=1, lr=5e-2, train_modules_to_save=False)
    for _ in range(2):
        st.step(loss_of(st, enc, y))
    state = st.state_dict()
    assert {k.split("::")[1] for k in state} == {"L_B", "L_A", "E_U", "E_V", "X_B", "X_A", "bases_fingerprint"}
    other = trainer(fresh_subspace(adapters), new_task, num_expand=1, train_modules_to_save=False)
    other.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(other.model(**enc).logits, st.model(**enc).logits, atol=1e-6, rtol=0)
    plain = trainer(fresh_subspace(adapters), new_task, train_modules_to_save=False)
    with pytest.raises(ValueError, match="does not fit this trainer: missing: .*E_U"):
        other.load_state_dict(plain.state_dict())  # no extra directions in it
    with pytest.raises(ValueError, match="not in this trainer: .*E_U"):
        plain.load_state_dict(state)  # would silently drop them
    lower = trainer(fresh_subspace(adapters), new_task, num_expand=1, pseudo_rank=4,
                    train_modules_to_save=False)
    with pytest.raises(ValueError, match=r"of another shape: .*L_B \(\d+, 8\) \(here \(\d+, 4\)\)"):
        lower.load_state_dict(state)
    with pytest.raises(ValueError, match="pass num_expand > 0"):
        trainer(fresh_subspace(adapters), new_task, direction_lr=1e-3)
    ads, tasks = adapters  # the same shapes, other bases: the coordinates would mean nothing
    moved = SharedSubspace.from_adapters(ads[1:] + ads[:1], task_ids=tasks[1:] + tasks[:1],
                                         num_components=8, refine_iters=0)
    elsewhere = trainer(moved, new_task, num_expand=1, train_modules_to_save=False)
    assert all(elsewhere.state_dict()[k].shape == v.shape for k, v in state.items())
    with pytest.raises(ValueError, match="trained in other bases"):
        elsewhere.load_state_dict(state)


def test_extra_directions_where_the_bases_fill_a_side():
    """Where k = d there is no room for extra directions: training and write-back go on
    without them (planted adapters fill d = 6 on both sides of every module)."""
    from synthetic import planted

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(6, 6), "v": nn.Linear(6, 6)}),
                                        nn.ModuleDict({"q": nn.Linear(6, 6)})])

        def forward(self, x):
            return self.layer[1]["q"](self.layer[0]["q"](x) + self.layer[0]["v"](x))

    sub = SharedSubspace.from_adapters(planted(3, dim=6, d_out=6, d_in=6))
    assert all(b.k_out == b.k_in == 6 for b in sub.modules.values())
    st = SubspaceTrainer(sub, "new", model=Tiny(), lr=1e-2, num_expand=1, train_modules_to_save=False)
    assert not any(d.phi for d in st.module.deltas)
    assert [g["name"] for g in st.param_groups] == ["coordinates_b", "coordinates_a"]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        st.step(st.model(x).square().mean())
    assert st.write_back() is not None and "new" in sub


def test_training_heads_leaves_the_model_own_head(adapters, new_task):
    sub = fresh_subspace(adapters)
    enc, y = batch_of(new_task)
    base = load_minilm_classifier(len(new_task[-1]), 5)
    own = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        ref = base(**enc).logits
    st = SubspaceTrainer(sub, "new", model=base, lr=1e-2)
    for _ in range(2):
        st.step(loss_of(st, enc, y))
    st.write_back()
    trained = st.heads["classifier.weight"].detach().clone()
    assert not torch.equal(trained, own["classifier.weight"])
    torch.testing.assert_close(sub.get_task("new").extra["classifier.weight"], trained)
    st.model.clear_task()
    with torch.no_grad():
        assert torch.equal(st.model(**enc).logits, ref)  # the bare base again
        rows = st.model(**enc, task_ids=[None, "new"] * (len(y) // 2)).logits
    assert torch.equal(rows[0::2], ref[0::2])
    assert all(torch.equal(v, own[k]) for k, v in st.model.unwrap().state_dict().items())


def test_bad_arguments_leave_model_and_subspace_untouched(adapters, new_task):
    sub = fresh_subspace(adapters)
    base = load_minilm_classifier(len(new_task[-1]), 5)
    task = sub.tasks[0]
    with pytest.raises(ValueError, match="pseudo_rank 16"):
        SubspaceTrainer(sub, task, model=base, pseudo_rank=16)
    with pytest.raises(ValueError, match="classifer"):
        SubspaceTrainer(sub, "new", model=base, train_modules_to_save=["classifer"])
    assert "new" not in sub and all(p.requires_grad for p in base.parameters())
    assert type(base.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear  # not wrapped
    SubspaceTrainer(sub, task, model=base, pseudo_rank=4)  # the same model, corrected: it works
