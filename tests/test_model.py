"""VLoRAModel: single-task, mixed-batch and blended inference, generate, merge, export.

Mixed batches are checked row by row against single-task runs on the real MiniLM with
real PEFT adapters, and exports against PEFT itself loading them.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from torch import nn

from conftest import base_classifier
from synthetic import planted
from vlora import (
    IncompatibleAdaptersError,
    SharedSubspace,
    SubspaceError,
    TaskNotFoundError,
    VLoRAError,
    load_adapter,
)
from vlora.model import VLoRAModel
from vlora.vllm_check import check_vllm_adapter


def copy_of(sub: SharedSubspace) -> SharedSubspace:
    """A subspace sharing bases and tasks, to which a test may add tasks."""
    return SharedSubspace(sub.modules, [sub.get_task(t) for t in sub.tasks])


def logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


@pytest.fixture(scope="module")
def minilm_sub(make_peft_adapter):
    """Three real PEFT adapters of MiniLM (each with its own 3-label head), k = 6 < 12."""
    ads = [load_adapter(make_peft_adapter("vm", seed=s)[0]) for s in range(3)]
    return SharedSubspace.from_adapters(ads, task_ids=["a", "b", "c"], num_components=6)


@pytest.mark.parametrize("mixed", ["bmm", "grouped"])
def test_mixed_batch_rows_equal_single_task_runs(minilm_sub, minilm_dir, batch, mixed):
    base = base_classifier(minilm_dir, seed=9)
    own = {k: v.clone() for k, v in base.state_dict().items()}
    ref = logits(base, batch)
    vm = VLoRAModel(base, minilm_sub, mixed=mixed)
    assert vm.available_tasks == ["a", "b", "c"] and vm.active_task is None
    single = {}
    for t in vm.available_tasks:
        vm.set_task(t)
        assert vm.active_task == t
        single[t] = logits(vm, batch)
    assert not torch.allclose(single["a"], single["b"], atol=1e-3)  # the heads and tasks differ
    ids = ["a", "b", None, "c"]
    out = logits(vm, batch, task_ids=ids)
    for i, t in enumerate(ids):
        torch.testing.assert_close(out[i], ref[i] if t is None else single[t][i], atol=1e-5, rtol=0)
    assert vm.active_task == "c"  # a per-call assignment leaves set_task's state alone
    torch.testing.assert_close(logits(vm, batch), single["c"], atol=0, rtol=0)
    vm.clear_task()
    assert torch.equal(logits(vm, batch), ref)  # bare base, the model's own head back
    model = vm.unwrap()
    assert model.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())


def test_heads_of_different_widths_mix_padded_with_minus_inf(minilm_sub, minilm_dir, batch):
    sub = copy_of(minilm_sub)
    g = torch.Generator().manual_seed(0)
    sub.add_task(dataclasses.replace(
        sub.get_task("a"), task_id="two",
        extra={"classifier.weight": torch.randn(2, 384, generator=g),
               "classifier.bias": torch.randn(2, generator=g)}))
    base = base_classifier(minilm_dir, seed=9)
    ref = logits(base, batch)
    vm = VLoRAModel(base, sub)
    single = {}
    for t in ("a", "two"):
        vm.set_task(t)
        single[t] = logits(vm, batch)
    assert single["two"].shape == (4, 2)
    torch.testing.assert_close(logits(vm, batch, task_ids=["two"] * 4), single["two"])
    for ids in (["a", "two", "a", "two"], ["two", None, "two", "two"]):
        out = logits(vm, batch, task_ids=ids)
        widths = vm.head_widths(ids)["classifier"]
        assert out.shape == (4, 3) and widths.tolist() == [2 if t == "two" else 3 for t in ids]
        for i, t in enumerate(ids):
            own = ref[i] if t is None else single[t][i]
            torch.testing.assert_close(out[i, :widths[i]], own, atol=1e-5, rtol=0)
            assert torch.all(out[i, widths[i]:] == float("-inf"))
        torch.testing.assert_close(out.softmax(-1)[3, :2], single["two"][3].softmax(-1))
    assert vm.active_task == "two" and vm.model.classifier.weight.shape == (2, 384)
    vm.clear_task()
    assert torch.equal(logits(vm, batch), ref)

    sub.add_task(dataclasses.replace(sub.get_task("a"), task_id="narrow_in",
                                     extra={"classifier.weight": torch.zeros(3, 100)}))
    with pytest.raises(VLoRAError, match=r"inputs of different widths.*'narrow_in': \(3, 100\)"):
        logits(vm, batch, task_ids=["a", "narrow_in", "a", "a"])
    assert torch.equal(logits(vm, batch), ref)


def test_shipped_tasks_with_different_heads_mix_row_by_row_like_peft(tokenizer):
    """The README's line: lang_id (8 labels), rt_sentiment (2), chat_topic_en (4) and the
    bare base (3) in one batch, each row equal to its own original PEFT adapter's."""
    from peft import PeftModel

    from vlora.examples import example_adapter_dir
    from vlora.testbed.models import load_minilm_classifier
    names = ["lang_id", "rt_sentiment", "chat_topic_en"]
    sub = SharedSubspace.from_adapters([example_adapter_dir(n) for n in names],
                                       num_components=24)  # 3 tasks of rank 8: no loss
    texts = ["bonjour tout le monde", "a tedious, overlong mess",
             "what is the capital of france", "hola, como estas"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids = ["lang_id", "rt_sentiment", None, "chat_topic_en"]
    base = load_minilm_classifier(num_labels=3, seed=1)
    ref = logits(base, batch)
    out = logits(VLoRAModel(base, sub), batch, task_ids=ids)
    assert out.shape == (4, 8)
    for i, t in enumerate(ids):
        if t is None:
            own = ref[i]
        else:
            width = load_adapter(example_adapter_dir(t)).extra["classifier.weight"].shape[0]
            peft = PeftModel.from_pretrained(load_minilm_classifier(num_labels=width),
                                             str(example_adapter_dir(t))).eval()
            own = logits(peft, batch)[i]
        torch.testing.assert_close(out[i, :len(own)], own, atol=1e-4, rtol=0)
        assert torch.all(out[i, len(own):] == float("-inf"))
        assert out[i].argmax() == own.argmax()


def test_task_ids_of_another_length_than_the_batch_are_refused(minilm_sub, minilm_dir, batch):
    sub = copy_of(minilm_sub)
    sub.add_task(dataclasses.replace(sub.get_task("a"), task_id="a0", extra={}))  # blends: no head
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), sub)
    vm.set_task("a")
    good = logits(vm, batch)
    for ids in (["a"] * 3, ["b"] * 5, [None] * 3, ["a", "b", "c"]):
        with pytest.raises(VLoRAError, match=f"the batch has 4 rows but {len(ids)} task ids"):
            logits(vm, batch, task_ids=ids)
    with pytest.raises(VLoRAError, match="4 rows but 2 task_weights rows"):
        logits(vm, batch, task_weights=torch.ones(2, 1), task_order=["a0"])
    with pytest.raises(ValueError, match="not a string"):
        logits(vm, batch, task_ids="a")
    assert vm.active_task == "a" and torch.equal(logits(vm, batch), good)


