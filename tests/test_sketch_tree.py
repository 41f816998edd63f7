"""Round 1 of the distributed fit, the sketch tree, against a fake Ray that ends tasks in
a random order: the tree is fixed whatever that order, and the tasks in flight and the
sketches alive stay bounded whatever the number of shards."""

from __future__ import annotations

import math
import random
import weakref
from types import SimpleNamespace

import pytest

from vlora.distributed import _sketch_tree
from vlora.distributed_tasks import Failure
from vlora.errors import AdapterError


class Ref:
    """An ObjectRef: its value is known at once, its task ends when the fake says so."""

    def __init__(self, value, task):
        self.value, self.task = value, task


class FakeRay:
    """``wait`` ends one task of those asked for whose inputs have ended, chosen at random;
    a task's inputs are held until it ends (as Ray pins a task's arguments)."""

    def __init__(self, seed: int, failing: set[int] = frozenset(), raising: set[int] = frozenset()):
        self.rng, self.failing, self.raising = random.Random(seed), failing, raising
        self.ended: set[int] = set()
        self.inputs: dict[int, tuple] = {}  # task -> the refs it was given, until it ends
        self.alive = weakref.WeakSet()  # every sketch ref not yet garbage
        self.cancelled: list[Ref] = []
        self.most_alive = self.most_running = 0
        self.tasks = 0

    def submit(self, value, inputs=()) -> int:
        self.tasks += 1
        self.inputs[self.tasks] = inputs
        return self.tasks

    def sketch(self, paths, weighting, widths):
        i = int(paths[0])
        task = self.submit(None)
        info = Ref(RuntimeError(f"worker died on {i}") if i in self.raising else
                   SimpleNamespace(failure=Failure(AdapterError, "", paths[0], "broken")
                                   if i in self.failing else None), task)
        return info, self.track(Ref(f"s{i}", task))

    def merge(self, a, b, widths):
        return self.track(Ref((a.value, b.value), self.submit(None, (a, b))))

    def track(self, ref: Ref) -> Ref:
        self.alive.add(ref)
        self.most_alive = max(self.most_alive, len(self.alive))
        self.most_running = max(self.most_running, len(self.inputs))
        return ref

    def wait(self, refs, num_returns=1, fetch_local=True):
        ready = [r for r in refs if all(x.task in self.ended for x in self.inputs.get(r.task, ()))]
        done = self.rng.choice(ready)
        self.ended.add(done.task)
        self.inputs.pop(done.task, None)
        return [done], [r for r in refs if r is not done]

    def get(self, ref):
        if isinstance(ref.value, Exception):  # as Ray raises a task's error
            raise ref.value
        return ref.value

    def cancel(self, ref):
        self.cancelled.append(ref)


def level_by_level(n: int):
    """The tree the fit has always merged in: pairs of each level, an odd last carried up."""
    nodes = [f"s{i}" for i in range(n)]
    while len(nodes) > 1:
        nodes = [(nodes[i], nodes[i + 1]) if i + 1 < len(nodes) else nodes[i] for i in range(0, len(nodes), 2)]
    return nodes[0]


def run_of(ray: FakeRay, n: int):
    return SimpleNamespace(shards=[([str(i)], [f"t{i}"]) for i in range(n)], weighting="task", progress=False,
                           sketch=SimpleNamespace(remote=ray.sketch), merge=SimpleNamespace(remote=ray.merge))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 64, 200])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_is_fixed_and_memory_bounded(n, seed):
    ray, window = FakeRay(seed), 4
    infos, root = _sketch_tree(ray, run_of(ray, n), (8, 8), window)
    assert root.value == level_by_level(n)
    assert [ray.get(i).failure for i in infos] == [None] * n
    # tasks submitted and not ended: the window, plus the merges one submit can add
    assert ray.most_running <= window + math.ceil(math.log2(n)) + 1
    # sketches alive: those in flight or waiting as inputs, and one per level of the tree
    # (holding every shard's sketch to the end, as the fit once did, fails this from n = 64)
    assert ray.most_alive <= 2 * (window + math.ceil(math.log2(n)) + 1)


def test_a_failed_shard_raises_its_error_and_cancels_the_rest():
    ray = FakeRay(0, failing={5})
    with pytest.raises(AdapterError, match="broken"):
        _sketch_tree(ray, run_of(ray, 40), (8, 8), 4)
    assert ray.cancelled and ray.tasks < 2 * 40  # stopped before every shard was sketched


def test_a_task_that_raises_cancels_the_rest_and_raises():
    ray = FakeRay(0, raising={5})
    with pytest.raises(RuntimeError, match="worker died on 5"):
        _sketch_tree(ray, run_of(ray, 40), (8, 8), 4)
    assert ray.cancelled and ray.tasks < 2 * 40
