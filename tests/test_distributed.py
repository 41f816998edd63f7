"""The distributed fit on a local Ray cluster (2 CPUs, started once for the module).

Worker processes cannot see this process's memory:// files or fsspec registrations, so a
setup hook run in every worker copies staged adapters into its memory:// and registers
``dying://``, a local filesystem whose first read kills the worker (a marker file
records it) so that Ray must run the task again.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from synthetic import planted, saved  # noqa: E402
from vlora import SharedSubspace  # noqa: E402
from vlora.errors import AdapterError, BudgetError, IncompatibleAdaptersError  # noqa: E402
from vlora.examples import example_adapter_dirs  # noqa: E402

F64 = torch.float64


def worker_setup(staged: str, marker: str):
    """The setup hook every worker runs (a named function: Ray asks for ``__name__``)."""
    def setup() -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        class DyingFS(LocalFileSystem):  # made here: fsspec's classes hold a lock, never pickled
            """``dying:///abs/path``: the local file system, but the first copy anyone makes
            kills the process copying (after creating ``marker``)."""

            protocol = ("dying",)

            @classmethod
            def _strip_protocol(cls, path):
                return super()._strip_protocol(str(path).removeprefix("dying://"))

            def get_file(self, rpath, lpath, **kwargs):
                if not os.path.exists(marker):
                    Path(marker).touch()
                    os._exit(1)
                return super().get_file(rpath, lpath, **kwargs)

        memory = fsspec.filesystem("memory")
        for f in Path(staged).rglob("*"):
            if f.is_file():
                memory.pipe(f"/staged/{f.relative_to(staged).as_posix()}", f.read_bytes())
        fsspec.register_implementation("dying", DyingFS, clobber=True)
    return setup


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray with 2 CPUs; yields the staged folder (served as memory://staged/) and the marker."""
    staged = tmp_path_factory.mktemp("staged")
    paths = saved(planted(5, seed=11), staged)
    bad = staged / "bad"
    saved(planted(1, seed=12), staged, prefix="bad")[0].rename(bad)
    blob = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    marker = tmp_path_factory.mktemp("marker") / "died"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": worker_setup(str(staged), str(marker))})
    yield staged, paths, marker
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def planted_paths(tmp_path_factory):
    """14 adapters whose stacks have rank 6: k = 4 plus oversample 8 holds them."""
    return [str(p) for p in saved(planted(14, seed=3), tmp_path_factory.mktemp("planted"))]


@pytest.fixture(scope="module")
def planted_fit(cluster, planted_paths):
    return SharedSubspace.from_adapters_distributed(planted_paths, num_components=4, shard_size=3)


def dense(sub: SharedSubspace, task: str, module: str) -> torch.Tensor:
    b = sub.modules[module]
    return b.U.to(F64) @ sub.core(task, module) @ b.V.to(F64).T


def assert_same_fit(a: SharedSubspace, b: SharedSubspace, tol: float = 1e-6, ordered: bool = True) -> None:
    """Same tasks (in the same order), same ks, per-task errors within ``tol`` and
    reconstructions within ``tol`` relative (float32 storage: about 1e-7)."""
    assert a.tasks == b.tasks if ordered else sorted(a.tasks) == sorted(b.tasks)
    assert {m: (x.k_out, x.k_in) for m, x in a.modules.items()} == \
        {m: (x.k_out, x.k_in) for m, x in b.modules.items()}
    for t in b.tasks:
        assert abs(a.task_error(t) - b.task_error(t)) <= tol
        for m in b.modules:
            ref = dense(b, t, m)
            assert float((dense(a, t, m) - ref).norm()) <= tol * max(1.0, float(ref.norm()))


def test_planted_equals_single_process_in_any_shard_order(planted_fit, planted_paths):
    batch = SharedSubspace.from_adapters(planted_paths, num_components=4)
    assert_same_fit(planted_fit, batch)
    assert planted_fit.get_task("t0").source == str(Path(planted_paths[0]))
    # another order and other shards: the same fit (then reordered to compare)
    order = list(planted_paths)
    random.Random(0).shuffle(order)
    shuffled = SharedSubspace.from_adapters_distributed(order, num_components=4, shard_size=4)
    assert shuffled.tasks == [Path(p).name for p in order]
    assert_same_fit(shuffled, batch, ordered=False)
    # without refinement: the streaming fit's bases
    streaming = SharedSubspace.from_adapters_streaming(planted_paths, num_components=4)
    assert_same_fit(SharedSubspace.from_adapters_distributed(planted_paths, num_components=4,
                                                             refine_iters=0, shard_size=5), streaming)


def test_real_adapters_equal_batch_fit_exactly_when_the_sketch_holds_the_stacks(cluster):
    paths = [str(p) for p in example_adapter_dirs()]  # 8 adapters of rank 8: stacks of rank 64
    dist = SharedSubspace.from_adapters_distributed(paths, num_components=8, oversample=56, shard_size=3)
    assert_same_fit(dist, SharedSubspace.from_adapters(paths, num_components=8))


