"""The LLM test bed's benchmark harnesses on planted adapters and made-up results: the
cells' bound and choice, and every report renders what it was given (the full runs
need the bed, which CI never trains)."""

import pytest

from benchmarks import llm_continual, llm_fidelity, llm_serving
from synthetic import planted
from vlora.compress import lora_bytes


def test_a_fidelity_cell_holds_the_bound_and_names_the_kept_fit():
    adapters = planted(6, dim=3, noise=0.05)
    row, sub = llm_fidelity.cell(adapters, [f"t{i}" for i in range(6)], 4, None)
    assert row["bound"] == pytest.approx(max(1.01 * row["svd"], row["svd"] + 0.003))
    assert row["ok"] == (row["vlora"] <= row["bound"])
    assert row["chosen"] in sub.fit_report and sub.fit_report[row["chosen"]][1] == pytest.approx(row["vlora"])
    assert row["stored_bytes"] <= lora_bytes(adapters) / 4


def test_reports_render_their_results():
    kept = {"eval_loss": 2.0, "loss_kept": 0.985, "top1_agreement": 0.9, "greedy_agreement": 0.95}
    rows = [{"task": "a", "vlora": kept, "svd": kept}, {"task": "b", "vlora": {**kept, "loss_kept": 0.95},
                                                        "svd": kept}]
    summary = llm_fidelity.summary(rows, "vlora")
    assert summary["worst_task"] == "b" and summary["loss_kept_mean"] == pytest.approx(0.9675)
    grid = {"set": "one-seed", "n": 2, "ratio": 10, "bits": 6, "vlora": 0.1, "vlora_max": 0.2, "svd": 0.11,
            "bound": 0.113, "ok": True, "chosen": "shared", "shared_only": 0.1, "private_equal": None,
            "stored_bytes": 1000, "disk_ratio": 10.0, "seconds": 1.0}
    way = {"new_mean": 0.3, "fitted_mean": 0.2, "fitted_max": 0.25, "ratio": 9.5, "loss_kept": [0.9]}
    text = llm_fidelity.report({"commit": "abc", "grid": [grid], "families": [{"family": "f", **grid}],
                                "scores": {"one-seed": {"rows": rows, "vlora": summary, "svd": summary}},
                                "held_out": {"n_fit": 30, "fitted_mean": 0.2, "projected": way,
                                             "incremental": way, "full": way}})
    assert "96.75%" in text and "| f | 2 |" in text and "90.0%" in text
    serve = {"config": {"rows": 2, "new_tokens": 4, "repeats": 1, "threads": 1, "prompt_width": 9,
                        "subspace": "/cache/one-seed-k32"}, "load_average": 1.5,
             "modules": 210, "k_out_mean": 3.0, "k_in_mean": 2.0, "k_max": 5, "private_rank_sum_mean": 0,
             "rows_equal_to_peft": {"1": 2}, "commit": "abc",
             "results": [{"tasks": 1, "method": m, "prefill_tok_s": 100.0, "decode_tok_s": 10.0}
                         for m in ("base", "vlora mixed (bmm)")]}
    assert "| 1 | vlora mixed (bmm) | 100 | 1.00 | 10.0 | 1.00 | 2/2 |" in llm_serving.report(serve)
    methods = ("base", "vlora mixed (bmm)", "vlora, shared path only")  # factored, both timed
    serve.update(factored_modules=150, results=[
        {"tasks": 1, "method": m, "prefill_tok_s": 100.0, "decode_tok_s": 10.0 * (i + 1)}
        for i, m in enumerate(methods)],
        rows_equal_to_peft={"vlora mixed (bmm)": {"1": 2}, "vlora, shared path only": {"1": 1}})
    serve["config"]["path"] = "auto"
    text = llm_serving.report(serve)
    assert "150 of 210 modules served as per-row factors" in text
    assert "| 1 | vlora mixed (bmm) | 100 | 1.00 | 20.0 | 2.00 | 2/2 |" in text
    assert "| 1 | vlora, shared path only | 100 | 1.00 | 30.0 | 3.00 | 1/2 |" in text
    share = {"commit": "abc", "k": 48, "p": 8, "base_tasks": ["a"], "runs": [{"rows": [{
        "phi": 2, "task": "n", "lora_drop": 1.0, "kept": 0.91, "kept_after_write_back": 0.9, "trainable": 100,
        "fewer": 20.0, "max_forgetting": 0.004, "train_seconds": 3.0}]}]}
    assert "| 2 | n | 1.000 | 91.0% | 90.0% | 100 | 20.0x | 0.40% | 3 |" in llm_continual.report(share)


def test_serving_timers_time_the_prompt_and_one_step_on_a_copy_of_its_cache():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (kwargs["input_ids"].shape, kwargs["cache"].get_seq_length()
         if kwargs.get("cache") is not None else 0)), with_kwargs=True)
    model.register_forward_hook(lambda m, args, kwargs, out: logits.append(out.logits.shape), with_kwargs=True)
    logits = []
    prefill, step = llm_serving.timers(model, {"input_ids": ids, "attention_mask": mask})
    assert prefill() > 0 and step() > 0 and step() > 0
    # the prompt once to build the cache, again timed; then each step adds one token to a
    # fresh copy of the 7 cached (seen after the forward: 8, never 9)
    assert calls == [((3, 7), 0), ((3, 7), 0), ((3, 1), 8), ((3, 1), 8)]
    assert logits == [(3, 1, 64)] * 4  # the last position's logits only, as generate asks
