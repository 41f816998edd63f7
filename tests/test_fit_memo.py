"""A byte search's memo: what it keeps changes no result, and is computed once."""

import pytest
import torch

import vlora.subspace as subspace_module
from synthetic import planted
from vlora import linalg
from vlora.compress import lora_bytes
from vlora.fit_memo import FitMemo
from vlora.subspace import SharedSubspace


@pytest.fixture(scope="module")
def adapters():
    # N r = 40 < d: refinement runs in the span of the factors (linalg.task_span)
    return planted(5, noise=0.3, d_out=128, d_in=96, r=8)


def fit(adapters, memo, budget):
    return SharedSubspace.from_adapters(adapters, budget=budget, memo=memo)


def assert_same(a: SharedSubspace, b: SharedSubspace) -> None:
    assert a.modules.keys() == b.modules.keys()
    for m in a.modules:
        torch.testing.assert_close(a.modules[m].U, b.modules[m].U, atol=0, rtol=0)
        torch.testing.assert_close(a.modules[m].V, b.modules[m].V, atol=0, rtol=0)
    for t in a.tasks:
        assert a.get_task(t).error == b.get_task(t).error


def test_kept_factors_and_spans_give_the_same_fits_as_recomputing_them(adapters):
    budget = lora_bytes(adapters) / 3
    kept, recomputed = FitMemo(keep_factors=True), FitMemo(keep_factors=False)
    for scale in (1.0, 0.7, 1.3):  # a byte search: fits of one memo at several budgets
        assert_same(fit(adapters, kept, scale * budget), fit(adapters, recomputed, scale * budget))


def test_each_adapters_factors_and_each_modules_span_are_computed_once(adapters, monkeypatch):
    calls = {"factors": 0, "span": 0}
    factors, span = subspace_module._factors, linalg.task_span

    def counted(name, f):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(subspace_module, "_factors", counted("factors", factors))
    monkeypatch.setattr(linalg, "task_span", counted("span", span))
    memo, budget = FitMemo(), lora_bytes(adapters) / 3
    for scale in (1.0, 0.7):
        fit(adapters, memo, scale * budget)
    modules = len(adapters[0].layer_names)
    assert calls == {"factors": len(adapters) * modules, "span": modules}


def test_a_memo_keeps_no_factors_of_adapters_over_its_size_limit(adapters, monkeypatch):
    assert FitMemo.for_adapters(adapters).keep_factors
    monkeypatch.setattr("vlora.fit_memo.FACTOR_CACHE_BYTES", lora_bytes(adapters) - 1)
    assert not FitMemo.for_adapters(adapters).keep_factors


def test_a_memo_for_a_fit_on_an_accelerator_keeps_no_factors(adapters):
    assert FitMemo.for_adapters(adapters, "cpu").keep_factors
    assert not FitMemo.for_adapters(adapters, "cuda:0").keep_factors  # GPU memory is not spent on them
