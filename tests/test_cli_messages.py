"""What the command line says: warnings, -q, --debug, hints, names at 80 columns, help."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from synthetic import planted
from vlora import LoRAWeights, save_adapter
from vlora.cli import cli
from vlora.cli.report_cmds import _module_groups

LONG = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1) for k in ("query", "value")]


def run(*args, code=0, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)
    assert result.exit_code == code, result.output
    return result


def saved(adapters, folder, names, base_models=None):
    paths = []
    for i, (a, name) in enumerate(zip(adapters, names)):
        if base_models:
            a.config["base_model_name_or_path"] = base_models[i]
        save_adapter(a, folder / name)
        paths.append(folder / name)
    return paths


def without(adapter: LoRAWeights, module: str) -> LoRAWeights:
    keep = [m for m in adapter.layer_names if m != module]
    return LoRAWeights(keep, {m: adapter.lora_a[m] for m in keep}, {m: adapter.lora_b[m] for m in keep},
                       {m: adapter.scales[m] for m in keep}, config=dict(adapter.config))


@pytest.fixture()
def mixed(tmp_path):
    """Two adapters naming different base models, the second lacking a module."""
    a, b = planted(2, noise=0.3)
    b = without(b, b.layer_names[-1])
    return saved([a, b], tmp_path, ["bert_task", "distil_task"], ["bert-base-uncased", "distilbert"])


def test_warnings_are_one_line_each_once_and_survive_quiet(mixed, tmp_path):
    for quiet in ((), ("-q",)):
        r = run("merge", *mixed, "-o", tmp_path / f"m{len(quiet)}", *quiet)
        warned = [line for line in r.stderr.splitlines() if line.startswith("vlora: warning: ")]
        assert len(warned) == 2 and "UserWarning" not in r.stderr and ".py:" not in r.stderr
        assert any("different base models" in w for w in warned)
        assert any("missing from some adapters" in w for w in warned)
        assert ("merged 2 adapters" in r.stdout) != bool(quiet)  # -q: nothing else
    assert re.search(r"-q, --quiet +Print nothing but warnings and errors\.\n",
                     run("merge", "--help").output)


def test_base_model_warning_does_not_say_it_goes_on_before_a_shape_error(tmp_path):
    (a,) = planted(1)
    (wide,) = planted(1, d_out=48, seed=1)
    paths = saved([a, wide], tmp_path, ["bert", "other"], ["bert-base", "other-model"])
    r = run("compress", *paths, "-o", tmp_path / "s", code=2)
    warned = [line for line in r.stderr.splitlines() if line.startswith("vlora: warning: ")]
    assert len(warned) == 1 and "different base models" in warned[0]
    assert "has shape (48, 32)" in r.stderr and "shapes agree, so" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_missing_module_hint_names_the_flag(tmp_path):
    a, b = planted(2)
    paths = saved([a, without(b, b.layer_names[0])], tmp_path, ["a", "b"])
    r = run("compress", *paths, "-o", tmp_path / "s", code=2)
    assert "--missing-modules skip" in r.stderr and "missing_modules=" not in r.stderr


def test_debug_after_the_command_name(tmp_path):
    (a,) = planted(1)
    sub = tmp_path / "sub"
    run("compress", *saved([a], tmp_path, ["a"]), "-o", sub, "-k", "2", "-q")
    for args in (("--debug", "export", sub, "nope", "-o", tmp_path / "x"),
                 ("export", sub, "nope", "-o", tmp_path / "x", "--debug")):
        r = run(*args, code=2)
        assert "Traceback" in r.stderr and "vlora: error: no task 'nope'" in r.stderr
    assert "Traceback" not in run("export", sub, "nope", "-o", tmp_path / "x", code=2).stderr


def test_analyze_calls_no_outliers_among_few_and_finds_a_planted_one(tmp_path):
    names = ["chat_topic_en", "chat_topic_de", "debate_trump_clinton"]
    few = saved(planted(3, dim=32, r=4), tmp_path / "few", names)  # unrelated to one another
    r = run("analyze", *few, env={"COLUMNS": "80"})
    assert "too few adapters to call outliers (3 < 5)" in r.stdout
    for n in names:  # whole, not chat_…
        assert n in r.stdout
    assert json.loads(run("analyze", *few, "--json").stdout)["outliers"] is None
    (centre,) = planted(1, seed=1)
    g = torch.Generator().manual_seed(0)
    cluster = [LoRAWeights(centre.layer_names, {m: x + 0.1 * torch.randn(x.shape, generator=g) * x.std()
                                                for m, x in centre.lora_a.items()},
                           dict(centre.lora_b), dict(centre.scales)) for _ in range(8)]
    (far,) = planted(1, seed=2)
    many = saved(cluster + [far], tmp_path / "many", [f"c{i}" for i in range(8)] + ["far"])
    data = json.loads(run("analyze", *many, "--json").stdout)
    assert list(data["outliers"]) == ["far"]
    assert "outliers: far (robust z=" in run("analyze", *many).stdout


def test_analyze_splits_a_wide_similarity_table_instead_of_cropping_it(tmp_path):
    paths = saved(planted(12, dim=32, r=4), tmp_path, [f"adapter_number_{i}" for i in range(12)])
    out = run("analyze", *paths, env={"COLUMNS": "60"}).stdout
    rows = [line for line in out.splitlines() if "adapter_number_" in line]
    assert sum(line.count("1.00") for line in rows) == 12  # the diagonal, every column shown
    assert all(f"{i + 1} adapter_number_{i}" in out for i in range(12))


def _first_column(table: str) -> str:
    """The first column's text of a rich table, folded lines joined."""
    return "".join(line.split("│")[1].strip() for line in table.splitlines() if line.count("│") > 2)


