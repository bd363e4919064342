"""Build the mergekit-moe 0.1.5 fixtures under tests/fixtures/mergekit_moe/.

Run with the interpreter of the mergekit venv (see install.sh):

    /work/main/benchmarks/mergekit/.venv/bin/python benchmarks/mergekit/make_moe_fixtures.py

Tiny two-layer models (bf16, hidden 16, intermediate 32, 24 tokens) with a tiny BPE tokenizer made by
the `tokenizers` library: a Llama base and three Llama "experts" (the base plus noise), and the same
for Qwen2 (attention biases). The real `mergekit-moe` builds from them:

- cheap_embed: Mixtral, gates from the base's token embeddings of the prompts (negative prompts,
  a residual_scale);
- hidden: Mixtral, gates from the base's hidden states on the prompts (bf16 forward pass);
- random: Mixtral, `--random-seed 7` (mergekit draws the gates from torch's global RNG);
- qwen_cheap_embed: Qwen2-MoE from the Qwen2 models, one shared expert with prompts;
- qwen3_cheap_embed: Qwen3-MoE from Qwen3 models (q_norm/k_norm, no biases), no shared expert.

Layout (FIX = tests/fixtures/mergekit_moe):
    FIX/inputs/{base,e1,e2,e3,qbase,q1,q2,q3,q3base,q3e1,q3e2,q3e3}/  config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    FIX/configs/<name>.yaml
    FIX/outputs/<name>/  the mergekit-moe output folder, as written
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from mergekit_run import write_manifest  # beside this script
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
FIX = HERE.parent.parent / "tests" / "fixtures" / "mergekit_moe"
SEED = 20250322
HIDDEN, INTER, LAYERS, VOCAB = 16, 32, 2, 24

SPECIAL = ["<unk>", "<s>", "</s>"]
TOKENS = SPECIAL + list("abcdefghijklmnop") + ["ab", "cd", "abcd"]  # 22 tokens in 24 rows
MERGES = [["a", "b"], ["c", "d"], ["ab", "cd"]]


def tokenizer_files() -> tuple[dict, dict]:
    vocab = {t: i for i, t in enumerate(TOKENS)}
    entries = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t in SPECIAL]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": entries,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": MERGES},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 128,
        "added_tokens_decoder": {str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")} for e in entries},
    }
    # the tokenizers library reads it back (a malformed file fails here, not in a test)
    from tokenizers import Tokenizer
    assert Tokenizer.from_str(json.dumps(tokenizer)).encode("ab cd e").ids == [19, 20, 7]
    return tokenizer, config


def model_config(kind: str) -> dict:
    common = {"attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 128,
              "num_attention_heads": 2, "num_hidden_layers": LAYERS, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
              "vocab_size": VOCAB}
    if kind == "llama":
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "head_dim": 8, "mlp_bias": False, "pretraining_tp": 1, "rope_scaling": None}
    if kind == "qwen3":
        return {**common, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                "head_dim": 8, "use_sliding_window": False, "sliding_window": None, "max_window_layers": LAYERS,
                "rope_scaling": None}
    return {**common, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": LAYERS}


def layer_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    shapes = {"self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16), "self_attn.v_proj.weight": (8, 16),
              "self_attn.o_proj.weight": (16, 16), "mlp.gate_proj.weight": (32, 16), "mlp.up_proj.weight": (32, 16),
              "mlp.down_proj.weight": (16, 32), "input_layernorm.weight": (16,), "post_attention_layernorm.weight": (16,)}
    if kind == "qwen2":
        shapes |= {"self_attn.q_proj.bias": (16,), "self_attn.k_proj.bias": (8,), "self_attn.v_proj.bias": (8,)}
    if kind == "qwen3":
        shapes |= {"self_attn.q_norm.weight": (8,), "self_attn.k_norm.weight": (8,)}
    return shapes


def build_models(kind: str, names: list[str], g: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    base = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
            "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.3,
            "model.norm.weight": torch.ones(HIDDEN) + torch.randn(HIDDEN, generator=g) * 0.05}
    for i in range(LAYERS):
        for k, s in layer_shapes(kind).items():
            base[f"model.layers.{i}.{k}"] = (torch.ones(s) + torch.randn(s, generator=g) * 0.05 if "norm" in k
                                             else torch.randn(s, generator=g) * 0.3)
    models = {}
    for j, name in enumerate(names):
        # an expert is the base plus its own noise, bigger on the MLP (what makes it an expert)
        t = {k: v if j == 0 else v + torch.randn(v.shape, generator=g) * (0.2 if ".mlp." in k else 0.02)
             for k, v in base.items()}
        models[name] = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(t.items())}
    return models


EXPERTS = """\
experts:
  - source_model: {e1}
    positive_prompts: ["ab cd", "a b c d"]
    negative_prompts: ["e f g"]
  - source_model: {e2}
    positive_prompts: ["e f g h", "abcd e"]
    residual_scale: 0.5
  - source_model: {e3}
    positive_prompts: ["i j k", "l m n o p"]
    negative_prompts: ["a", "ab cd"]
