"""Adapters named by Hugging Face Hub id (``org/name[@revision]``) and, for ``compress
--ray``, by fsspec URL, on the command line.

The Hub is never reached: a cache in huggingface_hub's own layout is built in tmp_path
(``models--org--name/{blobs,snapshots/<commit>,refs/<branch>}``, each snapshot file a
relative symlink to its blob) and read with ``HF_HUB_OFFLINE=1``. huggingface_hub reads
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, so the test sets its
``constants`` as well as the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlora.cli import cli
from vlora.examples import example_adapter_dirs

pytest.importorskip("huggingface_hub")

ORG = "vlora-test"
EXAMPLES = {p.name: p for p in example_adapter_dirs()}
MAIN = ["chat_topic_en", "debate_trump_clinton", "guardian_pandemic"]  # one repo each, on main
V2 = "lang_id"  # branch v2 of vlora-test/chat_topic_en holds this adapter


def commit_of(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def cache_repo(cache: Path, repo_id: str, refs: dict[str, Path]) -> dict[str, str]:
    """``repo_id`` in the cache, each branch of ``refs`` at its own commit holding the
    adapter files of that folder; returns branch -> commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commits = {}
    for branch, folder in refs.items():
        commit = commit_of(repo_id, branch)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in sorted(folder.iterdir()):
            if f.is_file():
                data = f.read_bytes()
                blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
                blob.parent.mkdir(parents=True, exist_ok=True)
                blob.write_bytes(data)
                (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)  # no newline, as huggingface_hub writes
        commits[branch] = commit
    return commits


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding vlora-test/<name> for MAIN (branch main), and
    branch v2 of vlora-test/chat_topic_en; yields branch -> commit of that repo."""
    from huggingface_hub import constants
    home = tmp_path / "hf-home"
    cache = home / "hub"
    commits = cache_repo(cache, f"{ORG}/{MAIN[0]}", {"main": EXAMPLES[MAIN[0]], "v2": EXAMPLES[V2]})
    for name in MAIN[1:]:
        cache_repo(cache, f"{ORG}/{name}", {"main": EXAMPLES[name]})
    for var, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no folder named vlora-test/... here unless a test makes one
    return commits


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def info(sub) -> dict:
    """``info --json`` less what the manifest's size sets: it names each task's source,
    and a snapshot in the cache has a longer path than the example folder."""
    data = json.loads(run("info", sub, "--json").output)
    data["files"].pop("manifest")
    for k in ("overhead_bytes", "stored_bytes", "disk_bytes", "compression_ratio", "disk_ratio"):
        data.pop(k)
    return data


def test_compress_from_hub_ids_equals_compress_from_folders(hub, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    run("compress", *(EXAMPLES[n] for n in MAIN), "-o", local, "-k", "4")
    run("compress", *(f"{ORG}/{n}" for n in MAIN[:2]), EXAMPLES[MAIN[2]], "-o", remote, "-k", "4")
    assert info(remote) == info(local)  # task ids from the repositories' names, errors, bytes
    assert json.loads(run("diff", remote, MAIN[0], MAIN[1], "--json").output) == \
        json.loads(run("diff", local, MAIN[0], MAIN[1], "--json").output)
    assert "OK" in run("validate", remote).output
    run("export", remote, MAIN[0], "-o", tmp_path / "a")
    run("export", local, MAIN[0], "-o", tmp_path / "b")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_revision_as_branch_and_as_commit_hash(hub, tmp_path):
    sub = tmp_path / "sub"
    run("compress", *(EXAMPLES[n] for n in MAIN[1:]), "-o", sub, "-k", "4")
    shutil.copytree(sub, tmp_path / "sub2")
    shutil.copytree(sub, tmp_path / "sub3")
    def add(sub, *args) -> dict:
        data = json.loads(run("add", sub, *args, "--project-only", "--json").output)
        data.pop("stored_bytes_after")  # the manifest names the source: a cache path is longer
        return data

    by_folder = add(sub, EXAMPLES[V2])
    by_branch = add(tmp_path / "sub2", f"{ORG}/{MAIN[0]}@v2", "--task-ids", V2)
    by_commit = add(tmp_path / "sub3", f"{ORG}/{MAIN[0]}@{hub['v2']}", "--task-ids", V2)
    assert by_branch == by_folder and by_commit == by_folder
    # without @revision: main, another adapter, named after the repository
    main = add(sub, f"{ORG}/{MAIN[0]}")
    assert main["added"] == [MAIN[0]] and main["new_errors"] != by_folder["new_errors"]


def test_analyze_and_merge_take_hub_ids(hub, tmp_path):
    ids = [f"{ORG}/{MAIN[0]}@v2", f"{ORG}/{MAIN[1]}"]
    remote = json.loads(run("analyze", *ids, EXAMPLES[MAIN[2]], "--json").output)
    local = json.loads(run("analyze", EXAMPLES[V2], EXAMPLES[MAIN[1]], EXAMPLES[MAIN[2]],
                           "--json").output)
    assert remote["names"] == [*ids, MAIN[2]]  # a Hub adapter by its id, not its commit
    assert remote["similarity"] == local["similarity"]
    run("merge", *ids, "-o", tmp_path / "m1")
    run("merge", EXAMPLES[V2], EXAMPLES[MAIN[1]], "-o", tmp_path / "m2")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "m1" / f).read_bytes() == (tmp_path / "m2" / f).read_bytes()


def test_a_local_folder_named_like_a_hub_id_wins(hub, tmp_path):
    shutil.copytree(EXAMPLES["word_polarity"], tmp_path / ORG / MAIN[0])  # cwd is tmp_path
    data = json.loads(run("analyze", f"{ORG}/{MAIN[0]}", EXAMPLES["word_polarity"], "--json").output)
    assert data["similarity"][0][1] == pytest.approx(1.0)  # the folder, not the Hub's chat_topic_en


@pytest.mark.parametrize("spec, says", [
    (f"{ORG}/not-cached", "offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache"),
    (f"{ORG}/{MAIN[0]}@no-such-branch", "at revision no-such-branch"),
    (f"{ORG}/{MAIN[0]}@{'0' * 40}", "hf download vlora-test/chat_topic_en --revision 0000"),
])
def test_a_hub_id_not_in_the_offline_cache_is_a_clear_error(hub, tmp_path, spec, says):
    for args in (["compress", spec, EXAMPLES[MAIN[1]], "-o", tmp_path / "s", "-k", "2"],
                 ["analyze", spec], ["merge", spec, EXAMPLES[MAIN[1]], "-o", tmp_path / "m"]):
        result = run(*args, code=2)
        assert result.output.startswith(f"vlora: error: {spec}: ") and says in result.output
        assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("spec", ["no/such/folder", "./nothing", "org/", "/abs/nothing",
                                  "org/na--me", "org/.name", "org/name@", "o/n@a b"])
def test_neither_a_path_nor_a_hub_id_is_a_usage_error(hub, tmp_path, spec):
    for args in (["compress", spec, "-o", tmp_path / "s"], ["add", tmp_path, spec],
                 ["analyze", spec], ["merge", spec, "-o", tmp_path / "m"]):
        result = run(*args, code=2)
        assert "Invalid value for 'ADAPTERS...'" in result.output
        assert f"{spec!r}: no such file or folder here, and not a Hugging Face Hub id" in result.output


def test_urls_are_read_by_compress_ray_only(hub, tmp_path):
    result = run("compress", "memory://staged/a", "-o", tmp_path / "s", "-k", "2", code=2)
    assert "memory://staged/a: an fsspec URL; compress reads adapters from URLs with --ray only" \
        in result.output
    for args in (["analyze", "s3://bucket/a"], ["merge", "file:///tmp/a", "-o", tmp_path / "m"],
                 ["add", tmp_path, "memory://staged/a"]):
        assert "only 'vlora compress --ray' reads adapters from URLs" in run(*args, code=2).output
    # click takes what follows --ray for its address: an adapter there is an error
    for first in (f"{ORG}/{MAIN[0]}", "memory://staged/a"):
        result = run("compress", "--ray", first, EXAMPLES[MAIN[1]], "-o", tmp_path / "s", code=2)
        assert f"--ray took {first} for the cluster's address" in result.output
    assert not (tmp_path / "s").exists()


def stage_in_memory(staged: str):
    """A Ray worker setup hook: the folders under ``staged`` as memory://staged/<name>."""
    def setup() -> None:
        import fsspec
        memory = fsspec.filesystem("memory")
        for f in Path(staged).rglob("*"):
            if f.is_file():
                memory.pipe(f"/staged/{f.relative_to(staged).as_posix()}", f.read_bytes())
    return setup


def test_compress_ray_reads_memory_urls_and_hub_ids(hub, tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    staged = tmp_path / "staged"
    for n in MAIN[1:]:
        shutil.copytree(EXAMPLES[n], staged / n)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": stage_in_memory(str(staged))})
    try:
        run("compress", *(EXAMPLES[n] for n in MAIN), "-o", tmp_path / "local", "-k", "4", "--ray")
        # bare --ray is the address "local", even beside a folder of that name (made just above)
        run("compress", f"{ORG}/{MAIN[0]}", *(f"memory://staged/{n}" for n in MAIN[1:]),
            "-o", tmp_path / "urls", "-k", "4", "--ray")
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    local, urls = info(tmp_path / "local"), info(tmp_path / "urls")
    # the adapters' own files are not at hand to measure for URLs; all else is the same
    assert urls.pop("input_disk_bytes") is None and local.pop("input_disk_bytes")
    assert urls == local