def test_real_adapters_within_one_percent_of_batch_fit_when_truncated(cluster):
    paths = [str(p) for p in example_adapter_dirs()]
    batch = SharedSubspace.from_adapters(paths, num_components=8)
    mean_batch = sum(batch.task_error(t) for t in batch.tasks) / len(batch)
    fits = [SharedSubspace.from_adapters_distributed(order, num_components=8, shard_size=3)
            for order in (paths, paths[::-1])]
    streaming = SharedSubspace.from_adapters_streaming(paths, num_components=8)
    mean_streaming = sum(streaming.task_error(t) for t in batch.tasks) / len(batch)
    for dist in fits:
        mean = sum(dist.task_error(t) for t in batch.tasks) / len(batch)
        assert abs(mean - mean_batch) <= 0.01 * mean_batch
        assert mean < mean_streaming - 0.01  # the refinement is what closes the gap
        for t in batch.tasks:  # task by task the refined fits move a little more
            assert abs(dist.task_error(t) - batch.task_error(t)) <= 0.05 * batch.task_error(t)
    assert abs(sum(fits[0].task_error(t) - fits[1].task_error(t) for t in batch.tasks)) \
        <= 0.01 * mean_batch * len(batch)


def test_killed_worker_is_retried_and_changes_nothing(cluster, planted_fit, planted_paths):
    _, _, marker = cluster
    dying = ["dying://" + str(Path(p).resolve()) for p in planted_paths]
    again = SharedSubspace.from_adapters_distributed(dying, num_components=4, shard_size=3)
    assert marker.exists()  # a worker did die
    assert_same_fit(again, planted_fit, tol=1e-9)
    assert again.get_task("t0").source == dying[0]


def test_memory_urls(cluster):
    staged, local, _ = cluster
    urls = [f"memory://staged/{Path(p).name}" for p in local]
    dist = SharedSubspace.from_adapters_distributed(urls, num_components=3, shard_size=2)
    assert_same_fit(dist, SharedSubspace.from_adapters([str(p) for p in local], num_components=3))
    assert [dist.get_task(t).source for t in dist.tasks] == urls
    with pytest.raises(AdapterError, match="memory://staged/bad/adapter_model.safetensors: corrupt"):
        SharedSubspace.from_adapters_distributed([urls[0], "memory://staged/bad"], num_components=3)
    with pytest.raises(AdapterError, match="memory://staged/nothing"):
        SharedSubspace.from_adapters_distributed(["memory://staged/nothing"], num_components=3)


def test_corrupt_file_fails_naming_it(cluster, planted_paths, tmp_path):
    bad = saved(planted(1, seed=9), tmp_path, prefix="bad")[0] / "adapter_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(AdapterError) as e:
        SharedSubspace.from_adapters_distributed([*planted_paths[:5], str(bad.parent)], num_components=4,
                                                 shard_size=2)
    assert e.value.path == str(bad) and "corrupt or truncated" in str(e.value)


def test_incompatible_adapter_fails_naming_it(cluster, planted_paths, tmp_path):
    other = saved(planted(1, d_out=24, seed=9), tmp_path, prefix="wide")[0]
    with pytest.raises(IncompatibleAdaptersError, match=f"{other}: modules or shapes differ"):
        SharedSubspace.from_adapters_distributed([*planted_paths[:2], str(other)], num_components=4,
                                                 shard_size=2)


def test_bits_quantize_in_the_workers_as_in_one_process(cluster, planted_fit, planted_paths):
    quantized = SharedSubspace.from_adapters_distributed(planted_paths, num_components=4, shard_size=3,
                                                         bits=6)
    reference = copy.deepcopy(planted_fit)
    reference.quantize(6, coordinates=True)
    for m, b in reference.modules.items():
        assert torch.equal(quantized.modules[m].quant["U"].codes, b.quant["U"].codes)
    assert_same_fit(quantized, reference, tol=1e-9)
    assert all(not quantized.get_task(t).error_is_bound for t in quantized.tasks)


def test_cli_compress_ray(cluster, planted_fit, planted_paths, tmp_path):
    from click.testing import CliRunner

    from vlora.cli import cli
    out = tmp_path / "sub"
    result = CliRunner().invoke(cli, ["compress", *planted_paths, "-o", str(out), "-k", "4", "--ray"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert_same_fit(SharedSubspace.load(out), planted_fit, tol=1e-9)
    for args, message in ((["--ray", *planted_paths, "-o", str(tmp_path / "a")], "--ray=ADDRESS"),
                          ([*planted_paths, "-o", str(tmp_path / "b"), "--streaming", "--ray"],
                           "--ray goes without --streaming")):
        result = CliRunner().invoke(cli, ["compress", *args])
        assert result.exit_code == 2 and message in result.output
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ratio_and_bits_run_compress_search(cluster, planted_paths):
    """``compress --ray --ratio 3 --bits 6``: compress's search over fits, the same result
    (every stack fits in the sketches), with exact errors after quantization."""
    from vlora.compress import compress
    from vlora.stats import stored_bytes
    dist = SharedSubspace.from_adapters_distributed(planted_paths, ratio=3, bits=6, shard_size=4)
    ref = compress(planted_paths, ratio=3, bits=6, private="none")  # Ray fits shared parts only
    assert stored_bytes(dist) == stored_bytes(ref)
    assert_same_fit(dist, ref)
    assert all(not dist.get_task(t).error_is_bound for t in dist.tasks)
    with pytest.raises(BudgetError) as e:
        SharedSubspace.from_adapters_distributed(planted_paths, budget=1000, shard_size=7)
    assert stored_bytes(e.value.closest) > 1000


def test_budget_warns_when_the_sketches_cap_k(cluster):
    paths = [str(p) for p in example_adapter_dirs()]
    with pytest.warns(UserWarning, match="pass a larger num_components"):
        SharedSubspace.from_adapters_distributed(paths, ratio=4, num_components=4, oversample=2,
                                                 refine_iters=2, shard_size=4)
