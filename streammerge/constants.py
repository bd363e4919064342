"""File names, defaults and environment variables, in one place."""

from __future__ import annotations

import os

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
MANIFEST = "streammerge_manifest.json"
MODEL_CARD = "README.md"
STATE_DIR = ".streammerge"  # while a merge runs: its plan, side files, and a receipt per finished shard
STATE_PLAN = "plan.json"  # in STATE_DIR: everything `finalize` needs
# In STATE_DIR while --force deletes a previous merge: a rerun after a kill finishes the deletion.
STATE_REPLACING = "replacing"
# In STATE_DIR: flock'd by the merge writing the folder (pid and host inside, for the message);
# independent workers share it and each holds its own `lock.rank-R-of-W`.
STATE_LOCK = "lock"
# Files copied from the base (or the tokenizer source) when present; a folder holding one of the
# TOKENIZER_MARKERS has a tokenizer.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder: this file plus the weights below
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
TOKENIZER_JSON = "tokenizer.json"  # where vocabularies are read from when rows are re-indexed by token (vocab.py)
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_TOKENIZER_BYTES = 256 << 20  # the largest tokenizer.json files on the Hub are tens of MB
# Where DARE's drop happens for a LoRA adapter: on the rebuilt delta, or on its factors (lora.py).
LORA_DROP_MODES = ("delta", "rank", "element_a", "element_b")

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

# config.json keys holding the layer count (Llama-likes, GPT-2, others): set when slices stack layers.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Pickle-based weight files: never unpickled (they can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, the transformers default "5GB"
DEFAULT_MAX_MEMORY = 1 << 30  # bytes of working memory for tensor blocks
# A merge config (YAML) is a few kB: bounded before it is expanded (aliases can make a small file huge).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # values and keys, every alias expanded
MAX_CONFIG_DEPTH = 32  # nesting of lists and mappings
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_INDEX_BYTES = 100 * 1024 * 1024  # a model.safetensors.index.json larger than this is not an index
MAX_TENSOR_DIMS = 32  # more dimensions than any model has: refused, as a hostile header
MAX_EMPTY_EXTENT = 1 << 20  # a tensor with no elements may not claim more than this along its other dimensions

# Environment: read once here, passed down explicitly.
DEBUG = os.environ.get("STREAMMERGE_DEBUG", "") not in ("", "0", "false")
