"""Shared test helpers."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch

import streammerge.methods.kernels
import streammerge.pipeline.engine
import streammerge.pipeline.passes
from streammerge.front.demo import TinyLlama
from streammerge.io.writer import file_sha256


try:  # the C kernel, built at install (setup.py); its tests skip without it
    from streammerge.methods import ckernel as _ckernel
    NOT_BUILT = ""
except ImportError as e:
    _ckernel, NOT_BUILT = None, f"compiled kernel not built: {e}"
needs_compiled = pytest.mark.skipif(bool(NOT_BUILT), reason=NOT_BUILT)
COMPILE_MODES = ["off", pytest.param("on", marks=needs_compiled)]  # a merge's compile= with and without the C kernel


# the compiled function each method of its own merges with (methods/ckernel.py)
MERGE_KERNEL = {"ram": "ram_merge", "ramplus_tl": "ram_merge", "nearswap": "nearswap_merge", "sce": "sce_merge",
                "arcee_fusion": "arcee_merge", "slerp": "combine", "model_stock": "combine", "nuslerp": "combine",
                "multislerp": "combine", "karcher": "combine"}


def spy_compiled(monkeypatch, name: str) -> list:
    """A list that grows by one at each call of the compiled kernel's function `name` (none if not built)."""
    calls: list = []
    if _ckernel is not None:
        real = getattr(_ckernel, name)
        monkeypatch.setattr(_ckernel, name, lambda *a: calls.append(1) or real(*a))
    return calls


def awkward(t: torch.Tensor, dtype: torch.dtype, seed: int, huge: float = -3e38) -> torch.Tensor:
    """t in dtype, its magnitudes spread over 2^±8 (float64 sums of float32 products then round), with signed zeros at
    the same places in every input, subnormals and `huge` values sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    t = (t * torch.exp2(torch.randint(-8, 9, t.shape, generator=g).float())).to(dtype).reshape(-1)
    shared = torch.arange(0, t.numel(), 7)
    t[shared] = -0.0
    t[shared[::2]] = 0.0
    spots = torch.randint(0, t.numel(), (2, max(1, t.numel() // 9)), generator=g)
    t[spots[0]], t[spots[1]] = 1e-39, huge
    return t


def compiled_kernel():
    """streammerge.methods.ckernel, or the test skipped when it was not built."""
    if _ckernel is None:
        pytest.skip(NOT_BUILT, allow_module_level=True)  # (a module-level call skips the whole module)
    return _ckernel


@pytest.fixture
def inject_masks(monkeypatch) -> Callable:
    """Replaces the counter-based DARE (and DELLA) mask, in both backends, by `masks(model_index, tensor, start, count)`."""

    def install(masks: Callable[[int, str, int, int], torch.Tensor]) -> None:
        monkeypatch.setattr(streammerge.pipeline.passes, "mask_key", lambda seed, i, name: (i, name))

        def keep_mask(key, start, count, density, device=None):
            return masks(key[0], key[1], start, count).bool()

        def keep_mask_into(key, start, out, density):
            out.copy_(masks(key[0], key[1], start, out.numel()).bool().view(out.shape))

        def keep_mask_varying(key, start, thresholds):  # DELLA: the injected mask, whatever the probabilities
            return masks(key[0], key[1], start, thresholds.numel()).bool().view(thresholds.shape)

        monkeypatch.setattr(streammerge.pipeline.passes, "keep_mask", keep_mask)
        monkeypatch.setattr(streammerge.pipeline.passes, "keep_mask_varying", keep_mask_varying)
        monkeypatch.setattr(streammerge.methods.kernels, "keep_mask_varying", keep_mask_varying)
        monkeypatch.setattr(streammerge.methods.kernels, "keep_mask_into", keep_mask_into)
        # the compiled kernel hashes its masks inline: the merge takes the numpy kernel instead
        monkeypatch.setattr(streammerge.pipeline.engine, "compiled_kernel", lambda mode: None)

    return install


@contextlib.contextmanager
def no_hang(seconds: int = 5):
    """Fails the test (instead of blocking forever) if the body takes longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# A small Llama: big enough for a dozen shards and many row blocks, small enough for seconds.
SMALL_LLAMA = TinyLlama(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vocab=512)


# mergekit's outputs that depend on the CPU kernels torch picked where mergekit ran (the fixture's
# manifest records `cpu_capability`): arcee_fusion in float32 takes torch's float32 softmax and log,
# whose vectorized exp/log round differently under AVX512, AVX2 and the default kernels
CAPABILITY_BOUND = {"arcee_fusion_fp32"}


def skip_other_capability(fixture: Path, case: str) -> None:
    """Skips comparing with mergekit's bytes for `case` where they depend on a CPU capability this
    machine's torch does not use: mergekit itself would give other bytes here."""
    recorded = json.loads((fixture / "manifest.json").read_text())["cpu_capability"]
    here = torch.backends.cpu.get_cpu_capability()
    if case in CAPABILITY_BOUND and here != recorded:
        pytest.skip(f"mergekit's {case} ran under torch's {recorded} kernels; here they are {here}, "
                    "whose float32 exp/log round differently")


def shard_hashes(folder: Path, pattern: str = "model-*.safetensors") -> dict[str, str]:
    """{file name: sha256} of the files of a merge output matching `pattern` (its shards by default)."""
    return {p.name: file_sha256(p)[1] for p in sorted(folder.glob(pattern))}


def split_run_hashes(config, folder: Path, max_shard_size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Shard hashes of `config` merged by one process (folder/one) and split over two workers, rank 1
    first, then finalized (folder/split): any split must give the single run's bytes."""
    from streammerge import merge
    from streammerge.front.api import finalize

    merge(config, folder / "one", max_shard_size=max_shard_size)
    for rank in (1, 0):
        merge(config, folder / "split", max_shard_size=max_shard_size, rank=rank, world_size=2)
    finalize(folder / "split")
    return shard_hashes(folder / "one"), shard_hashes(folder / "split")


def ties_disjoint_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """An independent float32 reference of TIES' elect + disjoint mean (the papers' rule, γ = +1 at 0)."""
    score = sum(w * t for w, t in zip(weights, taus))
    gamma = torch.where(score >= 0, 1.0, -1.0)
    agree = [((t != 0) & (torch.sign(t) == gamma)).float() for t in taus]
    num = sum(w * t * a for w, t, a in zip(weights, taus, agree))
    den = sum(w * a for w, a in zip(weights, agree))
    return torch.where(den != 0, num / torch.where(den == 0, 1.0, den), 0.0)


def tokenizer_json(tokens: list[str], added: list[str] = ()) -> dict:
    """A minimal WordLevel tokenizer.json that transformers loads: `tokens` take ids 0.. in order
    (the first is the unknown token), `added` follow as special added tokens."""
    entries = [{"id": len(tokens) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, t in enumerate(added)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]}}


def write_tokenizer(folder: Path, tokens: list[str], added: list[str] = ()) -> None:
    """tokenizer.json (see tokenizer_json) and a tokenizer_config.json naming the fast tokenizer class."""
    data = tokenizer_json(tokens, added)
    decoder = {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in data["added_tokens"]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": tokens[0], "added_tokens_decoder": decoder}))


@pytest.fixture
def fakehub(tmp_path, monkeypatch):
    """A fake Hub on 127.0.0.1 with huggingface_hub pointed at it, a fresh cache and no token."""
    from huggingface_hub import constants

    from fakehub import FakeHub

    server = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # uploads through the LFS protocol the fake speaks
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()