"""
CONFIGS = {
    # name: (yaml, extra mergekit-moe flags)
    "cheap_embed": ("base_model: base\ngate_mode: cheap_embed\ndtype: bfloat16\nexperts_per_token: 2\n"
                    + EXPERTS.format(e1="e1", e2="e2", e3="e3"), []),
    "hidden": ("base_model: base\ngate_mode: hidden\ndtype: bfloat16\nexperts_per_token: 2\n"
               + EXPERTS.format(e1="e1", e2="e2", e3="e3"), []),
    "random": ("base_model: base\ngate_mode: random\ndtype: float32\nexperts_per_token: 1\n"
               + EXPERTS.format(e1="e1", e2="e2", e3="e3"), ["--random-seed", "7"]),
    "qwen_cheap_embed": ("base_model: qbase\ngate_mode: cheap_embed\ndtype: bfloat16\nexperts_per_token: 2\n"
                         + EXPERTS.format(e1="q1", e2="q2", e3="q3")
                         + "shared_experts:\n  - source_model: qbase\n    positive_prompts: [\"a b c\"]\n", []),
    "qwen3_cheap_embed": ("base_model: q3base\ngate_mode: cheap_embed\ndtype: bfloat16\nexperts_per_token: 2\n"
                          + EXPERTS.format(e1="q3e1", e2="q3e2", e3="q3e3"), []),
}


def run_mergekit_moe(config: Path, cwd: Path, dest: Path, extra: list[str]) -> None:
    exe = Path(sys.executable).with_name("mergekit-moe")
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out"
        subprocess.run([str(exe), str(config), str(out), "--quiet", *extra], cwd=cwd, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        shutil.copytree(out, dest)


def main():
    for sub in ("inputs", "configs", "outputs"):
        shutil.rmtree(FIX / sub, ignore_errors=True)
    g = torch.Generator().manual_seed(SEED)
    tokenizer, tok_config = tokenizer_files()
    models = {**build_models("llama", ["base", "e1", "e2", "e3"], g), **build_models("qwen2", ["qbase", "q1", "q2", "q3"], g),
              **build_models("qwen3", ["q3base", "q3e1", "q3e2", "q3e3"], g)}  # last: the others' draws unchanged
    for name, tensors in models.items():
        folder = FIX / "inputs" / name
        folder.mkdir(parents=True)
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        kind = "qwen3" if name.startswith("q3") and name != "q3" else "qwen2" if name.startswith("q") else "llama"
        (folder / "config.json").write_text(json.dumps(model_config(kind), indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (FIX / "configs").mkdir()
    for name, (text, extra) in CONFIGS.items():
        (FIX / "configs" / f"{name}.yaml").write_text(text)
        print("mergekit-moe", name, *extra, flush=True)
        run_mergekit_moe(FIX / "configs" / f"{name}.yaml", FIX / "inputs", FIX / "outputs" / name, extra)
    flags = {name: extra for name, (_, extra) in CONFIGS.items()}
    write_manifest(FIX, {"generator": "benchmarks/mergekit/make_moe_fixtures.py", "mergekit": "0.1.5", "flags": flags},
                   limit=1_500_000)


if __name__ == "__main__":
    main()
