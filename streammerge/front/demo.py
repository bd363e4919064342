"""A tiny Llama-shaped base and fine-tunes built on the spot, for the demo and for tests.

Real layer names and config.json, so transformers loads the result; random weights, so nothing is
downloaded. Saved as HF folders with several shards and an index, like real checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from streammerge.constants import SAFETENSORS_INDEX


@dataclass(frozen=True)
class TinyLlama:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    def shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out.update({
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            })
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def config_json(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


def random_state(shape: TinyLlama, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 0.02), norms = 1, from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, dims in shape.shapes().items():
        if len(dims) == 1:
            state[name] = torch.ones(dims, dtype=dtype)
        else:
            state[name] = (torch.randn(dims, generator=gen) * 0.02).to(dtype)
    return state


def finetune_of(base: dict[str, torch.Tensor], seed: int, scale: float = 0.002) -> dict[str, torch.Tensor]:
    """base + a random task vector (|τ| mostly below DARE's 0.005 comfort limit)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (t.float() + torch.randn(t.shape, generator=gen) * scale).to(t.dtype) for n, t in base.items()}


def save_checkpoint(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, *, shards: int = 2, config: dict | None = None
) -> Path:
    """Saves a HF-style folder: `shards` safetensors files plus an index (one file: no index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards <= 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for k in range(shards):
            part = names[k * per : (k + 1) * per]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n].contiguous() for n in part}, folder / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_demo_models(root: str | os.PathLike, *, n_finetunes: int = 2, shape: TinyLlama = TinyLlama(), dtype: torch.dtype = torch.bfloat16) -> tuple[Path, list[Path]]:
    """Writes base/ and ft1/.. under `root`; returns their paths."""
    root = Path(root)
    config = shape.config_json(dtype)
    base = random_state(shape, seed=0, dtype=dtype)
    base_dir = save_checkpoint(base, root / "base", shards=2, config=config)
    (base_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    fts = [save_checkpoint(finetune_of(base, seed=100 + i), root / f"ft{i + 1}", shards=2, config=config) for i in range(n_finetunes)]
    return base_dir, fts


DEMO_CONFIG = """\
# A DARE-TIES merge of two fine-tunes onto their base (mergekit-style YAML).
merge_method: dare_ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: ft2
    parameters: {weight: 0.5, density: 0.5}
parameters:
  lambda: 1.0
seed: 0
"""


def is_demo_folder(root: str | os.PathLike) -> bool:
    """Whether `root` holds what `streammerge demo` builds: its config, and the base and fine-tunes
    with their indexes (a folder merely named like it, or a half-built one, is not)."""
    root = Path(root)
    try:
        same_config = (root / "merge.yaml").read_text() == DEMO_CONFIG
    except (OSError, UnicodeDecodeError):
        return False
    return same_config and all((root / name / SAFETENSORS_INDEX).is_file() for name in ("base", "ft1", "ft2"))