def test_task_weights_blend_cores(minilm_sub, minilm_dir, batch):
    sub = copy_of(minilm_sub)
    a, b = sub.get_task("a"), sub.get_task("b")
    for t in (a, b):  # blends cover LoRA cores only: these copies carry no head
        sub.add_task(dataclasses.replace(t, task_id=t.task_id + "0", extra={}))
    half = {m: 0.5 ** 0.5 for m in sub.modules}
    sub.add_task(dataclasses.replace(  # core 0.5 C_a + 0.5 C_b, as one task
        a, task_id="mix", extra={},
        coords_b={m: torch.cat([a.coords_b[m], b.coords_b[m]], 1) * half[m] for m in half},
        coords_a={m: torch.cat([a.coords_a[m], b.coords_a[m]], 1) * half[m] for m in half}))
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), sub)
    single = {}
    for t in ("a0", "b0", "mix"):
        vm.set_task(t)
        single[t] = logits(vm, batch)
    vm.clear_task()
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.5, 0.5]])
    out = logits(vm, batch, task_weights=w, task_order=["a0", "b0"])
    for i, t in enumerate(["a0", "mix", "b0", "mix"]):
        torch.testing.assert_close(out[i], single[t][i], atol=1e-5, rtol=0)
    with pytest.raises(VLoRAError, match="blend LoRA cores only"):
        logits(vm, batch, task_weights=w, task_order=["a", "b"])


