"""The fidelity benchmark's paired scoring: a copy's rows lost and gained against its
original, and whether the loss is more than chance (exact McNemar)."""

import pytest

from benchmarks.fidelity import held_out, held_out_lines, paired, paired_row, report, target_line
from synthetic import planted


def test_paired_counts_rows_lost_gained_and_agreement():
    gold = [0, 1, 1, 0, 2, 2]
    before = [0, 1, 0, 0, 2, 1]  # right on rows 0, 1, 3, 4
    after = [0, 0, 1, 1, 2, 0]  # loses rows 1 and 3, gains row 2; row 5 wrong both ways
    p = paired(before, after, gold)
    assert (p["lost"], p["gained"]) == (2, 1)
    assert p["accuracy"] == pytest.approx(3 / 6)
    assert p["agree"] == pytest.approx(2 / 6)  # rows 0 and 4: a changed wrong answer disagrees
    assert p["p"] == pytest.approx(1.0)


@pytest.mark.parametrize("lost, gained, expected", [
    (0, 0, 1.0), (3, 0, 0.25), (6, 0, 2 / 64), (5, 1, 2 * 7 / 64), (10, 2, 2 * 79 / 4096)])
def test_paired_p_is_exact_two_sided_mcnemar(lost, gained, expected):
    # every changed row is one of the original's right answers turned wrong, or back
    n = lost + gained
    gold = [1] * n
    before = [1] * lost + [0] * gained
    after = [0] * lost + [1] * gained
    assert paired(before, after, gold)["p"] == pytest.approx(expected)


def test_target_line_says_how_many_misses_are_more_than_chance():
    orig = 0.8
    acc = [{"task": "a", "eval_rows": 100, "original": orig,
            **paired_row("vlora_q", {"accuracy": 0.72, "lost": 8, "gained": 0, "p": 0.0078,
                                     "agree": 0.92}, orig)},
           {"task": "b", "eval_rows": 50, "original": orig,
            **paired_row("vlora_q", {"accuracy": 0.76, "lost": 2, "gained": 0, "p": 0.5,
                                     "agree": 0.96}, orig)}]
    line = target_line("vlora", acc, "vlora_q")
    assert "MISSED (2 of 2 tasks under 97%, 1 of them lost more than chance" in line
    assert "10 rows lost, 0 gained" in line


def test_report_reads_results_without_paired_numbers():
    # results.json written before the paired scoring still renders (benchmarks report)
    acc = [{"task": "a", "eval_rows": 10, "original": 0.5, "vlora_q": 0.5, "kept_vlora_q": 1.0}]
    reg = {"n_adapters": 1, "rows": [], "accuracy": acc,
           "held_out": {"n_fit": 1, "n_held_out": 1, "fitted_mean": 0.1, "held_out_mean": 0.2},
           "accuracy_summary": {"ratio_target": 10, "ratio": 10.0, "vlora": 0.3},
           "quantized": {"bits": 6, "ratio": 10.0, "vlora": 0.1, "vlora_max": 0.2}}
    text = report({"regimes": {"one-seed": reg}})
    assert "| a | 10 | 0.500 | 0.500 | 100.0% |" in text
    assert "lost/gained" not in text


def test_held_out_adds_new_adapters_three_ways():
    old = planted(8, dim=6, noise=0.05, seed=0)
    new = planted(2, dim=6, noise=0.05, seed=1)  # another subspace: projection misses most of it
    ids = [f"old{i}" for i in range(8)] + ["new0", "new1"]
    h = held_out(old + new, ids, ratio=2.0, n_out=2)
    proj, inc, full = h["projected"], h["incremental"], h["full"]
    assert proj["fitted_mean"] == pytest.approx(h["fitted_mean"], abs=1e-6)  # the bases stayed
    assert proj["new_mean"] > 0.9
    assert inc["new_mean"] < 0.8 * proj["new_mean"] and full["new_mean"] < 0.8 * proj["new_mean"]
    assert inc["fitted_mean"] > h["fitted_mean"] and full["fitted_mean"] > h["fitted_mean"]  # k kept
    assert proj["ratio"] == pytest.approx(inc["ratio"]) == pytest.approx(full["ratio"])
    text = "\n".join(held_out_lines(h))
    assert "| projected (bases unchanged) |" in text and "accuracy" not in text
