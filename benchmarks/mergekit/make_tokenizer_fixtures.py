"""Build the mergekit 0.1.5 tokenizer fixtures under tests/fixtures/mergekit_tokenizer/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/mergekit-venv/bin/python benchmarks/mergekit/make_tokenizer_fixtures.py

Four tiny one-layer Llamas (bf16, hidden 16) whose tokenizers disagree, merged by the real
``mergekit-yaml`` with `tokenizer_source: union`, `base`, a model, and a `tokenizer:` block:

- base: 22 tokens (<unk> <s> </s>, a..p, ab cd abcd) in 24 embedding rows (two unused rows);
- ft1, ft3: the base's tokens plus added <|im_start|> (22) and <|im_end|> (23), 24 rows;
- ft2: "c" and "d" swap ids, "p" is gone and "x" has its id, added <|im_start|> (22), 23 rows.

A token's row in a fine-tune is the base's row of that token plus a small delta, so rows that
line up by token make sense to merge. The union these give has the same order in every mergekit
run (see streammerge/vocab.py on why that is not true in general).

Layout (FIX = tests/fixtures/mergekit_tokenizer):
    FIX/inputs/{base,ft1,ft2,ft3}/  config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    FIX/configs/<name>.yaml
    FIX/outputs/<name>/  model.safetensors, tokenizer.json, tokenizer_config.json, config.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from mergekit_run import mergekit_yaml  # beside this script
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIX = HERE.parent.parent / "tests" / "fixtures" / "mergekit_tokenizer"
SEED = 20250315
HIDDEN, INTER = 16, 32

SPECIAL = ["<unk>", "<s>", "</s>"]
BASE_TOKENS = SPECIAL + list("abcdefghijklmnop") + ["ab", "cd", "abcd"]
MERGES = [["a", "b"], ["c", "d"], ["ab", "cd"]]
CHAT = ["<|im_start|>", "<|im_end|>"]


def vocabularies() -> dict[str, tuple[dict[str, int], list[str], int]]:
    """model -> (token -> id of the ordinary vocabulary, added tokens in id order, embedding rows)."""
    base = {t: i for i, t in enumerate(BASE_TOKENS)}
    ft2 = dict(base)
    ft2["c"], ft2["d"] = base["d"], base["c"]
    ft2["x"] = ft2.pop("p")
    return {"base": (base, [], 24), "ft1": (base, CHAT, 24), "ft2": (ft2, CHAT[:1], 23), "ft3": (base, CHAT, 24)}


def tokenizer_files(vocab: dict[str, int], added: list[str]) -> tuple[dict, dict]:
    entries = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t in SPECIAL]
    entries += [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(added)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": entries,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])), "merges": MERGES},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 128,
        "added_tokens_decoder": {str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")} for e in entries},
    }
    return tokenizer, config


def llama_config(rows: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8, "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 128, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 2, "num_hidden_layers": 1, "num_key_value_heads": 1,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": rows,
    }


LAYER = {"self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16), "self_attn.v_proj.weight": (8, 16),
         "self_attn.o_proj.weight": (16, 16), "mlp.gate_proj.weight": (32, 16), "mlp.up_proj.weight": (32, 16),
         "mlp.down_proj.weight": (16, 32), "input_layernorm.weight": (16,), "post_attention_layernorm.weight": (16,)}


def build_models() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    token_rows: dict[tuple[str, str], torch.Tensor] = {}  # (tensor, token) -> the base's row of that token

    def row(tensor: str, token: str) -> torch.Tensor:
        if (tensor, token) not in token_rows:
            token_rows[tensor, token] = torch.randn(HIDDEN, generator=g) * 0.02
        return token_rows[tensor, token]

    base_layer = {f"model.layers.0.{k}": torch.randn(s, generator=g) * 0.02 + (1.0 if "norm" in k else 0.0)
                  for k, s in LAYER.items()}
    base_layer["model.norm.weight"] = torch.ones(HIDDEN) + torch.randn(HIDDEN, generator=g) * 0.02
    models = {}
    for name, (vocab, added, rows) in vocabularies().items():
        ids = {**vocab, **{t: len(vocab) + i for i, t in enumerate(added)}}
        tensors = {}
        for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
            by_id = {i: t for t, i in ids.items()}
            table = torch.stack([row(tensor, by_id.get(i, f"<unused {name} {i}>")) for i in range(rows)])
            if name != "base":
                table = table + torch.randn(table.shape, generator=g) * 0.01
            tensors[tensor] = table
        for k, v in base_layer.items():
            tensors[k] = v if name == "base" else v + torch.randn(v.shape, generator=g) * 0.01
        models[name] = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(tensors.items())}
    return models


def yaml_models(weights: dict[str, float], density: float | None = None) -> str:
    out = "models:\n"
    for m, w in weights.items():
        params = f"weight: {w}" + (f", density: {density}" if density is not None else "")
        out += f"  - model: {m}\n    parameters: {{{params}}}\n"
    return out


CONFIGS = {
    "union_ties": "merge_method: ties\nbase_model: base\n" + yaml_models({"ft1": 1.0, "ft2": 0.5, "ft3": 0.25}, 0.5)
                  + "dtype: bfloat16\ntokenizer_source: union\n",
    "base_task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\n"
                            + yaml_models({"ft1": 0.3, "ft2": 0.3, "ft3": 0.3}) + "dtype: bfloat16\ntokenizer_source: base\n",
    "model_linear": "merge_method: linear\n" + yaml_models({"base": 1.0, "ft1": 2.0, "ft2": 3.0})
                    + "dtype: bfloat16\ntokenizer_source: ft2\n",
    "block_task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\n"
                             + yaml_models({"ft1": 0.3, "ft2": 0.3, "ft3": 0.3}) + "dtype: bfloat16\n" + """\
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<|im_start|>": {source: {kind: zero}}
    "<|new|>": {source: {kind: model_token, model: base, token: "a"}}
    "a": {source: ft1, force: true}
    "<|im_end|>": {source: {kind: model_token, model: ft1, token_id: 3}}
""",
}


def main():
    for sub in ("inputs", "configs", "outputs"):  # README.md stays
        shutil.rmtree(FIX / sub, ignore_errors=True)
    for name, tensors in build_models().items():
        folder = FIX / "inputs" / name
        folder.mkdir(parents=True)
        vocab, added, rows = vocabularies()[name]
        tokenizer, tok_config = tokenizer_files(vocab, added)
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(llama_config(rows), indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (FIX / "configs").mkdir()
    for name, text in CONFIGS.items():
        (FIX / "configs" / f"{name}.yaml").write_text(text)
        print("mergekit-yaml", name, flush=True)
        with mergekit_yaml(FIX / "configs" / f"{name}.yaml", FIX / "inputs", copy_tokenizer=True) as out:
            dest = FIX / "outputs" / name
            dest.mkdir(parents=True)
            (shard,) = out.glob("*.safetensors")
            shutil.copyfile(shard, dest / "model.safetensors")
            for side in ("tokenizer.json", "tokenizer_config.json", "config.json"):
                shutil.copyfile(out / side, dest / side)


if __name__ == "__main__":
    main()