def test_module_names_are_whole_at_80_columns(tmp_path):
    paths = saved(planted(3, modules=LONG, noise=0.3), tmp_path, ["t0", "t1", "t2"])
    sub = tmp_path / "sub"
    run("compress", *paths, "-o", sub, "-k", "2", "-q")
    wide = {"COLUMNS": "80"}
    info = run("info", sub, env=wide).stdout
    diff = run("diff", sub, "t0", "t1", env=wide).stdout
    for out in (info, diff):
        assert "…" not in _first_column(out)
        assert all(m in _first_column(out) for m in LONG)


def test_plot_groups_many_modules_by_type_and_has_json_and_quiet(tmp_path):
    mods = [f"model.layers.{i}.{k}" for i in range(30)
            for k in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    groups = _module_groups(mods)
    assert list(groups) == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    assert all(len(ms) == 30 for ms in groups.values())
    bert = [f"encoder.layer.{i}.{k}" for i in range(12)
            for k in ("attention.output.dense", "intermediate.dense", "output.dense", "query")]
    assert len(_module_groups(bert)) == 4  # three kinds of "dense" stay apart
    assert list(_module_groups(LONG)) == ["0.attention.self.query", "0.attention.self.value",
                                          "1.attention.self.query", "1.attention.self.value"]
    many = [f"layer.{i}.{k}" for i in range(15) for k in ("q", "v", "o")]
    paths = saved(planted(3, modules=many, d_out=8, d_in=8, r=2, dim=3), tmp_path, ["a", "b", "c"])
    sub = tmp_path / "sub"
    run("compress", *paths, "-o", sub, "-k", "2", "-q")
    data = json.loads(run("plot", sub, "-o", tmp_path / "p.png", "--json").stdout)
    assert data["grouped"] and data["bars"] == {"q": 15, "v": 15, "o": 15}
    assert run("plot", sub, "-o", tmp_path / "q.png", "-q").stdout == ""
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_merge_refuses_an_unwritable_output_before_computing(tmp_path, monkeypatch):
    paths = saved(planted(2), tmp_path, ["a", "b"])
    (tmp_path / "file").write_text("not a folder")

    def fail(*args, **kwargs):
        raise AssertionError("merged before checking the output")

    monkeypatch.setattr("vlora.merge.task_arithmetic", fail)
    r = run("merge", *paths, "-o", tmp_path / "file" / "merged", code=2)
    assert re.search(r"file is a file, not a folder", r.stderr)


@pytest.mark.parametrize("command", ["info", "add", "remove", "validate", "diff", "benchmark",
                                     "export", "plot", "analyze", "merge", "compress"])
def test_every_command_shows_an_example_and_takes_quiet_and_debug(command):
    text = run(command, "--help").output
    assert re.search(rf"^\s+vlora {command} ", text, re.M), text
    assert "-q, --quiet" in text and "--debug" in text


@pytest.mark.parametrize("command", ["info", "add", "remove", "validate", "diff", "benchmark",
                                     "export", "plot", "analyze", "merge", "compress"])
def test_commands_that_print_figures_take_json(command):
    assert "--json" in run(command, "--help").output


def test_a_budget_fit_draws_one_bar_whose_total_is_known_before_the_fits(monkeypatch):
    from vlora import SharedSubspace, progress

    totals, created = [], []
    plain_add, plain_create = progress._Bar.add, progress._Bar._create

    def add(bar, items, description=None, reserve=False):
        plain_add(bar, items, description, reserve)
        totals.append((description, reserve, bar.progress.tasks[0].total))

    def create(bar):
        created.append(bar)
        plain_create(bar)

    monkeypatch.setattr(progress._Bar, "add", add)
    monkeypatch.setattr(progress._Bar, "_create", create)
    adapters = planted(4, r=8, noise=0.3)
    with progress.session():
        SharedSubspace.from_adapters(adapters, budget=6000, progress=True)
    assert len(created) == 1
    announced = next(i for i, (_, reserve, _) in enumerate(totals) if reserve)
    assert {t for _, _, t in totals[announced:]} == {totals[-1][2]}  # no stage added to it
    # r, 3r/4, r/2, r/4 at their starts, then the one kept refined
    assert [d for d, _, _ in totals[announced + 1:]].count("Fitting bases") == 5
