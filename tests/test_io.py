"""PEFT adapter I/O: every variant peft writes is read, scaled and written back exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import base_classifier
from vlora import AdapterError, LoRAWeights, UnsupportedAdapterError, load_adapter, save_adapter


def peft_delta(peft_model, module: str, adapter_name: str = "default") -> torch.Tensor:
    layer = peft_model.base_model.model.get_submodule(module)
    return layer.get_delta_weight(adapter_name).double()


def peft_logits(adapter_dir, minilm_dir, batch, adapter_name=None):
    from peft import PeftModel
    model = PeftModel.from_pretrained(base_classifier(minilm_dir, seed=123), str(adapter_dir),
                                      **({"adapter_name": adapter_name} if adapter_name else {}))
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("options", [
    {}, {"use_rslora": True}, {"lora_alpha": 5, "r": 6},
    {"rank_pattern": {"layer.1.attention.self.query": 2}, "alpha_pattern": {"value": 3}},
])
def test_scales_match_peft(make_peft_adapter, options):
    path, peft_model = make_peft_adapter("scale", **options)
    adapter = load_adapter(path)
    assert len(adapter.layer_names) == 12
    for m in adapter.layer_names:
        torch.testing.assert_close(adapter.delta_weight(m), peft_delta(peft_model, m),
                                   rtol=1e-6, atol=1e-7)
    if "rank_pattern" in options:
        assert adapter.ranks()["bert.encoder.layer.1.attention.self.query"] == 2
        assert adapter.scales["bert.encoder.layer.0.attention.self.value"] == 3 / 4


def test_round_trip_is_exact_and_peft_outputs_equal(make_peft_adapter, minilm_dir, batch,
                                                      tmp_path):
    path, _ = make_peft_adapter("rt")
    adapter = load_adapter(path)
    assert sorted(adapter.extra) == ["classifier.bias", "classifier.weight"]
    save_adapter(adapter, tmp_path / "out")
    original, copy = load_file(path / "adapter_model.safetensors"), \
        load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert original.keys() == copy.keys()
    for k in original:
        assert original[k].dtype == copy[k].dtype and torch.equal(original[k], copy[k]), k
    torch.testing.assert_close(peft_logits(tmp_path / "out", minilm_dir, batch),
                               peft_logits(path, minilm_dir, batch), atol=1e-5, rtol=0)


def test_bf16_kept_on_save_and_computed_in_float(make_peft_adapter, tmp_path):
    path, peft_model = make_peft_adapter("bf16", dtype=torch.bfloat16)
    adapter = load_adapter(path)
    m = adapter.layer_names[0]
    assert adapter.lora_a[m].dtype == torch.bfloat16
    assert adapter.delta_weight(m).dtype == torch.float64
    save_adapter(adapter, tmp_path / "o")
    assert torch.equal(load_adapter(tmp_path / "o").lora_b[m], adapter.lora_b[m])


def test_legacy_bin_and_named_subfolder(make_peft_adapter, minilm_dir):
    path, _ = make_peft_adapter("bin", safe=False)
    assert (path / "adapter_model.bin").exists()
    assert len(load_adapter(path).layer_names) == 12
    named, peft_model = make_peft_adapter("named", adapter_name="mine")
    assert (named / "mine" / "adapter_config.json").exists()
    adapter = load_adapter(named)  # the single named subfolder is found
    assert adapter.source.endswith("mine")
    assert adapter.sha256 == load_adapter(named, adapter_name="mine").sha256
    m = adapter.layer_names[3]
    torch.testing.assert_close(adapter.delta_weight(m), peft_delta(peft_model, m, "mine"))
    with pytest.raises(AdapterError, match="no adapter named 'other'"):
        load_adapter(named, adapter_name="other")


def test_keys_with_adapter_names_and_without_prefix(make_peft_adapter, tmp_path):
    path, _ = make_peft_adapter("keys")
    state = load_file(path / "adapter_model.safetensors")
    renamed = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight")
               if "lora_" in k else k: v for k, v in state.items()}
    out = tmp_path / "renamed"
    out.mkdir()
    shutil.copy(path / "adapter_config.json", out)
    save_file(renamed, out / "adapter_model.safetensors")
    a, b = load_adapter(path), load_adapter(out)
    assert a.layer_names == b.layer_names
    assert all(torch.equal(a.lora_b[m], b.lora_b[m]) for m in a.layer_names)


def test_for_vllm_folds_scales_pads_ranks_and_drops_heads(make_peft_adapter, tmp_path):
    path, _ = make_peft_adapter("vllm", rank_pattern={"layer.0.attention.self.query": 2},
                                use_rslora=True)
    adapter = load_adapter(path)
    left_out = save_adapter(adapter, tmp_path / "v", for_vllm=True)
    assert any("classifier" in x for x in left_out)
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert "modules_to_save" not in config and config["r"] == config["lora_alpha"] == 4
    assert not config["rank_pattern"] and not config["use_rslora"]
    out = load_adapter(tmp_path / "v")
    assert not out.extra and set(out.ranks().values()) == {4}
    for m in adapter.layer_names:
        torch.testing.assert_close(out.delta_weight(m), adapter.delta_weight(m), rtol=1e-6, atol=1e-7)


def _copy(path, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(path, out)
    return out


def test_errors_name_the_file_and_the_problem(make_peft_adapter, tmp_path):
    path, _ = make_peft_adapter("errs")
    with pytest.raises(AdapterError, match="no such file"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not a LoRA adapter folder"):
        load_adapter(tmp_path / "empty")

    bad = _copy(path, tmp_path)
    blob = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterError, match="adapter_model.safetensors.*corrupt or truncated"):
        load_adapter(bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter(bad)


def _rewrite(path, tmp_path, name, edit_state=None, edit_config=None):
    out = tmp_path / name
    shutil.copytree(path, out)
    if edit_state:
        state = load_file(out / "adapter_model.safetensors")
        edit_state(state)
        save_file(state, out / "adapter_model.safetensors")
    if edit_config:
        config = json.loads((out / "adapter_config.json").read_text())
        edit_config(config)
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_inconsistent_weights_are_refused(make_peft_adapter, tmp_path):
    path, _ = make_peft_adapter("incons")
    key_a = "base_model.model.bert.encoder.layer.2.attention.self.value.lora_A.weight"
    no_b = _rewrite(path, tmp_path, "nob",
                    lambda s: s.pop(key_a.replace("lora_A", "lora_B")))
    with pytest.raises(AdapterError, match="layer.2.attention.self.value: lora_B missing"):
        load_adapter(no_b)
    nan = _rewrite(path, tmp_path, "nan", lambda s: s[key_a].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(AdapterError, match="NaN or Inf"):
        load_adapter(nan)
    wrong_r = _rewrite(path, tmp_path, "r", edit_config=lambda c: c.update(r=8))
    with pytest.raises(AdapterError, match="config says r=8"):
        load_adapter(wrong_r)
    with pytest.raises(AdapterError, match="lora_alpha"):
        load_adapter(_rewrite(path, tmp_path, "alpha", edit_config=lambda c: c.update(lora_alpha="x")))


@pytest.mark.parametrize("key,value,match", [
    ("use_dora", True, "DoRA"), ("lora_bias", True, "LoRA biases"), ("bias", "all", "bias="),
    ("layer_replication", [[0, 2]], "replicated"), ("peft_type", "IA3", "LoRA only"),
    ("init_lora_weights", "pissa_niter_4", "PiSSA"), ("init_lora_weights", "olora", "PiSSA"),
    ("loftq_config", {"loftq_bits": 4}, "LoftQ"),
])
def test_unsupported_variants_are_refused(make_peft_adapter, tmp_path, key, value, match):
    path, _ = make_peft_adapter("unsup")
    bad = _rewrite(path, tmp_path, key, edit_config=lambda c: c.update({key: value}))
    with pytest.raises(UnsupportedAdapterError, match=match):
        load_adapter(bad)


def test_unknown_config_key_warns(make_peft_adapter, tmp_path):
    path, _ = make_peft_adapter("unk")
    bad = _rewrite(path, tmp_path, "unk", edit_config=lambda c: c.update(shiny_new_field=1))
    with pytest.warns(UserWarning, match="shiny_new_field"):
        load_adapter(bad)


def test_gpt2_conv1d_factors_are_in_linear_orientation(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"],
                                                  fan_in_fan_out=True, init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "g"))
    adapter = load_adapter(tmp_path / "g")
    m = "transformer.h.0.attn.c_attn"
    assert adapter.shapes()[m] == (96, 32) and adapter.config["fan_in_fan_out"]
    # PEFT transposes only when merging into the Conv1D weight (stored d_in x d_out)
    torch.testing.assert_close(adapter.delta_weight(m).T, peft_delta(peft_model, m))


def test_saving_keeps_other_files_and_writes_what_peft_loads(tmp_path):
    from synthetic import planted
    from vlora.io import config_for, outermost
    a = planted(1)[0]
    out = tmp_path / "ad"
    out.mkdir()
    (out / "README.md").write_text("model card")
    save_adapter(a, out)
    assert (out / "README.md").read_text() == "model card"  # PEFT's save_pretrained keeps it too
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)  # the umask's, not the temp folder's
    (tmp_path / "blob").write_text("tokenizer")
    (out / "tokenizer.json").symlink_to(tmp_path / "blob")  # as in a hub cache snapshot
    save_adapter(a, out)
    assert (out / "tokenizer.json").is_symlink() and (out / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "blob"]  # no temp folder left
    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "ln").symlink_to(tmp_path / "deep" / "inner")
    save_adapter(a, tmp_path / "ln" / ".." / "x")  # ".." after a link: where the OS says
    assert (tmp_path / "deep" / "x" / "adapter_config.json").exists() and not (tmp_path / "x").exists()
    assert outermost({"classifier", "classifier.dense", "classifier.out_proj", "score"}) == ["classifier", "score"]
    # target_modules that select the modules are kept (a regex too); else names PEFT can match
    def renamed(names, targets):
        m = dict(zip(names, a.layer_names))
        return LoRAWeights(names, {n: a.lora_a[m[n]] for n in names}, {n: a.lora_b[m[n]] for n in names},
                           {n: a.scales[m[n]] for n in names}, {}, {**a.config, "target_modules": targets})
    regex = r".*\.layer\.\d\.(q|v)"
    assert config_for(renamed(["m.layer.0.q", "m.layer.1.v", "m.layer.2.q"], regex))["target_modules"] == regex
    unet = renamed(["unet.a.to_q", "unet.a.to_out.0", "unet.b.to_q"], ["to_q"])
    assert config_for(unet)["target_modules"] == ["to_out.0", "to_q"]  # never "0": every first child


def test_written_config_names_rank_and_alpha_even_at_peft_defaults():
    from synthetic import planted
    from vlora.io import config_for
    a = planted(1, r=8, scale=1.0)[0]
    a.config = {}  # rank 8, scale 1: what PEFT's defaults give, but not spelled out
    config = config_for(a)
    assert config["r"] == 8 and config["lora_alpha"] == 8


def test_written_files_get_the_umask_permissions(tmp_path):
    import os
    import stat

    from synthetic import planted
    from vlora import SharedSubspace
    old = os.umask(0o022)
    try:
        sub = SharedSubspace.from_adapters(planted(3), task_ids=["a", "b", "c"], num_components=2)
        sub.save(tmp_path / "s")
        modes = {p.name.split("-")[0]: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "s").iterdir()
                 if not p.name.startswith(".")}
    finally:
        os.umask(old)
    assert modes["manifest.json"] == 0o644 and modes["bases"] == 0o644, modes  # others may read it