def test_export_equals_peft_and_vllm_rules(minilm_sub, minilm_dir, batch, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), minilm_sub)
    vm.set_task("b")
    ours = logits(vm, batch)
    assert vm.export("b", tmp_path / "plain") == []
    peft = PeftModel.from_pretrained(base_classifier(minilm_dir, seed=123), str(tmp_path / "plain"))
    torch.testing.assert_close(logits(peft.eval(), batch), ours, atol=1e-5, rtol=0)
    written = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    state = vm.reconstruct_state_dict("b")
    assert state.keys() == written.keys() and all(torch.equal(state[k], written[k]) for k in state)

    problems = check_vllm_adapter(tmp_path / "plain")
    assert any("modules_to_save" in p for p in problems)
    assert any("classifier.weight" in p for p in problems)
    assert sorted(vm.export("b", tmp_path / "vllm", for_vllm=True)) == [
        "classifier.bias (modules_to_save; vLLM refuses them)",
        "classifier.weight (modules_to_save; vLLM refuses them)"]
    assert check_vllm_adapter(tmp_path / "vllm", base_model_modules=vm.model) == []
    assert any("greater than max_lora_rank 1" in p
               for p in check_vllm_adapter(tmp_path / "vllm", max_lora_rank=1))
    assert any("not one vLLM accepts" in p
               for p in check_vllm_adapter(tmp_path / "vllm", max_lora_rank=12))
    assert any("not in the base model" in p
               for p in check_vllm_adapter(tmp_path / "vllm", base_model_modules=["q_proj"]))
    config_file = tmp_path / "vllm" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(use_dora=True, bias="all", rank_pattern={"query": 2})
    config_file.write_text(json.dumps(config))
    problems = " | ".join(check_vllm_adapter(tmp_path / "vllm"))
    assert "DoRA" in problems and "bias='all'" in problems and "rank_pattern" in problems


def test_merge_then_unmerge_restores_bitwise(minilm_sub, minilm_dir, batch):
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), minilm_sub)
    before = {k: v.clone() for k, v in vm.model.state_dict().items()}
    vm.set_task("c")
    expected = logits(vm, batch)
    vm.clear_task()
    vm.merge("c")
    assert vm.active_task == "c"
    torch.testing.assert_close(logits(vm, batch), expected, atol=1e-5, rtol=0)
    with pytest.raises(VLoRAError, match="unmerge"):
        vm.set_task("a")
    vm.unmerge()
    assert vm.active_task is None
    assert all(torch.equal(v, before[k]) for k, v in vm.model.state_dict().items())


def test_dtypes_and_moving_the_model(minilm_sub, minilm_dir, batch):
    vm32 = VLoRAModel(base_classifier(minilm_dir, seed=9), minilm_sub)
    own_head = vm32.model.classifier.weight.data.clone()
    vm32.set_task("a")
    ref = logits(vm32, batch)
    vm32.to(torch.float64)  # moves buffers and the swapped-in head with the model
    layer = vm32.model.bert.encoder.layer[0].attention.self.query
    assert layer.u.dtype == layer.cores.dtype == torch.float64
    torch.testing.assert_close(logits(vm32, batch).float(), ref, atol=1e-5, rtol=0)
    vm32.clear_task()
    assert torch.equal(vm32.model.classifier.weight, own_head.double())

    bf = VLoRAModel(base_classifier(minilm_dir, seed=9).to(torch.bfloat16), minilm_sub)
    assert bf.model.bert.encoder.layer[0].attention.self.query.u.dtype == torch.bfloat16
    out = logits(bf, batch, task_ids=["a", "b", "a", None])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0].float(), ref[0], atol=0.1, rtol=0.1)
    mixed = VLoRAModel(base_classifier(minilm_dir, seed=9).to(torch.bfloat16), minilm_sub,
                       compute_dtype=torch.float32)
    assert mixed.model.bert.encoder.layer[0].attention.self.query.cores.dtype == torch.float32
    torch.testing.assert_close(logits(mixed, batch, task_ids=["a"] * 4).float(), ref,
                               atol=0.1, rtol=0.1)


