"""Generates Llama-shaped synthetic checkpoints: a base and n fine-tunes, real names and shapes.

    python benchmarks/make_models.py tinyllama /data/bench --finetunes 2
    python benchmarks/make_models.py llama2-7b /data/bench7b --finetunes 2

Weights are N(0, 0.02) (norms 1), fine-tunes add N(0, 0.002): random, but the shapes, names, dtypes
and shard layout are those of the real models, which is all the merge's speed depends on. Tensors
are generated one at a time from per-tensor seeds, so memory stays at one shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    # Llama-2-7B's tensors, 12 of its 32 layers (2.7 B parameters): the 7B shape where the disk cannot
    # hold three 13.5 GB models and their merge; the time per byte is the same
    "llama2-7b-12l": (4096, 11008, 12, 32, 32, 32000),
    "tiny": (256, 688, 4, 8, 4, 1000),
}


def tensor_shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, tuple[int, ...]]:
    kv = hidden // heads * kv_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def make_tensor(name: str, shape: tuple[int, ...], model: int) -> torch.Tensor:
    """model 0 is the base; model i > 0 is base + its own noise."""
    if len(shape) == 1:
        base = torch.ones(shape)
    else:
        base = torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name, 0))) * 0.02
    if model:
        base += torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name, model))) * 0.002
    return base.to(torch.bfloat16)


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], model: int, config: dict, shard_bytes: int,
                encode: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
                stored_bytes: Callable[[str, tuple[int, ...]], int] | None = None) -> None:
    """One model (make_tensor's weights) in shards of about shard_bytes. `encode` turns a bf16 tensor
    into the tensors stored for it (default: itself), `stored_bytes` says how many bytes they take."""
    encode = encode or (lambda name, t: {name: t})
    stored_bytes = stored_bytes or (lambda name, shape: 2 * torch.Size(shape).numel())
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = stored_bytes(name, shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {k: v for n in names for k, v in encode(n, make_tensor(n, shapes[n], model)).items()}
        save_file(state, folder / fname, metadata={"format": "pt"})
        weight_map |= {k: fname for k in state}
    total = sum(stored_bytes(n, s) for n, s in shapes.items())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    shapes = tensor_shapes(hidden, inter, layers, heads, kv, vocab)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    for model in range(args.finetunes + 1):
        name = "base" if model == 0 else f"ft{model}"
        write_model(args.out / name, shapes, model, config, int(args.shard_gb * 1e9))
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
