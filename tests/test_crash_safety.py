"""Crash safety of the subspace directory: SIGKILL at random points, concurrent writers,
readers racing a writer. A stored task is never lost and the directory always loads
(checksums verified) as the old state or the new one.

Children are forked from a forkserver that imported vlora once, so each of the many
killed processes starts in milliseconds instead of re-importing torch. This module does
not import pytest: the forkserver imports it, and a forkserver holding pytest forks
children ten times slower.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time

import pytest
import torch

from vlora import LoRAWeights, SharedSubspace, storage
from vlora.atomic import safetensors_blob
from vlora.task import ModuleBasis, TaskProjection

N_MODULES, D, K, R, N_TASKS = 6, 128, 16, 4, 30
MODULES = [f"model.layers.{i}.self_attn.q_proj" for i in range(N_MODULES)]
KILLS = 20


def big_subspace(n_tasks: int = N_TASKS, seed: int = 0) -> SharedSubspace:
    """Enough tensors (about 600) that a save takes a few hundred ms, so that random
    kills land in every phase of it. Built directly: fitting is not under test."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(K, dtype=torch.float64)
    mods = {m: ModuleBasis(torch.linalg.qr(torch.randn(D, K, generator=g))[0],
                           torch.linalg.qr(torch.randn(D, K, generator=g))[0], eye, eye.clone())
            for m in MODULES}
    sub = SharedSubspace(mods)
    for t in range(n_tasks):
        sub.add_task(TaskProjection(
            f"task{t}", {m: torch.randn(K, R, generator=g) for m in mods},
            {m: torch.randn(K, R, generator=g) for m in mods}, {m: 1.0 for m in mods},
            {m: 0.01 for m in mods}, {m: torch.rand(R, generator=g, dtype=torch.float64) for m in mods},
            1.0 / N_MODULES))
    return sub