def test_switching_is_cheap_and_inference_mode_safe(minilm_sub, minilm_dir, batch):
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), minilm_sub)
    with torch.inference_mode():  # a cache started here must stay usable outside
        vm.set_task("a")
        vm(**batch, task_ids=["a", "b", None, "a"])
    vm.set_task("c")
    vm(**batch).logits.sum().backward()  # autograd through swapped heads and cached cores
    start = time.perf_counter()
    for _ in range(200):
        vm.set_task("a")
        vm.set_task("b")
    assert (time.perf_counter() - start) / 400 < 1e-3


# ---------------------------------------------------------------- toy models
class Toy(nn.Module):
    """Modules named like synthetic.MODULES: layer.{0,1}.{q,v}, Linear(32 -> 40)."""

    def __init__(self, conv1d_at: str | None = None):
        from transformers.pytorch_utils import Conv1D
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(32, 40), "v": nn.Linear(32, 40)})
                                   for _ in range(2))
        if conv1d_at is not None:
            i, name = conv1d_at.split(".")[1:]
            self.layer[int(i)][name] = Conv1D(40, 32)

    def forward(self, x):
        return sum(layer[n](x) for layer in self.layer for n in ("q", "v"))


@pytest.mark.parametrize("path", ["shared", "factors"])
@pytest.mark.parametrize(("conv1d_at", "bits"), [(None, None), ("layer.1.q", None), (None, 4)])
def test_toy_forward_and_merge_match_dense_reconstruction(conv1d_at, bits, path):
    sub = SharedSubspace.from_adapters(planted(3, noise=0.1), task_ids=["x", "y", "z"],
                                       num_components=4)
    if bits:  # quantized bases are not orthonormal: nothing here may assume they are
        sub.quantize(bits, coordinates=True)
    model = Toy(conv1d_at)
    x = torch.randn(5, 7, 32)
    vm = VLoRAModel(model, sub, path=path)
    assert vm.factored_modules == (list(sub.modules) if path == "factors" else [])
    rec = sub.reconstruct("y")
    for m, layer in vm._layers.items():
        vm.clear_task()
        with torch.no_grad():
            base = layer(x)
            vm.set_task("y")
            dense = base + x @ rec.delta_weight(m, torch.float32).T
            torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
            vm.clear_task()
            vm.merge("y")
            torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
            vm.unmerge()
            with vm.tasks(["y", "x", None, "y", "z"]):
                torch.testing.assert_close(layer(x)[3], dense[3], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(layer(x)[2], base[2], atol=0, rtol=0)


@pytest.mark.parametrize("path", ["shared", "factors"])
@pytest.mark.parametrize(("mixed", "bits"), [("bmm", None), ("grouped", None), ("bmm", 6)])
def test_private_parts_serve_per_row_blend_and_merge_like_their_dense_reconstruction(mixed, bits, path):
    ads = planted(3, noise=0.3)
    sub = SharedSubspace.from_adapters(ads, task_ids=["x", "y", "z"], num_components=2)
    if bits:
        sub.quantize(bits, coordinates=True)
    before = sub.get_task("y").error
    sub.set_private("y", ads[1], dict.fromkeys(sub.modules, 3))
    sub.set_private("z", ads[2], {next(iter(sub.modules)): 1})  # one module only, rank 1
    assert sub.get_task("y").error < before and sub.get_task("y").private_ranks()
    vm = VLoRAModel(Toy(None), sub, mixed=mixed, path=path)
    x = torch.randn(5, 7, 32)
    rec = {t: sub.reconstruct(t) for t in sub.tasks}
    ids = ["y", "x", None, "z", "y"]
    weights = torch.rand(5, 2)
    for m, layer in vm._layers.items():
        vm.clear_task()
        with torch.no_grad():
            base = layer(x)
            dense = {t: base + x @ r.delta_weight(m, torch.float32).T for t, r in rec.items()}
            with vm.tasks(ids):
                out = layer(x)
            for i, t in enumerate(ids):
                torch.testing.assert_close(out[i], base[i] if t is None else dense[t][i],
                                           atol=1e-5, rtol=1e-5)
            one = x[:, :1]  # rows of one token (decode): a few tasks blend one-hot
            with vm.tasks(ids):
                out = layer(one)
            for i, t in enumerate(ids):
                torch.testing.assert_close(out[i], base[i, :1] if t is None else dense[t][i, :1],
                                           atol=1e-5, rtol=1e-5)
            with vm.tasks(task_weights=weights, task_order=["y", "z"]):
                blend = base + weights[:, 0, None, None] * (dense["y"] - base) \
                    + weights[:, 1, None, None] * (dense["z"] - base)
                torch.testing.assert_close(layer(x), blend, atol=1e-5, rtol=1e-5)
            vm.merge("y")
            torch.testing.assert_close(layer(x), dense["y"], atol=1e-5, rtol=1e-5)
            vm.unmerge()


def test_auto_path_factors_wide_bases_only_and_serves_the_same_rows():
    """Factors where the bases are wide against the tasks' rank (the gathered factors
    cost less than the shared products), the shared path where they are narrow."""
    from vlora.layer import factored_is_cheaper
    assert factored_is_cheaper(576, 576, 70, 212, 16)  # SmolLM2 q_proj, a 10x 6-bit fit
    assert not factored_is_cheaper(576, 576, 32, 32, 16)
    assert not factored_is_cheaper(384, 384, 6, 6, 8)  # MiniLM, k = 6
    ads = planted(3, noise=0.3)
    narrow = SharedSubspace.from_adapters(ads, task_ids=["x", "y", "z"], num_components=1)
    wide = SharedSubspace.from_adapters(ads, task_ids=["x", "y", "z"], num_components=24)
    assert VLoRAModel(Toy(None), narrow).factored_modules == []
    assert VLoRAModel(Toy(None), copy_of(wide)).factored_modules == list(wide.modules)
    assert VLoRAModel(Toy(None), copy_of(wide), path="shared").factored_modules == []
    with pytest.raises(ValueError, match="path must be"):
        VLoRAModel(Toy(None), wide, path="fast")
    x, ids = torch.randn(4, 3, 32, requires_grad=True), ["z", None, "x", "z"]
    outs, grads = [], []
    for path in ("auto", "shared"):  # with autograd on: the adds are not in place
        vm = VLoRAModel(Toy(None), copy_of(wide), path=path)
        with vm.tasks(ids):
            outs.append(vm(x))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), x)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_merging_into_a_tied_weight_is_refused_and_changes_nothing():
    sub = SharedSubspace.from_adapters(planted(3, noise=0.1), task_ids=["x", "y", "z"], num_components=4)
    model = Toy()
    model.layer[1]["q"].weight = model.layer[0]["q"].weight  # tied, as lm_head and embeddings can be
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    vm = VLoRAModel(model, sub)
    with pytest.raises(VLoRAError, match="tied to"):
        vm.merge("y")
    assert all(torch.equal(p, before[n.replace(".base_layer", "")]) for n, p in vm.model.named_parameters())
    vm.set_task("y")  # unmerged serving adds each layer's own delta: still right
    x = torch.randn(2, 32)
    rec = sub.reconstruct("y")
    layer = vm._layers["layer.1.q"]
    with torch.no_grad():
        want = layer.base_layer(x) + x @ rec.delta_weight("layer.1.q", torch.float32).T
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_compiles_without_graph_breaks():
    sub = SharedSubspace.from_adapters(planted(3), task_ids=["x", "y", "z"])
    vm = VLoRAModel(Toy(), sub)
    compiled = torch.compile(vm, backend="eager", fullgraph=True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        vm.set_task("y")
        assert torch.equal(compiled(x), vm(x))
        rows = ["x", "y", None]
        assert torch.equal(compiled(x, task_ids=rows), vm(x, task_ids=rows))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_wrapping_fails_loudly():
    sub = SharedSubspace.from_adapters(planted(3), task_ids=["x", "y", "z"])
    compiled = torch.compile(Toy())  # names gain _orig_mod.: still found
    assert len(VLoRAModel(compiled, sub)._layers) == 3
    peft_like = nn.Module()
    peft_like.base_model = nn.Module()
    peft_like.base_model.model = Toy()
    assert len(VLoRAModel(peft_like, sub)._layers) == 3

    missing = Toy()
    del missing.layer[1]["q"]
    with pytest.raises(IncompatibleAdaptersError, match=r"not in the model: \['layer.1.q'\]"):
        VLoRAModel(missing, sub)
    wrong = Toy()
    wrong.layer[0]["v"] = nn.Linear(32, 41)
    with pytest.raises(IncompatibleAdaptersError, match=r"layer.0.v: the model's is \(41, 32\)"):
        VLoRAModel(wrong, sub)
    odd = Toy()
    odd.layer[0]["q"] = nn.Conv2d(32, 40, 1)
    with pytest.raises(IncompatibleAdaptersError, match="Conv2d"):
        VLoRAModel(odd, sub)
    wrapped = Toy()
    VLoRAModel(wrapped, sub)
    with pytest.raises(VLoRAError, match="already wrapped"):
        VLoRAModel(wrapped, sub)
    headed = copy_of(sub)
    headed.add_task(dataclasses.replace(headed.get_task("x"), task_id="h",
                                        extra={"score.weight": torch.zeros(2, 40)}))
    with pytest.raises(IncompatibleAdaptersError, match="'score.weight' has no counterpart"):
        VLoRAModel(Toy(), headed)

    vm = VLoRAModel(Toy(), sub)
    with pytest.raises(TaskNotFoundError):
        vm.set_task("nope")
    with pytest.raises(VLoRAError, match="3 task ids"), vm.tasks(["x", "y", "x"]):
        vm.model.layer[0].q(torch.randn(4, 32))
    sub.absorb(planted(1, seed=5)[0], "new")
    with pytest.raises(SubspaceError, match="absorb"):
        vm.set_task("x")


# ---------------------------------------------------------------- causal LMs
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def peft_adapters(make_base, task_type, targets, tmp_path, n=3, **options):
    from peft import LoraConfig, get_peft_model
    paths = []
    for s in range(n):
        base = make_base()
        torch.manual_seed(100 + s)  # after make_base, which seeds its own weights
        model = get_peft_model(base, LoraConfig(
            task_type=task_type, r=4, lora_alpha=16, target_modules=targets,
            init_lora_weights=False, **options))
        model.save_pretrained(str(tmp_path / f"ad{s}"))
        paths.append(tmp_path / f"ad{s}")
    return paths


@pytest.mark.parametrize("path", ["shared", "factors"])
def test_causal_lm_mixed_generate_and_export(tmp_path, path):
    from peft import PeftModel
    paths = peft_adapters(tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], tmp_path)
    sub = SharedSubspace.from_adapters(paths, task_ids=["a", "b", "c"])
    vm = VLoRAModel(tiny_llama(), sub, path=path)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    single = {}
    for t in (None, "a", "b", "c"):
        vm.set_task(t)
        single[t] = vm.generate(**kw)
        single[t, "beam"] = vm.generate(**kw, num_beams=2, num_return_sequences=2)
    vm.clear_task()
    assert not torch.equal(single["a"], single["b"])  # the tasks change what is generated
    rows = ["b", None, "a"]
    mixed = vm.generate(**kw, task_ids=rows)
    beams = vm.generate(**kw, num_beams=2, num_return_sequences=2, task_ids=rows)
    for i, t in enumerate(rows):
        assert torch.equal(mixed[i], single[t][i])
        assert torch.equal(beams[2 * i: 2 * i + 2], single[t, "beam"][2 * i: 2 * i + 2])

    vm.set_task("c")
    ours = logits(vm, {"input_ids": ids, "attention_mask": mask})
    vm.export("c", tmp_path / "c")
    peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c")).eval()
    torch.testing.assert_close(logits(peft, {"input_ids": ids, "attention_mask": mask}), ours,
                               atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:.*(tie_word_embeddings|save_embedding_layers):UserWarning")
def test_a_tied_lm_head_adapter_serves_like_peft_and_refuses_to_merge(tmp_path):
    # LoRA on a tied lm_head: PEFT saves the tied weight as lm_head.base_layer.weight
    from peft import PeftModel
    tied = lambda: tiny_llama_tied()  # noqa: E731
    paths = peft_adapters(tied, "CAUSAL_LM", ["q_proj", "v_proj", "lm_head"], tmp_path, n=2)
    sub = SharedSubspace.from_adapters(paths, task_ids=["a", "b"])
    assert "lm_head.base_layer.weight" in sub.get_task("a").extra
    vm = VLoRAModel(tied(), sub)
    batch = {"input_ids": torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))}
    vm.set_task("a")
    peft = PeftModel.from_pretrained(tied(), str(paths[0])).eval()
    torch.testing.assert_close(logits(vm, batch), logits(peft, batch), atol=1e-5, rtol=0)
    vm.clear_task()
    # the tied weight each task carries is the model's own: nothing is swapped, and rows mix
    single_b = logits(vm, batch, task_ids=["b", "b"])
    mixed = logits(vm, batch, task_ids=["a", "b"])
    torch.testing.assert_close(mixed[0], logits(peft, batch)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], single_b[1], atol=1e-6, rtol=0)
    with pytest.raises(VLoRAError, match="tied to"):
        vm.merge("a")
    vm.export("a", tmp_path / "out")  # as PEFT wrote it: the tied weight, no modules_to_save
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")
    again = PeftModel.from_pretrained(tied(), str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(again, batch), logits(peft, batch), atol=1e-5, rtol=0)


