"""Sharing a byte budget: each task's core rank per module (vlora.budget)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthetic import MODULES, dense_error, planted, regauge
from vlora import LoRAWeights, SharedSubspace
from vlora.budget import coordinate_numbers, core_ranks, resolve_module_weights

F64 = torch.float64


def ids(n):
    return [f"t{i}" for i in range(n)]


def concentrated(adapter: LoRAWeights) -> LoRAWeights:
    """The adapter with its energy squeezed into one direction per module."""
    squeeze = torch.tensor([1.0, 0.01, 0.01, 0.01])
    return LoRAWeights(adapter.layer_names, adapter.lora_a,
                       {m: b * squeeze for m, b in adapter.lora_b.items()}, adapter.scales)


def full_rank_fit(ads):
    return SharedSubspace.from_adapters(ads, task_ids=ids(len(ads)), num_components=6)


def weighted_objective(sub):
    return sum(t.weight * sum(t.residual_sq.values()) for t in (sub.get_task(x) for x in sub.tasks))


def test_a_task_with_its_energy_in_one_direction_gives_its_ranks_to_the_others():
    ads = planted(6, noise=0.05)
    ads[0] = concentrated(ads[0])
    sub = full_rank_fit(ads)
    tasks = [sub.get_task(t) for t in sub.tasks]
    numbers = coordinate_numbers(tasks, sub.modules, 2)
    ranks = core_ranks(tasks, sub.modules, numbers)
    assert all(r == 1 for r in ranks["t0"].values())
    assert sum(ranks["t1"].values()) > 2 * len(MODULES)
    spent = sum(r * (sub.modules[m].k_out + sub.modules[m].k_in)
                for per in ranks.values() for m, r in per.items())
    assert numbers - 12 < spent <= numbers  # 12 = the dearest rank's cost here


def test_core_ranks_match_dense_singular_values_of_the_cores():
    """The ranks come from the cores' r x r triangular factors; a dense SVD of every
    k_out x k_in core (the reference) hands out the same ranks, also where a side keeps
    fewer directions than the rank (k_in = 2 < r = 4) and where a core is rank-deficient."""
    from vlora import linalg

    ads = planted(6, noise=0.05, seed=4)
    ads[1] = concentrated(ads[1])
    for k in (6, (6, 2)):
        sub = SharedSubspace.from_adapters(ads, task_ids=ids(6), num_components=k)
        tasks = [sub.get_task(t) for t in sub.tasks]
        gains, costs = {}, {}
        for t in tasks:
            for m, b in sub.modules.items():
                s = torch.linalg.svdvals(t.coords_b[m].to(F64) @ t.coords_a[m].to(F64).T)
                gains[(t.task_id, m)] = t.weight * s[:max(1, linalg.numerical_rank(s))].square()
                costs[(t.task_id, m)] = float(b.k_out + b.k_in)
        for numbers in (coordinate_numbers(tasks, sub.modules, p) for p in (1, 2, 3)):
            want = linalg.allocate_budget(gains, costs, numbers, minimum=1)
            got = core_ranks(tasks, sub.modules, numbers)
            assert {key: got[key[0]][key[1]] for key in gains} == {key: want.get(key, 0) for key in gains}


def test_shared_ranks_never_lose_to_one_pseudo_rank_at_equal_numbers():
    ads = planted(8, noise=0.05, seed=3)
    ads[2], ads[5] = concentrated(ads[2]), concentrated(ads[5])
    sub = full_rank_fit(ads)
    for p in (1, 2, 3):
        tasks = [sub.get_task(t) for t in sub.tasks]
        ranks = core_ranks(tasks, sub.modules, coordinate_numbers(tasks, sub.modules, p))
        shared, uniform = SharedSubspace(sub.modules), SharedSubspace(sub.modules)
        for a, t in zip(ads, sub.tasks):
            shared.add_task(shared.project(a, t, pseudo_rank=ranks[t]))
            uniform.add_task(uniform.project(a, t, pseudo_rank=p))
        if p == 1:  # every module keeps one rank: nothing left to share
            assert weighted_objective(shared) == pytest.approx(weighted_objective(uniform), rel=1e-9)
        else:
            assert weighted_objective(shared) < 0.99 * weighted_objective(uniform)


def test_errors_with_a_rank_per_module_are_exact():
    ads = planted(5, noise=0.2)
    sub = full_rank_fit(ads)
    ranks = dict(zip(MODULES, (1, 3, 2)))
    t = sub.project(ads[1], "x", pseudo_rank=ranks)
    assert t.ranks() == ranks
    sub.add_task(t)
    assert t.error == pytest.approx(dense_error(ads[1], sub.reconstruct("x", F64)), rel=1e-5)


def test_ranks_do_not_depend_on_the_gauge():
    ads = planted(6, noise=0.1)
    ads[0] = concentrated(ads[0])
    sub = full_rank_fit(ads)
    numbers = coordinate_numbers([sub.get_task(t) for t in sub.tasks], sub.modules, 2)
    regauged = [sub.project(regauge(a, seed=i), t) for i, (a, t) in enumerate(zip(ads, sub.tasks))]
    assert core_ranks(regauged, sub.modules, numbers) == \
        core_ranks([sub.get_task(t) for t in sub.tasks], sub.modules, numbers)


def test_a_budget_fit_stores_the_shared_ranks_and_keeps_them_through_save(tmp_path):
    ads = planted(8, dim=10, noise=0.05)
    ads[0] = concentrated(ads[0])
    budget = 14000  # the manifest and file headers take about 4 KB of it
    sub = SharedSubspace.from_adapters(ads, task_ids=ids(8), budget=budget)
    assert sub.compression_stats()["stored_bytes"] <= budget
    ranks = [sum(sub.get_task(t).ranks().values()) for t in sub.tasks]
    assert ranks[0] < max(ranks)
    sub.save(tmp_path / "sub")
    back = SharedSubspace.load(tmp_path / "sub")
    for t in sub.tasks:
        assert back.get_task(t).ranks() == sub.get_task(t).ranks()
        assert back.task_error(t) == pytest.approx(sub.task_error(t), rel=1e-6)


def test_module_weight_keys_match_like_peft_target_modules():
    mods = ["enc.layer.0.attn.query", "enc.layer.0.attn.value", "enc.layer.1.attn.value"]
    w = resolve_module_weights({"value": 2.0, "layer.1.attn.value": 3.0}, mods)
    assert w == {mods[0]: 1.0, mods[1]: 2.0, mods[2]: 3.0}  # the longest key wins
    assert resolve_module_weights(None, mods) == dict.fromkeys(mods, 1.0)
    with pytest.raises(ValueError, match="'valeu' matches no module"):
        resolve_module_weights({"valeu": 2.0}, mods)
    with pytest.raises(ValueError, match="ue"):  # "ue" is not a dotted suffix of "value"
        resolve_module_weights({"ue": 2.0}, mods)
    assert resolve_module_weights({"value": np.float32(2.0)}, mods)[mods[1]] == 2.0
    with pytest.raises(ValueError, match="there are no modules"):
        resolve_module_weights({"value": 2.0}, [])
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="positive finite"):
            resolve_module_weights({"value": bad}, mods)


def test_a_weighted_module_gets_more_of_the_budget_and_errors_stay_exact():
    ads = planted(8, noise=0.3)
    lora = sum(a.num_lora_params() for a in ads) * 4
    plain = SharedSubspace.from_adapters(ads, task_ids=ids(8), budget=lora / 3)
    same = SharedSubspace.from_adapters(ads, task_ids=ids(8), budget=lora / 3,
                                        module_weights={"q": 1.0})
    heavy = SharedSubspace.from_adapters(ads, task_ids=ids(8), budget=lora / 3,
                                         module_weights={"layer.0.v": 8.0})

    def module_error(sub, m):
        ts = [sub.get_task(t) for t in sub.tasks]
        return sum(t.residual_sq[m] for t in ts) / sum(t.norm_sq[m] for t in ts)

    assert all(same.get_task(t).ranks() == plain.get_task(t).ranks() for t in plain.tasks)
    assert module_error(same, "layer.0.v") == pytest.approx(module_error(plain, "layer.0.v"))
    assert module_error(heavy, "layer.0.v") < 0.8 * module_error(plain, "layer.0.v")
    assert heavy.compression_stats()["stored_bytes"] <= lora / 3
    for a, t in zip(ads, heavy.tasks):  # what is reported is still the plain dW error
        assert heavy.task_error(t) == pytest.approx(dense_error(a, heavy.reconstruct(t)), rel=1e-4)


def test_module_weights_need_a_byte_budget():
    with pytest.raises(ValueError, match="budget"):
        SharedSubspace.from_adapters(planted(3), num_components=2, module_weights={"q": 2.0})