def adapter(seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(1000 + seed)
    return LoRAWeights(list(MODULES), {m: torch.randn(R, D, generator=g) for m in MODULES},
                       {m: torch.randn(D, R, generator=g) for m in MODULES}, {m: 2.0 for m in MODULES})


def child_op(path: str, op: str, task_id: str, seed: int, ready) -> None:
    """Read-modify-write under the directory lock; ``ready`` is set just before the save.
    One-time work (numpy's setup; no garbage collection of torch's objects in this short
    life) stays out of the window the parent spreads its kills over: the file work."""
    gc.disable()
    torch.set_num_threads(1)
    with storage.lock(path):
        sub = SharedSubspace.load(path)
        if op == "add":
            sub.add_task(sub.project(adapter(seed), task_id))
        elif op == "absorb":
            sub.absorb_incremental(adapter(seed), task_id)
        elif op == "remove":
            sub.remove_task(task_id)
        if ready is not None:
            safetensors_blob({"warm": torch.zeros(1)})  # numpy's one-time setup
            ready.set()
        sub.save(path)


def child_adds(path: str, ids: list[str], absorb: bool, barrier) -> None:
    torch.set_num_threads(1)
    barrier.wait(30)
    for i, tid in enumerate(ids):
        child_op(path, "absorb" if absorb and i % 2 else "add", tid, hash(tid) % 1000, None)


def child_churn(path: str, rounds: int) -> None:
    """A writer that keeps replacing the manifest and deleting old generations."""
    torch.set_num_threads(1)
    for i in range(rounds):
        child_op(path, "add" if i % 2 == 0 else "remove", "churn", i, None)


_CTX = []


def forkserver():
    if not _CTX:
        _CTX.append(multiprocessing.get_context("forkserver"))
        _CTX[0].set_forkserver_preload(["torch", "vlora.subspace", "vlora.storage", __name__])
    return _CTX[0]


def snapshot(sub: SharedSubspace) -> dict[str, torch.Tensor]:
    first = MODULES[0]
    out = {"U": sub.modules[first].U.clone()}
    out.update({t: sub.get_task(t).coords_b[first].clone() for t in sub.tasks})
    return out


def same_content(sub: SharedSubspace, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(sub.modules[MODULES[0]].U if k == "U" else sub.get_task(k).coords_b[MODULES[0]], v)
               for k, v in snap.items())


def test_sigkill_during_save_add_absorb_remove_leaves_old_or_new(tmp_path):
    ctx = forkserver()
    path = tmp_path / "sub"
    big_subspace().save(path)
    # How long a child takes from "about to save" to its exit: the window kills are spread over.
    ready = ctx.Event()
    proc = ctx.Process(target=child_op, args=(str(path), "save", "", 0, ready))
    proc.start()
    ready.wait(60)
    t0 = time.perf_counter()
    proc.join(60)
    save_s = time.perf_counter() - t0
    rng = random.Random(8)
    ops = ["add", "remove", "absorb", "remove", "save", "add", "remove", "absorb"]
    outcomes: dict[str, int] = {}
    after = SharedSubspace.load(path)
    for i in range(KILLS):
        op = ops[i % len(ops)]
        before = after
        old = before.tasks
        snap = snapshot(before)
        tid = f"new{i}" if op in ("add", "absorb") else old[rng.randrange(len(old))] if op == "remove" else ""
        new = old + [tid] if op in ("add", "absorb") else [t for t in old if t != tid] if op == "remove" else old
        ready = ctx.Event()
        proc = ctx.Process(target=child_op, args=(str(path), op, tid, i, ready))
        proc.start()
        while not ready.wait(0.05):
            assert proc.is_alive(), f"child died before its save (exit code {proc.exitcode})"
        time.sleep(rng.uniform(0, 1.2 * save_s))
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        after = SharedSubspace.load(path)  # verifies every checksum
        if op == "save":
            assert after.tasks == old and same_content(after, snap)
            state = "old = new"
        elif after.tasks == old:
            assert same_content(after, snap)
            state = "old"
        elif after.tasks == new:
            state = "new"
            kept = {k: v for k, v in snap.items() if k in new or k == "U"}
            assert same_content(after, kept) if op != "absorb" else \
                not torch.equal(after.modules[MODULES[0]].U, snap["U"])
        else:
            raise AssertionError(f"kill {i} during {op}: tasks {after.tasks} are neither old {old} nor new {new}")
        state += " (child had finished)" if proc.exitcode == 0 else ""
        outcomes[f"{op}: {state}"] = outcomes.get(f"{op}: {state}", 0) + 1
        for t in after.tasks[:2] + after.tasks[-1:]:
            lora = after.reconstruct(t)
            assert all(torch.isfinite(lora.lora_b[m]).all() for m in lora.layer_names)
    print(f"\n{KILLS} kills (save takes {save_s * 1000:.0f} ms): {outcomes}")
    # One clean save removes what killed saves left behind: stale generations and temp files.
    SharedSubspace.load(path).save(path)
    names = sorted(f.name for f in path.iterdir())
    assert len(names) == 5 and names[0] == ".vlora.lock" and names[-1] == "manifest.json", names


def test_two_writers_under_the_lock_lose_no_task(tmp_path):
    ctx = forkserver()
    path = tmp_path / "sub"
    big_subspace(n_tasks=10).save(path)
    barrier = ctx.Barrier(2)
    ids = {"a": [f"a{i}" for i in range(4)], "b": [f"b{i}" for i in range(4)]}
    procs = [ctx.Process(target=child_adds, args=(str(path), ids[w], w == "b", barrier)) for w in ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    tasks = SharedSubspace.load(path).tasks
    assert tasks[:10] == [f"task{i}" for i in range(10)]
    assert sorted(tasks[10:]) == sorted(ids["a"] + ids["b"])


def test_readers_never_fail_while_a_writer_replaces_generations(tmp_path):
    ctx = forkserver()
    path = tmp_path / "sub"
    big_subspace(n_tasks=20).save(path)
    proc = ctx.Process(target=child_churn, args=(str(path), 8))
    proc.start()
    loads = 0
    while proc.is_alive():
        sub = SharedSubspace.load(path)
        assert sub.tasks[:20] == [f"task{i}" for i in range(20)]
        loads += 1
    proc.join()
    assert proc.exitcode == 0 and loads > 0
    print(f"\n{loads} loads raced 8 saves, all succeeded")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_replacing_a_folder_is_one_exchange(tmp_path, monkeypatch):
    from synthetic import planted
    from vlora import save_adapter
    a, b = planted(2)
    save_adapter(a, tmp_path / "ad")

    def no_rename(*args):  # a two-rename swap would leave no folder between its steps
        raise AssertionError("os.replace called: the folder was not swapped in one step")
    monkeypatch.setattr(os, "replace", no_rename)
    save_adapter(b, tmp_path / "ad")
    monkeypatch.undo()
    from vlora import load_adapter
    got = load_adapter(tmp_path / "ad")
    assert torch.equal(got.lora_b[got.layer_names[0]], b.lora_b[b.layer_names[0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp folder left


def test_a_save_over_another_writers_newer_generation_is_refused(tmp_path):
    # Library users who load, change and save without holding the lock (the CLI holds it)
    # must not silently drop what another writer saved in between.
    path = tmp_path / "sub"
    big_subspace(n_tasks=3).save(path)
    mine, theirs = SharedSubspace.load(path), SharedSubspace.load(path)
    extra = big_subspace(n_tasks=5)
    theirs.add_task(extra.get_task("task3"))
    theirs.save(path)
    mine.add_task(extra.get_task("task4"))
    with pytest.raises(storage.SubspaceError, match="by another writer"):
        mine.save(path)
    assert SharedSubspace.load(path).tasks == ["task0", "task1", "task2", "task3"]
    mine.save(tmp_path / "elsewhere")  # another folder is fine, and so are saves after one's own
    with pytest.raises(storage.SubspaceError, match="by another writer"):
        mine.save(path)  # ... which do not make it forget where it came from
    theirs.remove_task("task0")
    theirs.save(path)
    assert SharedSubspace.load(path).tasks == ["task1", "task2", "task3"]
    shutil.rmtree(path)  # replaced by a fresh folder, generation 1 again
    big_subspace(n_tasks=2).save(path)
    with pytest.raises(storage.SubspaceError, match="by another writer"):
        theirs.save(path)
    assert SharedSubspace.load(path).tasks == ["task0", "task1"]
    theirs.save(path, force=True)  # replacing it anyway is the caller's call
    assert SharedSubspace.load(path).tasks == ["task1", "task2", "task3"]
