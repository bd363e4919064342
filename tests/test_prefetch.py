"""Inputs read ahead of the merge (io/prefetch.py): staged from disk with O_DIRECT into reused memory,
or left to the page cache, the merge gives the same bytes."""

from __future__ import annotations

import os
import random
import threading

import pytest
from conftest import no_hang, shard_hashes

from streammerge import MergeConfig, ModelSpec, merge
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.io import prefetch
from streammerge.io.prefetch import ALIGN, Arena, Prefetcher, cached_fraction
from streammerge.io.hub import open_checkpoint
from streammerge.io.sources import Checkpoint
from streammerge.pipeline import engine
from streammerge.pipeline.plan import STAGE_SHARE, build_plan, write_memory

SHAPE = TinyLlama(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    base = random_state(SHAPE, seed=1)
    save_checkpoint(base, root / "base", shards=2)
    for i in range(2):
        save_checkpoint(finetune_of(base, seed=40 + i, scale=0.01), root / f"ft{i}", shards=1)
    try:  # O_DIRECT needs a filesystem that has it (not tmpfs)
        fd = os.open(next((root / "base").glob("*.safetensors")), os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
    except OSError:
        pytest.skip("the test folder's filesystem has no O_DIRECT")
    return root


class StagedNames(list):
    """The names staged, in order; `ranges`: (name, bytes staged) of each."""

    def __init__(self):
        super().__init__()
        self.ranges: list[tuple[str, int]] = []

    def clear(self):
        super().clear()
        self.ranges.clear()


@pytest.fixture
def staged(monkeypatch) -> StagedNames:
    """Every input staged, as if none were in the page cache; returns the names staged."""
    monkeypatch.setattr(prefetch, "cached_fraction", lambda fd, offset, nbytes: 0.0)
    names = StagedNames()
    ranges = names.ranges
    stage = Checkpoint.stage

    def spy(self, s):
        names.append(s.info.name)
        ranges.append((s.info.name, s.hi - s.lo))
        stage(self, s)

    monkeypatch.setattr(Checkpoint, "stage", spy)
    return names


def window(monkeypatch, size: int) -> None:
    """The staging memory of the merges that follow (the plan's share of a small budget is none:
    the chunk scratch alone exceeds it)."""
    monkeypatch.setattr(engine, "Prefetcher", lambda jobs, _: Prefetcher(jobs, size))


def no_staging(monkeypatch) -> None:
    monkeypatch.setattr(Prefetcher, "_direct_fd", lambda self, file: None)


def config(root, method: str) -> MergeConfig:
    if method == "passthrough":  # copied tensors go to the writer as views of their inputs; ft0's
        # layer 1 is read for two output layers, staged once for both while the first is written
        slices = [{"sources": [{"model": str(root / "ft0"), "layer_range": [0, 2]}]},
                  {"sources": [{"model": str(root / "ft0"), "layer_range": [1, 2]}]},
                  {"sources": [{"model": str(root / "ft1"), "layer_range": [1, 2]}]}]
        return MergeConfig.from_dict({"merge_method": "passthrough", "slices": slices, "dtype": "bfloat16"})
    params = {"t": 0.3} if method == "slerp" else {}
    models = tuple(ModelSpec(str(root / f"ft{i}"), {"weight": [0.6, 0.4][i], "density": [0.5, 0.7][i]}) for i in range(2))
    return MergeConfig(method=method, base=str(root / "base"), models=models[:1] if method == "slerp" else models,
                       seed=3, parameters=params)


METHODS = ["dare_ties", "ties", "della", "breadcrumbs", "slerp", "task_arithmetic", "passthrough"]


@pytest.mark.parametrize("method", METHODS)
def test_staged_inputs_give_the_bytes_of_the_mapped_files(models, tmp_path, method, staged, monkeypatch):
    # the default budget stages every tensor; small staging memory wraps around many times and
    # leaves the tensors bigger than half of it to the page cache
    got = []
    for size in (None, 60_000, 16_000):
        if size:
            window(monkeypatch, size)
        merge(config(models, method), tmp_path / f"staged-{size}")
        got.append(shard_hashes(tmp_path / f"staged-{size}"))
    assert len(staged) > 0
    monkeypatch.setattr(prefetch, "cached_fraction", lambda fd, offset, nbytes: None)  # (spy too)
    count = len(staged)
    merge(config(models, method), tmp_path / "mapped")
    assert len(staged) == count  # nothing staged this time
    assert got[0] == got[1] == got[2] == shard_hashes(tmp_path / "mapped")


def test_a_budget_with_room_stages_every_tensor_and_a_small_one_only_some(models, tmp_path, staged, monkeypatch):
    names = set(open_checkpoint(str(models / "base")).tensors)
    merge(config(models, "ties"), tmp_path / "all")
    assert set(staged) == names
    staged.clear()
    window(monkeypatch, 16_000)
    merge(config(models, "ties"), tmp_path / "some")
    assert 0 < len(set(staged)) < len(names)


@pytest.mark.parametrize("method", ["dare_ties", "della", "passthrough", "ties"])
def test_tensors_bigger_than_the_staging_memory_are_staged_block_by_block(models, tmp_path, method, staged, monkeypatch):
    # a small budget: row blocks of a few rows; staging memory too small for a whole tensor
    merge(config(models, method), tmp_path / "want", max_memory=60_000)
    staged.clear()
    window(monkeypatch, 16_000)
    merge(config(models, method), tmp_path / "got", max_memory=60_000)
    assert shard_hashes(tmp_path / "got") == shard_hashes(tmp_path / "want")
    sizes = {n: t.nbytes for n, t in open_checkpoint(str(models / "ft0")).tensors.items()}
    partial = [n for n, b in staged.ranges if b < sizes[n]]
    if method == "ties":  # its trim reads every block twice: whole tensors, or the page cache
        assert partial == []
    else:
        assert "model.embed_tokens.weight" in partial and sizes["model.embed_tokens.weight"] > 8_000


def test_a_failed_read_falls_back_to_the_mapped_file(models, tmp_path, staged, monkeypatch):
    merge(config(models, "dare_ties"), tmp_path / "want")
    monkeypatch.setattr(Prefetcher, "_read", lambda self, fd, s, at, n: s.chunk_done(False))
    merge(config(models, "dare_ties"), tmp_path / "got")
    assert shard_hashes(tmp_path / "got") == shard_hashes(tmp_path / "want")


def test_without_o_direct_every_input_is_read_from_the_mapped_files(models, tmp_path, staged, monkeypatch):
    no_staging(monkeypatch)
    merge(config(models, "ties"), tmp_path / "out")
    assert staged == []


def test_tensors_in_the_page_cache_are_not_staged(models, tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "cached_fraction", lambda fd, offset, nbytes: 1.0)
    monkeypatch.setattr(Checkpoint, "stage", lambda self, s: pytest.fail("staged a cached tensor"))
    merge(config(models, "ties"), tmp_path / "out")


def test_stopping_with_reads_queued_neither_hangs_nor_leaves_a_view_waiting(models, staged, monkeypatch):
    gate = threading.Event()
    read = Prefetcher._read
    monkeypatch.setattr(Prefetcher, "_read", lambda self, *a: (gate.wait(5), read(self, *a)))
    ckpt = open_checkpoint(str(models / "base"))
    names = list(ckpt.tensors)
    with no_hang(10):
        p = Prefetcher([[(ckpt, n, None, None) for n in names]], 1 << 20)  # one step: all staged at once
        p.reached(0)  # every tensor staged, no read done yet
        threading.Timer(0.2, gate.set).start()
        p.stop()  # the running reads finish, the queued ones are cancelled
        for n in names:  # each reads its bytes, staged or (cancelled) from the mapped file
            assert ckpt.view(n).shape == ckpt.tensors[n].shape


def test_the_arena_takes_twice_the_largest_step_at_most(models, staged):
    # the step merging and the next fit; more would be fresh memory for nothing (slow on a VM)
    ckpt = open_checkpoint(str(models / "base"))
    infos = list(ckpt.tensors.values())
    aligned = [-(-(t.offset + t.nbytes) // ALIGN) * ALIGN - (t.offset - t.offset % ALIGN) for t in infos]
    steps = [[(ckpt, infos[0].name, None, None), (ckpt, infos[1].name, None, None)]] + [[(ckpt, t.name, None, None)] for t in infos[2:]]
    for window, want in ((1 << 30, 2 * max(aligned[0] + aligned[1], *aligned[2:])), (3 * ALIGN, 3 * ALIGN)):
        p = Prefetcher(steps, window)
        try:
            assert p.window == want and len(p.arena.memory) == want
        finally:
            p.stop()
    merge(config(models, "dare_ties"), models / "out-arena", max_memory=1 << 30)  # every tensor staged, in that arena
    assert set(staged) == set(ckpt.tensors)  # (each name from each model, some in row blocks)


def test_the_arena_is_a_ring_and_never_hands_out_overlapping_memory():
    rng = random.Random(0)
    size = 64 * ALIGN
    arena = Arena(size)
    live: list[tuple[int, int]] = []
    wraps = 0
    for _ in range(2000):
        if live and (rng.random() < 0.5 or len(live) > 6):
            at, n = live.pop(0 if rng.random() < 0.8 else rng.randrange(len(live)))  # mostly in order
            arena.give(at, n)
        else:
            n = rng.randint(1, 20) * ALIGN
            at = arena.take(n)
            if at is None:
                assert sum(b for _, b in arena.free) < n or max(b for _, b in arena.free) < n
                continue
            wraps += bool(live) and at < live[-1][0]
            assert 0 <= at and at + n <= size
            assert all(at + n <= a or a + b <= at for a, b in live)
            live.append((at, n))
        assert sum(b for _, b in arena.free) + sum(b for _, b in live) == size
    for at, n in live:
        arena.give(at, n)
    assert arena.free == [(0, size)] and wraps > 10


@pytest.mark.parametrize("how", ["cachestat", "mincore"])
def test_cached_fraction_tells_a_read_file_from_an_evicted_one(tmp_path, how, monkeypatch):
    if how == "mincore":  # a kernel before cachestat (Linux 6.5)
        monkeypatch.setattr(prefetch, "_cachestat", False)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.read(fd, 1 << 20)
        if cached_fraction(fd, 0, 1 << 20) is None:
            pytest.skip(f"this kernel has no {how}")
        assert cached_fraction(fd, 0, 1 << 20) == 1.0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for _ in range(3):  # asking starts no read: the pages stay out, whatever is asked first
            assert cached_fraction(fd, 4096, 8192) == 0.0
            assert cached_fraction(fd, 4096 + 100, 3 * 4096) == 0.0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: one page of three back in
        os.pread(fd, 4096, 8192)
        assert cached_fraction(fd, 4096, 3 * 4096) == pytest.approx(1 / 3)
    finally:
        os.close(fd)


def test_the_plan_gives_staging_what_the_budget_leaves(models):
    cfg = config(models, "dare_ties")
    ref, fts = open_checkpoint(str(models / "base")), [open_checkpoint(m.source) for m in cfg.models]
    big = build_plan(cfg, ref, fts, max_memory=1 << 30)
    # the staging share less the writer's stages
    assert big.staging_memory == int((1 << 30) * STAGE_SHARE) - write_memory(1 << 30) and big.peak_memory <= 1 << 30
    # at 1 GiB: a 7B layer's biggest tensor (11008 x 4096 bf16) from three models, the one merging
    # and the next (a TIES trim reads a whole tensor before merging it)
    assert big.staging_memory >= 2 * 3 * 11008 * 4096 * 2
    small = build_plan(cfg, ref, fts, max_memory=1 << 20)  # the chunk scratch alone exceeds it
    assert small.staging_memory == 0