def tiny_llama_tied():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_gpt2_conv1d_matches_peft_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                          n_head=4)).eval()

    paths = peft_adapters(gpt2, "CAUSAL_LM", ["c_attn", "c_proj"], tmp_path, n=2,
                          fan_in_fan_out=True)
    sub = SharedSubspace.from_adapters(paths, task_ids=["a", "b"])
    vm = VLoRAModel(gpt2(), sub)
    batch = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))}
    vm.set_task("a")
    ours = logits(vm, batch)
    vm.export("a", tmp_path / "a")
    peft = PeftModel.from_pretrained(gpt2(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(peft, batch), ours, atol=1e-5, rtol=0)
    vm.clear_task()
    before = {k: v.clone() for k, v in vm.model.state_dict().items()}
    vm.merge("a")
    torch.testing.assert_close(logits(vm, batch), ours, atol=1e-5, rtol=0)
    vm.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in vm.model.state_dict().items())


def test_a_task_whose_tensors_fail_changes_nothing(minilm_sub, minilm_dir, batch):
    sub = copy_of(minilm_sub)
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), sub)
    vm.set_task("a")
    good = logits(vm, batch)
    bad = dataclasses.replace(sub.get_task("b"), task_id="bad", extra={"score.weight": torch.zeros(3, 384)})
    sub.add_task(bad)  # added after wrapping: its head has no counterpart in the model
    with pytest.raises(IncompatibleAdaptersError, match="score.weight"):
        vm.set_task("bad")
    assert vm.active_task == "a" and torch.equal(logits(vm, batch), good)
    with pytest.raises(IncompatibleAdaptersError):
        logits(vm, batch, task_ids=["a", "bad", None, "a"][:batch["input_ids"].shape[0]])
    assert torch.equal(logits(vm, batch), good)


@pytest.mark.parametrize("path", ["shared", "factors"])
def test_a_replaced_or_removed_task_is_not_served_from_the_cache(minilm_sub, minilm_dir, batch, path):
    sub = copy_of(minilm_sub)
    vm = VLoRAModel(base_classifier(minilm_dir, seed=9), sub, path=path)
    vm.set_task("a")
    served_a, served_b = logits(vm, batch), logits(vm, batch, task_ids=["b"] * batch["input_ids"].shape[0])
    # replace a by b's coordinates and head: the active task and per-call ids follow at once
    sub.add_task(dataclasses.replace(sub.get_task("b"), task_id="a"), replace=True)
    torch.testing.assert_close(logits(vm, batch), served_b, rtol=0, atol=1e-6)
    sub.remove_task("b")
    with pytest.raises(TaskNotFoundError):
        logits(vm, batch, task_ids=["b"] * batch["input_ids"].shape[0])
    with pytest.raises(TaskNotFoundError):
        vm.set_task("b")
    sub.remove_task("a")
    with pytest.raises(TaskNotFoundError):
        logits(vm, batch)  # the active task is gone: not served from the cache either
    vm.clear_task()
    assert not torch.equal(logits(vm, batch), served_a)
