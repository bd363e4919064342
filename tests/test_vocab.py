"""Embedding rows re-indexed by token (`tokenizer_source`, `tokenizer:`), against mergekit 0.1.5.

The fixtures (tests/fixtures/mergekit_tokenizer/, made by benchmarks/mergekit/make_tokenizer_fixtures.py
with the real mergekit-yaml) hold four one-layer Llamas whose tokenizers disagree: ft1 and ft3 add
chat tokens, ft2 swaps two ids, lacks "p" and has "x" instead, and the base has two unused rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import shard_hashes, split_run_hashes
from safetensors.torch import load_file

from streammerge import MergeConfig, merge
from streammerge.errors import CheckpointError, ConfigError, OutputError
from streammerge.io.vocab import read_vocabulary

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit_tokenizer"
INPUTS = FIXTURES / "inputs"
NAMES = sorted(p.stem for p in (FIXTURES / "configs").glob("*.yaml"))
EMBED = "model.embed_tokens.weight"


def _config(name: str, inputs: Path = INPUTS, **changes) -> MergeConfig:
    data = {**yaml.safe_load((FIXTURES / "configs" / f"{name}.yaml").read_text()), "semantics": "mergekit", **changes}
    return MergeConfig.from_dict(data, base_dir=str(inputs))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("model-*.safetensors"):
        out.update(load_file(shard))
    return out


def _ids(folder: Path) -> dict[str, int]:
    return read_vocabulary(folder, needed_for="test").ids


@pytest.mark.parametrize("name", NAMES)
def test_rows_and_tokens_are_mergekits(tmp_path, name):
    merge(_config(name), tmp_path / "out")
    expected = load_file(FIXTURES / "outputs" / name / "model.safetensors")
    actual = _tensors(tmp_path / "out")
    assert set(actual) == set(expected)
    mismatched = [n for n in expected if actual[n].dtype != expected[n].dtype or not torch.equal(actual[n], expected[n])]
    assert not mismatched, f"{len(mismatched)} tensors differ from mergekit, e.g. {mismatched[:3]}"
    assert _ids(tmp_path / "out") == _ids(FIXTURES / "outputs" / name)
    vocab_size = json.loads((FIXTURES / "outputs" / name / "config.json").read_text())["vocab_size"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vocab_size


def test_transformers_loads_the_union(tmp_path):
    transformers = pytest.importorskip("transformers")
    merge(_config("union_ties"), tmp_path / "out")
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(FIXTURES / "outputs" / "union_ties")
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == 25
    assert ours.convert_tokens_to_ids(["x", "<|im_start|>", "<|im_end|>"]) == [22, 23, 24]
    assert ours.decode(ours("<|im_start|> ab cd")["input_ids"]) == theirs.decode(theirs("<|im_start|> ab cd")["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.shape == (25, 16)
    with torch.no_grad():
        logits = model(torch.tensor([ours.convert_tokens_to_ids(["<|im_start|>", "x", "a"])])).logits
    assert logits.shape == (1, 3, 25) and torch.isfinite(logits).all()


def test_default_semantics_fill_rows(tmp_path):
    # weights 0: the output is the base re-indexed, so every fill of the base shows as it is
    cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
                                 "models": [{"model": m, "parameters": {"weight": 0.0}} for m in ("ft1", "ft2", "ft3")]},
                                base_dir=str(INPUTS))
    merge(cfg, tmp_path / "out")
    out = _tensors(tmp_path / "out")[EMBED]
    rows = {m: load_file(INPUTS / m / "model.safetensors")[EMBED] for m in ("base", "ft1", "ft2", "ft3")}
    ids = {m: _ids(INPUTS / m) for m in rows}
    assert out.shape == (25, 16) and torch.equal(out[:22], rows["base"][:22])  # the base's tokens, its unused rows gone
    assert torch.equal(out[22], rows["ft2"][ids["ft2"]["x"]])  # only ft2 has "x"
    start = sum(rows[m][ids[m]["<|im_start|>"]].double() for m in ("ft1", "ft2", "ft3")) / 3  # the base lacks it
    end = (rows["ft1"][23].double() + rows["ft3"][23].double()) / 2
    assert torch.equal(out[23], start.to(torch.bfloat16)) and torch.equal(out[24], end.to(torch.bfloat16))


def test_default_semantics_padding_rows(tmp_path):
    cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "base",
                                 "tokenizer": {"source": "base", "pad_to_multiple_of": 16},
                                 "models": [{"model": "ft1", "parameters": {"weight": 0.0}}]}, base_dir=str(INPUTS))
    merge(cfg, tmp_path / "out")
    out = _tensors(tmp_path / "out")["lm_head.weight"]
    base = load_file(INPUTS / "base" / "model.safetensors")["lm_head.weight"][:22]
    assert out.shape == (32, 16) and torch.equal(out[:22], base)
    assert torch.equal(out[22:], base.double().mean(dim=0).to(torch.bfloat16).expand(10, 16))


def test_split_and_resumed_union_merges_give_the_same_bytes(tmp_path):
    cfg = _config("union_ties")
    expected, split = split_run_hashes(cfg, tmp_path, 2000)
    assert len(expected) > 2 and split == expected
    # half done by a worker, the rest by a single process: kept shards, the same bytes
    merge(cfg, tmp_path / "resumed", max_shard_size=2000, rank=0, world_size=2)
    result = merge(cfg, tmp_path / "resumed", max_shard_size=2000)
    assert result.reused_shards > 0 and shard_hashes(tmp_path / "resumed") == expected
    assert (tmp_path / "resumed" / "tokenizer.json").read_bytes() == (tmp_path / "one" / "tokenizer.json").read_bytes()


def test_a_changed_tokenizer_is_a_different_merge(tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(INPUTS, inputs)
    merge(_config("union_ties", inputs), tmp_path / "out", max_shard_size=2000, rank=0, world_size=2)
    data = json.loads((inputs / "ft2" / "tokenizer.json").read_text())
    data["model"]["vocab"]["a"], data["model"]["vocab"]["b"] = data["model"]["vocab"]["b"], data["model"]["vocab"]["a"]
    (inputs / "ft2" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(OutputError, match="holds a different merge"):
        merge(_config("union_ties", inputs), tmp_path / "out", max_shard_size=2000)


def test_a_model_without_tokenizer_files_follows_the_base_only_with_the_bases_rows(tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(INPUTS, inputs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (inputs / "ft2" / name).unlink()
    with pytest.raises(CheckpointError, match=r"ft2/tokenizer\.json: missing: tokenizer_source lines up embedding rows "
                                              r"by token .* save the tokenizer there with transformers"):
        merge(_config("union_ties", inputs), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (inputs / "ft1" / name).unlink()  # ft1 has the base's 24 rows: it is taken to have the base's ids, as mergekit does
    cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
                                 "models": ["ft1"]}, base_dir=str(inputs))
    merge(cfg, tmp_path / "ok")
    assert len(_ids(tmp_path / "ok")) == 22


def test_bad_tokenizer_inputs_and_settings_are_one_line_errors(tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(INPUTS, inputs)
    (inputs / "ft3" / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(CheckpointError, match=r"ft3/tokenizer\.json: not a valid tokenizer\.json: "):
        merge(_config("union_ties", inputs), tmp_path / "a")
    (inputs / "ft3" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(CheckpointError, match=r"ft3/tokenizer\.json: no model\.vocab"):
        merge(_config("union_ties", inputs), tmp_path / "b")
    problems = [
        ({"vocab": "truncate_to_base"}, ["vocab: truncate_to_base and tokenizer_source: both say how vocabularies line up"]),
        ({"tokenizer": {"source": "base"}}, ["'tokenizer' and 'tokenizer_source': give one of them"]),
        ({"tokenizer_source": "elsewhere"}, ["tokenizer_source: 'elsewhere' is neither 'base', 'union', one of the models"]),
        ({"tokenizer_source": None, "tokenizer": {"pad_to_multiple_of": 0, "tokens": {"z": {"source": "ft9"}}}},
         ["tokenizer.pad_to_multiple_of: must be a positive integer, got 0",
          "tokenizer.tokens['z'].source: 'ft9' is not the base nor one of the models"]),
        ({"tokenizer_source": None, "tokenizer": {"tokens": {"z": {"source": {"kind": "model_token", "model": "ft1"}}}}},
         ["tokenizer.tokens['z'].source: give exactly one of token_id and token"]),
    ]
    for changes, messages in problems:
        with pytest.raises(ConfigError) as info:
            _config("union_ties", **changes).validate()
        assert len(info.value.problems) == len(messages)
        assert all(p.startswith(m) for p, m in zip(info.value.problems, messages)), info.value.problems
    # settings only the vocabularies can refute, before any work
    for tokens, message in [({"<|new|>": {}}, r"tokenizer\.tokens\['<\|new\|>'\]: .* needs a row for it; give a source"),
                            ({"x": {"source": "ft1"}}, r"tokenizer\.tokens\['x'\]\.source: ft1 does not have 'x'"),
                            ({"x": {"source": {"kind": "model_token", "model": "ft2", "token_id": 23}}},
                             r"token_id: 23 is past the 23 rows of ft2")]:
        cfg = _config("union_ties", tokenizer_source=None, tokenizer={"source": "union", "tokens": tokens})
        with pytest.raises(ConfigError, match=message):
            merge(cfg, tmp_path / "c")
        assert not (tmp_path / "c").exists()


def test_row_gather_reads_runs_and_fills_in_any_block():
    from streammerge.io.sources import Checkpoint
    from streammerge.io.vocab import Fill, Reindex, RowGather

    with Checkpoint(INPUTS / "base") as ckpt:
        rows = ckpt.read(EMBED)
        reindex = Reindex(rows=6, tokens=6, tensors=frozenset({EMBED}), maps={ckpt.label: np.array([-1, 0, 1, 5, 4, -1])},
                          fills=(Fill("zero"),), files={}, mergekit=False, compute_dtype=None)
        gather = RowGather(reindex, EMBED, [ckpt])
        expected = torch.stack([torch.zeros(16, dtype=rows.dtype), rows[0], rows[1], rows[5], rows[4], torch.zeros(16, dtype=rows.dtype)])
        assert torch.equal(gather.rows(ckpt.label, 0, 6), expected)
        assert torch.equal(torch.cat([gather.rows(ckpt.label, r, r + 1) for r in range(6)]), expected)


def test_a_lora_adapter_reads_the_bases_ids(tmp_path):
    from test_lora import bounded_factor, write_adapter

    gen = torch.Generator().manual_seed(0)
    a, b = bounded_factor((4, 24), gen), bounded_factor((16, 4), gen)  # an embedding's factors: τ = (B A)ᵀ
    write_adapter(tmp_path / "lora", {"model.embed_tokens": (a, b)}, r=4, alpha=4)  # no tokenizer files: the base's ids
    cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
                                 "models": [{"model": str(tmp_path / "lora"), "parameters": {"weight": 1.0}},
                                            {"model": "ft2", "parameters": {"weight": 0.0}}]}, base_dir=str(INPUTS))
    merge(cfg, tmp_path / "out")
    out = _tensors(tmp_path / "out")[EMBED]
    base = load_file(INPUTS / "base" / "model.safetensors")[EMBED]
    tau = (b.double() @ a.double()).T.float()
    assert out.shape == (24, 16)  # the base's 22 tokens, "x" from ft2 and its <|im_start|>
    assert torch.allclose(out[:22].float(), (base[:22].float() + tau[:22]), atol=2 ** -8)
    assert torch.equal(out[22], load_file(INPUTS / "ft2" / "model.safetensors")[EMBED][_ids(INPUTS / "ft2")["x"]])


@pytest.mark.parametrize("source", ["base", "union"])
def test_models_sharing_a_sentencepiece_tokenizer_need_no_tokenizer_json(tmp_path, source):
    # older repos ship only tokenizer.model: when every model has the base's (or none), rows already line up
    from streammerge.front.demo import build_demo_models

    base, fts = build_demo_models(tmp_path / "models")
    for folder in (base, *fts[:1]):
        (folder / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    def config(**extra) -> MergeConfig:
        return MergeConfig.from_dict({"merge_method": "ties", "base_model": str(base), **extra,
                                      "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]})
    merge(config(tokenizer_source=source), tmp_path / "out")
    merge(config(), tmp_path / "plain")
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "plain")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    (fts[1] / "tokenizer.model").write_bytes(b"another tokenizer")  # now they differ: ids must be read, from tokenizer.json
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        merge(config(tokenizer_source=source), tmp_path / "differ")


def test_a_model_with_only_the_bases_tokenizer_model_follows_the_bases_ids(tmp_path):
    # the base has tokenizer.json and tokenizer.model; a fine-tune only the same tokenizer.model
    from conftest import write_tokenizer

    from streammerge.front.demo import build_demo_models
    from streammerge.io.sources import Checkpoint

    base, fts = build_demo_models(tmp_path / "models")
    tokens = [f"t{i}" for i in range(Checkpoint(base).tensors["model.embed_tokens.weight"].shape[0])]
    write_tokenizer(base, tokens)
    write_tokenizer(fts[1], tokens)
    for folder in (base, fts[0]):
        (folder / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": str(base), "tokenizer_source": "union",
                                 "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts]})
    merge(cfg, tmp_path / "out")
    plain = MergeConfig.from_dict({**cfg.to_dict(), "tokenizer_source": None})
    merge(plain, tmp_path / "plain")
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "plain")
    (fts[0] / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        merge(cfg, tmp_path / "differ")
