"""The router (gate) weights of a MoE built from dense experts: mergekit-moe 0.1.5's formulas
(mergekit/moe/router.py), computed without loading the base model whole.

Each gate mode gives a (layers, experts, hidden) float tensor; row e of layer l's gate is expert e's.

- random: torch.randn, from a generator seeded with `seed` (mergekit draws from torch's global RNG,
  seeded by --random-seed: the same numbers for the same seed);
- uniform_random: U(-1/sqrt(hidden), 1/sqrt(hidden)), torch.nn.Linear's initialization;
- cheap_embed: per prompt list, the sum over prompts and (unpadded) tokens of the base's token
  embeddings in float32, normalized; positive minus negative, normalized again; the same for every layer;
- hidden / hidden_last / hidden_avg: per prompt list, the base's bf16 hidden state entering layer l
  (the embeddings for layer 0: `output_hidden_states[:-1]`) at the last position (hidden_avg: the mean
  over all positions, padding included, as mergekit does), averaged over the prompts; positive minus
  negative, normalized, in bf16. The base runs one decoder layer at a time (transformers' own layer
  module does the arithmetic): only that layer's weights and the prompts' activations are in memory.

Prompts are tokenized as mergekit does: the BOS token prepended to each, no other special tokens,
padded on the left with BOS (EOS when there is none), each prompt list one batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from streammerge.errors import ConfigError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask: (prompts, tokens)


def random_gates(layers: int, experts: int, hidden: int, seed: int, uniform: bool = False) -> torch.Tensor:
    """mergekit's torch.randn((layers, experts, hidden)) (uniform: its torch.rand scaled to
    ±1/sqrt(hidden)), drawn from a CPU generator seeded with `seed`: the numbers mergekit-moe draws
    after --random-seed `seed`."""
    g = torch.Generator().manual_seed(seed)
    if not uniform:
        return torch.randn((layers, experts, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=g) * 2 * scale - scale


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> Batch:
    """mergekit's router.tokenize_prompts, with the tokenizer set up as its build() does."""
    return dict(tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False))


def prepare_tokenizer(tokenizer) -> None:
    """As mergekit-moe's build(): left padding with BOS (EOS when there is no BOS). The tokenizer
    written to the output keeps these settings, as mergekit's does."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def cheap_embed_vector(rows: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> torch.Tensor:
    """(1, hidden): the prompts' token embeddings summed over tokens (padding masked) and prompts, in
    float32, normalized. `rows(ids)` gives the embedding rows of the distinct token ids `ids`.
    mergekit multiplies a one-hot matrix by the whole embedding; gathering the rows gives the same
    float32 values (each is one row times 1.0 plus zeros) without reading the rest of the table."""
    ids = batch["input_ids"]
    distinct, inverse = torch.unique(ids, return_inverse=True)
    h = rows(distinct).float()[inverse]  # (batch, tokens, hidden)
    embedded = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return embedded / embedded.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def combine(vectors: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Per expert (positive, negative or None), each (layers, hidden): positive - negative, normalized
    over hidden; stacked to (layers, experts, hidden), as mergekit's get_gate_params."""
    gate_vecs = []
    for pos, neg in vectors:
        h = pos.clone()
        if neg is not None:
            h -= neg
        h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        gate_vecs.append(h)
    return torch.stack(gate_vecs, dim=0).permute(1, 0, 2)


def cheap_embed_gates(rows: Callable[[torch.Tensor], torch.Tensor], layers: int,
                      prompts: list[tuple[Batch, Batch | None]]) -> torch.Tensor:
    """(layers, experts, hidden) from each expert's (positive, negative or None) tokenized prompts."""
    def vec(batch: Batch) -> torch.Tensor:
        return cheap_embed_vector(rows, batch).repeat(layers, 1)

    return combine([(vec(p), vec(n) if n is not None else None) for p, n in prompts])


def hidden_gates(read: Callable[[str], torch.Tensor], rows: Callable[[torch.Tensor], torch.Tensor], model_config, prompts: list[tuple[Batch, Batch | None]],
                 average: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(layers, experts, hidden), bf16: the base's hidden states on each expert's prompts, one decoder
    layer in memory at a time. `read(name)` reads one of the base's tensors, `rows(ids)` rows of its
    token embeddings; `model_config` is its
    transformers config. The arithmetic is transformers' own (its decoder layer, rotary embedding
    and attention mask, sdpa attention, in bf16), as in mergekit's AutoModelForCausalLM forward pass."""
    try:
        from transformers import AutoModelForCausalLM, masking_utils
    except ImportError:  # pragma: no cover - the moe command checks first
        raise ConfigError("gate_mode hidden needs transformers: pip install transformers") from None
    dtype = torch.bfloat16
    config = model_config
    config._attn_implementation = "sdpa"  # from_pretrained's default, which mergekit gets
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inner = model.model
    rotary = type(inner.rotary_emb)(config=config)  # its buffers are computed at init: a real one
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    batches = [b for pair in prompts for b in pair if b is not None]
    states, masks, position, embeddings = [], [], [], []
    for b in batches:
        ids = b["input_ids"]
        distinct, inverse = torch.unique(ids, return_inverse=True)
        h = rows(distinct).to(dtype)[inverse]
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        makers = {"full_attention": masking_utils.create_causal_mask,
                  "sliding_attention": masking_utils.create_sliding_window_causal_mask}
        mapping = {kind: makers[kind](config=config, inputs_embeds=h, attention_mask=b["attention_mask"], cache=None,
                                      position_ids=pos) for kind in set(layer_types)}
        states.append(h)
        masks.append(mapping)
        position.append(pos)
        embeddings.append(rotary(h, position_ids=pos))
    per_batch: list[list[torch.Tensor]] = [[] for _ in batches]  # each batch's (hidden,) vector per layer
    with torch.no_grad():
        for i in range(n_layers):
            for j, h in enumerate(states):
                x = h.sum(dim=1) / h.shape[1] if average else h[:, -1, :]
                per_batch[j].append(x.sum(dim=0) / x.shape[0])
            if i == n_layers - 1:  # the last layer's output is not a gate's input
                break
            layer = inner.layers[i]
            layer.to_empty(device="cpu")
            prefix = f"model.layers.{i}."
            layer.load_state_dict({n: read(prefix + n).to(dtype) for n in layer.state_dict()}, strict=True)
            for j in range(len(states)):
                states[j] = layer(states[j], attention_mask=masks[j][layer_types[i]], position_ids=position[j],
                                  position_embeddings=embeddings[j])
            layer.to("meta")  # its weights go before the next layer's come
            if progress is not None:
                progress(1)
    stacked = iter([torch.stack(v) for v in per_batch])  # (layers, hidden) per batch, in batch order
    return combine([(next(stacked), next(stacked) if n is not None else None) for _, n in prompts])


def warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> None:
    """mergekit's warning: a layer whose gate vectors are nearly dependent routes poorly."""
    bad = [i for i in range(gates.shape[0]) if torch.linalg.cond(gates[i].float()) > threshold]
    if bad:
        where = "every layer" if len(bad) == gates.shape[0] else f"layer(s) {', '.join(map(str, bad))}"
        log.warning("%s: degenerate routing parameters (the prompts may be too similar); one or more experts will be "
                    "underutilized", where)
