"""Embedding rows re-indexed by token: mergekit's `tokenizer_source` and `tokenizer:` block.

When a merge names a tokenizer source, the output vocabulary is the base's (`base`), one model's or
a folder's (its path), or the union of every model's (`union`), and every model's vocabulary
tensors (embeddings and output heads: their rows are token ids) are read through a map: output row
j is the model's own row of token j. A model that lacks token j gets a fill row instead, the same
for every model lacking it, chosen as mergekit 0.1.5 chooses it (tokenizer/embed.py):

- a `tokenizer.tokens` entry for the token: its source (a model's row of that token, a model's row
  of another token or id, or zeros); `force: true` gives the fill to every model;
- else, a token only one model has: that model's row;
- else, when the base has it: the base's row;
- else the mean of the rows of the models that have it (none: zeros).

`pad_to_multiple_of` pads the row count; each model's padding rows are the mean of its own
re-indexed token rows. A model's tokens are those with an id below its row count (and below
`vocab_size` in its config.json), as mergekit strips the rest.

The union keeps the base's ids and appends, in order: the ordinary vocabulary tokens the base
lacks (models in config order, each in id order), then every model's added tokens the output
lacks (with their flags), then `tokenizer.tokens` entries it still lacks. mergekit appends the same
tokens, but in an order that changes from run to run (it walks a Python set of models and a Rust
hash map of tokens); this order is fixed.

Vocabularies are read from tokenizer.json (`model.vocab` and `added_tokens`) with the json module:
tokenizers and transformers are not needed. The map is part of the plan and of its fingerprint, so
a resumed or split merge reads the same rows.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streammerge.constants import (
    COPIED_FILES,
    MAX_TOKENIZER_BYTES,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_MARKERS,
)
from streammerge.errors import CheckpointError, ConfigError, MismatchError
from streammerge.front.config import DTYPES as CONFIG_DTYPES
from streammerge.front.config import MergeConfig
from streammerge.io.sources import DTYPES, Checkpoint, read_json

log = logging.getLogger(__name__)

# Tensors indexed by token id along their first axis: the names mergekit 0.1.5's architecture files
# give a `vocabulary_axis` (embed_tokens, wte, word_embeddings, lm_head, ...). Position embeddings
# (wpe, position_embeddings) are not: their rows are positions.
VOCABULARY_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|tok_embeddings|output_layer|vocab_projector"
    r"|lm_head(\.decoder|\.linear)?|cls\.predictions(\.decoder)?)\.(weight|bias)$"
    r"|^(shared|output|backbone\.embeddings)\.weight$"
)
# How transformers' add_tokens(str) registers a token: the entry mergekit's union writes for a plain
# vocabulary token that the base lacks.
PLAIN_ADDED_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


def is_vocabulary_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the tensor's rows are token ids (an embedding or an output head, or its bias)."""
    return len(shape) >= 1 and VOCABULARY_TENSOR.search(name) is not None


@dataclass(frozen=True)
class Vocabulary:
    """One tokenizer.json: every token's id (model vocabulary and added tokens) and its added tokens."""

    path: Path
    ids: dict[str, int]
    added: dict[str, dict]  # content -> its added_tokens entry, in id order
    data: dict  # the whole parsed file (the union is written from the base's)


def read_vocabulary(folder: Path, *, needed_for: str) -> Vocabulary:
    """Reads `folder`/tokenizer.json; a CheckpointError names the file and what to do."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        raise CheckpointError(path, f"missing: {needed_for} lines up embedding rows by token and reads each "
                              "vocabulary from tokenizer.json; save the tokenizer there with transformers "
                              "(save_pretrained writes tokenizer.json), or leave the setting out")
    data = read_json(path, MAX_TOKENIZER_BYTES, "not a valid tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict) and all(type(i) is int and i >= 0 for i in vocab.values()):
        ids = dict(vocab)
    elif isinstance(vocab, list) and all(isinstance(e, list) and e and isinstance(e[0], str) for e in vocab):
        ids = {e[0]: i for i, e in enumerate(vocab)}  # Unigram: a token's id is its position
    else:
        raise CheckpointError(path, "no model.vocab (token -> id, or Unigram's [token, score] list); "
                              "save the tokenizer with transformers to write a complete tokenizer.json")
    entries = data.get("added_tokens") or []
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("content"), str) and type(e.get("id")) is int and e["id"] >= 0
            for e in entries):
        raise CheckpointError(path, "added_tokens: every entry needs a string 'content' and a non-negative 'id'")
    added = {}
    for entry in sorted(entries, key=lambda e: e["id"]):
        ids[entry["content"]] = entry["id"]
        added[entry["content"]] = entry
    return Vocabulary(path, ids, added, data)


@dataclass(frozen=True)
class Fill:
    """The row a model gets for a token it lacks (or one `force`d by tokenizer.tokens)."""

    kind: str  # copy (one row) | mean (of several rows, in model order) | zero | pad
    rows: tuple[tuple[str, int], ...] = ()  # (model label, row of that model)
    model: str = ""  # pad: the model whose re-indexed token rows are averaged


@dataclass(frozen=True)
class Reindex:
    """The re-indexed vocabulary tensors of a merge. Pure data, part of the plan and its fingerprint."""

    rows: int  # rows of every vocabulary tensor in the output
    tokens: int  # how many of them are tokens (the rest pad to pad_to_multiple_of)
    tensors: frozenset[str]
    maps: Mapping[str, np.ndarray | None]  # model label -> per output row: own row, or -1-k for fills[k]; None: identity
    fills: tuple[Fill, ...]
    files: Mapping[str, dict]  # tokenizer files rewritten for the output (the union's added tokens)
    mergekit: bool  # fills computed with mergekit's arithmetic (else float64, rounded once)
    compute_dtype: str | None  # mergekit's dtype: fills are computed in it

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.rows, self.tokens, sorted(self.tensors), [vars(f) for f in self.fills],
                                       self.files, self.mergekit, self.compute_dtype], sort_keys=True).encode())
        for label in sorted(self.maps):
            m = self.maps[label]
            h.update(label.encode() + b"\0" + (b"identity" if m is None else m.astype("<i8").tobytes()))
        return h.hexdigest()

    def permutes(self, label: str) -> bool:
        return self.maps.get(label) is not None

    def donors(self) -> set[str]:
        """Labels of the models whose rows fills read."""
        return {m for f in self.fills for m, _ in f.rows} | {f.model for f in self.fills if f.model}


def build_reindex(config: MergeConfig, reference: Checkpoint, finetuned: list[Checkpoint],
                  tokenizer_from: Path | None) -> Reindex | None:
    """The output vocabulary and each model's row map, from the tokenizer.json files and headers.

    Args:
        tokenizer_from: the folder of a model or folder named as the tokenizer source.

    Raises:
        CheckpointError: a needed tokenizer.json is missing or unreadable.
        ConfigError, MismatchError: a token entry that cannot be filled, vocabulary tensors that disagree.
    """
    if not config.reindexes:
        return None
    source, token_cfg, pad_to = config.tokenizer_settings()
    setting = "tokenizer.source" if config.tokenizer is not None else "tokenizer_source"
    models = _merge_inputs(config, reference, finetuned)
    names = frozenset(n for n, info in reference.tensors.items() if is_vocabulary_tensor(n, info.shape))
    if not names:
        raise ConfigError(f"{setting}: {reference.label} has no embedding or output-head tensor (embed_tokens, "
                          f"lm_head, ...) whose rows are tokens; leave {setting} out")
    for ckpt in models.values():
        ckpt.fetch_side_files(COPIED_FILES)  # a Hub repo's tokenizer files
    if not (reference.folder / TOKENIZER_JSON).is_file() and not token_cfg and not pad_to and \
            _one_tokenizer(reference, models.values(), tokenizer_from if source not in ("base", "union") else None, names):
        # e.g. sentencepiece-only repos (tokenizer.model) sharing one tokenizer: the rows already line up
        log.info("%s: every model has the base's tokenizer files (or none): no rows to re-index", setting)
        return None
    base = read_vocabulary(reference.folder, needed_for=setting)
    base_limit = _token_limit(reference, names)
    usable = {reference.label: _below(base.ids, base_limit)}
    vocabs = {reference.label: base}
    for ckpt in models.values():
        if ckpt.label not in usable:
            vocab = _model_vocabulary(ckpt, reference, names, base, setting)
            vocabs[ckpt.label] = vocab
            usable[ckpt.label] = _below(vocab.ids, _token_limit(ckpt, names))

    from_base = source in ("base", "union")
    source_vocab = base if from_base else read_vocabulary(tokenizer_from, needed_for=setting)
    out = dict(usable[reference.label]) if from_base else dict(source_vocab.ids)
    data, config_data = None, None
    if from_base and len(out) < len(base.ids):  # tokens past the base's rows leave its tokenizer too, as in mergekit
        data = _strip(base, base_limit)
    if source == "union":
        new = _union_additions(out, list(models.values()), vocabs, usable)
        if new:  # else the base's files are the output's, copied as they are
            data = _with_added(data or base.data, new)
            config_data = _config_with_added(reference.folder, new)
    extra = [{"id": len(out) + i, "content": tok, **PLAIN_ADDED_TOKEN} for i, tok in
             enumerate(t for t in token_cfg if t not in out)]
    if extra:  # tokenizer.tokens entries become tokens of the output, as mergekit adds them
        out.update({e["content"]: e["id"] for e in extra})
        data = _with_added(data or source_vocab.data, extra)
        config_data = _config_with_added(source_vocab.path.parent, extra, config_data)
    order = sorted(out, key=out.__getitem__)
    if [out[t] for t in order] != list(range(len(order))):
        raise CheckpointError(source_vocab.path, f"token ids are not 0..{len(order) - 1} without gaps; {setting} "
                              "needs a vocabulary whose ids number the embedding rows")
    rows = len(order) if not pad_to else -(-len(order) // pad_to) * pad_to
    maps, fills = _row_maps(config, reference, models, usable, order, rows, token_cfg)
    files = {name: d for name, d in ((TOKENIZER_JSON, data), (TOKENIZER_CONFIG, config_data)) if d is not None}
    return Reindex(rows=rows, tokens=len(order), tensors=names, maps=maps, fills=tuple(fills), files=files,
                   mergekit=config.semantics == "mergekit", compute_dtype=config.dtype)


def _one_tokenizer(reference: Checkpoint, models, source: Path | None, names: frozenset[str]) -> bool:
    """Whether every model (and a named source folder) has the base's tokenizer files, byte for byte,
    or none, and the base's vocabulary rows: then token ids already number the same rows everywhere."""
    def files(folder: Path) -> list[bytes | None]:
        return [(folder / n).read_bytes() if (folder / n).is_file() else None for n in TOKENIZER_MARKERS]

    base = files(reference.folder)
    folders = [c.folder for c in models] + ([source] if source is not None else [])
    if any(files(f) not in (base, [None] * len(base)) for f in folders):
        return False
    return all(n in c.tensors and c.tensors[n].shape == reference.tensors[n].shape for c in models for n in names)


def _merge_inputs(config: MergeConfig, reference: Checkpoint, finetuned: list[Checkpoint]) -> dict[str, Checkpoint]:
    """{config name: checkpoint} in mergekit's order of a tensor's inputs: the listed models, then
    the base when it is not listed."""
    by_source = {spec.source: c for spec, c in zip(config.finetunes(), finetuned)}
    out: dict[str, Checkpoint] = {}
    for spec in config.models:
        ckpt = by_source.get(spec.source, reference)  # not a fine-tune: the base, listed among the models
        if all(c is not ckpt for c in out.values()):
            out[spec.source] = ckpt
    if config.base is not None and all(c is not reference for c in out.values()):
        out[config.base] = reference
    return out


def _token_limit(ckpt: Checkpoint, names: frozenset[str]) -> int:
    """How many token rows a model has: its vocabulary tensors' rows, and no more than config.json's vocab_size."""
    rows = {ckpt.tensors[n].rows for n in names if n in ckpt.tensors}
    if len(rows) > 1:
        raise MismatchError([f"{ckpt.label}: vocabulary tensors {sorted(names)} have different row counts {sorted(rows)}"])
    limit = rows.pop() if rows else 0
    cfg_path = ckpt.folder / "config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path, MAX_TOKENIZER_BYTES, "not a valid config.json")
        size = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if type(size) is int and 0 < size < limit:
            limit = size
    return limit


def _below(ids: dict[str, int], limit: int) -> dict[str, int]:
    return {t: i for t, i in ids.items() if i < limit}


def _model_vocabulary(ckpt: Checkpoint, reference: Checkpoint, names: frozenset[str], base: Vocabulary,
                      setting: str) -> Vocabulary:
    """A model's vocabulary. A model folder whose vocabulary tensors have the base's rows and that has
    no tokenizer files at all (a fine-tune saved without its tokenizer, a LoRA adapter), as mergekit
    assumes, or no tokenizer.json but the base's very files (an older repo's tokenizer.model), has
    the base's; any other model needs its tokenizer.json."""
    folder = ckpt.folder
    has_tokenizer = any((folder / name).is_file() for name in COPIED_FILES if name.startswith(("tokenizer", "vocab")))
    same_rows = all(ckpt.tensors[n].rows == reference.tensors[n].rows for n in names if n in ckpt.tensors)
    own = [n for n in TOKENIZER_MARKERS if (folder / n).is_file()]
    base_files = own and TOKENIZER_JSON not in own and all(
        (reference.folder / n).is_file() and (folder / n).read_bytes() == (reference.folder / n).read_bytes() for n in own)
    if same_rows and (not has_tokenizer or base_files):
        log.info("%s: %s; its rows are taken to follow the base's vocabulary", ckpt.label,
                 "the base's tokenizer files" if has_tokenizer else "no tokenizer files")
        return base
    return read_vocabulary(folder, needed_for=setting)


def _strip(vocab: Vocabulary, limit: int) -> dict:
    """The tokenizer without its tokens at ids >= limit (rows the model does not have)."""
    data = copy.deepcopy(vocab.data)
    data["added_tokens"] = [e for e in data.get("added_tokens") or [] if e["id"] < limit]
    model = data["model"]
    if isinstance(model["vocab"], list):
        model["vocab"] = model["vocab"][:limit]
        return data
    dropped = {t for t, i in model["vocab"].items() if i >= limit}
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < limit}
    if isinstance(model.get("merges"), list):  # BPE: merges that build a dropped token go too
        model["merges"] = [m for m in model["merges"] if not dropped & set(m.split(" ") if isinstance(m, str) else m)]
    return data


def _union_additions(out: dict[str, int], models: list[Checkpoint], vocabs: dict[str, Vocabulary],
                     usable: dict[str, dict[str, int]]) -> list[dict]:
    """Appends to `out` the tokens of the union the base lacks; returns their added_tokens entries."""
    added: dict[str, dict] = {}  # every model's added tokens; the first model's flags win, as in mergekit
    for ckpt in models:
        for content, entry in vocabs[ckpt.label].added.items():
            if content in usable[ckpt.label]:  # below the model's rows
                added.setdefault(content, entry)
    new: list[dict] = []
    for ckpt in models:  # ordinary vocabulary tokens first
        for tok, _ in sorted(usable[ckpt.label].items(), key=lambda kv: kv[1]):
            if tok not in out and tok not in added:
                out[tok] = len(out)
                new.append({"id": out[tok], "content": tok, **PLAIN_ADDED_TOKEN})
    for content, entry in added.items():
        if content not in out:
            out[content] = len(out)
            new.append({**entry, "id": out[content]})
    return new


def _with_added(data: dict, entries: list[dict]) -> dict:
    data = copy.deepcopy(data)
    data["added_tokens"] = list(data.get("added_tokens") or []) + entries
    return data


def _config_with_added(folder: Path, entries: list[dict], data: dict | None = None) -> dict | None:
    """tokenizer_config.json with the new tokens in its added_tokens_decoder (when it has one), so
    transformers sees the same ids from both files."""
    path = folder / TOKENIZER_CONFIG
    if data is None:
        if not entries or not path.is_file():
            return None
        data = read_json(path, MAX_TOKENIZER_BYTES, "not a valid tokenizer_config.json")
    if not isinstance(data, dict) or not isinstance(data.get("added_tokens_decoder"), dict):
        return None
    data = copy.deepcopy(data)
    for e in entries:
        data["added_tokens_decoder"][str(e["id"])] = {k: e[k] for k in ("content", *PLAIN_ADDED_TOKEN) if k in e}
    return data


def _row_maps(config: MergeConfig, reference: Checkpoint, models: dict[str, Checkpoint],
              usable: dict[str, dict[str, int]], order: list[str], rows: int,
              token_cfg: Mapping[str, Any]) -> tuple[dict[str, np.ndarray | None], list[Fill]]:
    """Each model's map from output rows to its own rows or fills (see the module docstring)."""
    labels = [c.label for c in models.values()]
    own = {label: np.array([usable[label].get(t, -1) for t in order] + [-1] * (rows - len(order)), dtype=np.int64)
           for label in labels}
    maps = {label: own[label].copy() for label in labels}
    base = reference.label if config.base is not None else None
    fills: list[Fill] = []
    lacking = np.zeros(len(order), dtype=bool)
    for label in labels:
        lacking |= own[label][: len(order)] < 0
    forced = {t for t, e in token_cfg.items() if (e or {}).get("force")}
    for j in np.flatnonzero(lacking).tolist() + [j for j, t in enumerate(order) if t in forced and not lacking[j]]:
        token = order[j]
        present = [label for label in labels if own[label][j] >= 0]
        if token in token_cfg:
            fill = _configured_fill(token, token_cfg[token], present, labels, own, usable, models, j)
        elif len(present) == 1:
            fill = Fill("copy", ((present[0], int(own[present[0]][j])),))
        elif not present:
            log.warning("token %r is in no model's vocabulary: its rows are zeros", token)
            fill = Fill("zero")
        elif base in present:
            fill = Fill("copy", ((base, int(own[base][j])),))
        else:
            fill = Fill("mean", tuple((label, int(own[label][j])) for label in present))
        code = -1 - len(fills)
        fills.append(fill)
        for label in labels:
            if token in forced or own[label][j] < 0:
                maps[label][j] = code
    for label in labels:
        if rows > len(order):  # padding rows: the mean of the model's own re-indexed token rows
            maps[label][len(order):] = -1 - len(fills)
            fills.append(Fill("pad", model=label))
        if len(maps[label]) == _model_rows(models, label) and np.array_equal(maps[label], np.arange(rows)):
            maps[label] = None  # the model's rows as they are: read without a copy
    return maps, fills


def _model_rows(models: dict[str, Checkpoint], label: str) -> int:
    """The row count of a model's vocabulary tensors."""
    ckpt = next(c for c in models.values() if c.label == label)
    return next((info.rows for n, info in ckpt.tensors.items() if is_vocabulary_tensor(n, info.shape)), -1)


def _configured_fill(token: str, entry: Mapping[str, Any] | None, present: list[str], labels: list[str],
                     own: dict[str, np.ndarray], usable: dict[str, dict[str, int]], models: dict[str, Checkpoint],
                     j: int) -> Fill:
    """The fill a tokenizer.tokens entry asks for (mergekit's TokenEmbeddingConfig)."""
    where = f"tokenizer.tokens[{token!r}]"
    source = (entry or {}).get("source")
    if source is None:
        missing = [label for label in labels if label not in present]
        raise ConfigError(f"{where}: {', '.join(missing) or 'every model (force)'} needs a row for it; give a source "
                          "(a model, {kind: zero} or {kind: model_token, model, token})")
    if isinstance(source, Mapping) and source.get("kind") == "zero":
        return Fill("zero")
    model = source.get("model") if isinstance(source, Mapping) else source
    ckpt = models.get(str(model))
    if ckpt is None:
        raise ConfigError(f"{where}.source: {model!r} is not the base nor one of the models")
    if not isinstance(source, Mapping):  # a model: its own row of this token
        if own[ckpt.label][j] < 0:
            raise ConfigError(f"{where}.source: {model} does not have {token!r}; take another token's row with "
                              "{kind: model_token, model, token}")
        return Fill("copy", ((ckpt.label, int(own[ckpt.label][j])),))
    row = source.get("token_id")
    if row is None:
        row = usable[ckpt.label].get(source["token"])
        if row is None:
            raise ConfigError(f"{where}.source.token: {source['token']!r} is not in the vocabulary of {model}")
    if row >= _model_rows(models, ckpt.label):
        raise ConfigError(f"{where}.source.token_id: {row} is past the {_model_rows(models, ckpt.label)} rows of {model}")
    return Fill("copy", ((ckpt.label, int(row)),))


class RowGather:
    """Reads rows of one vocabulary tensor of the models through the re-index, one block at a time.

    Rows come in the tensor's gather dtype, which holds every input's dtype exactly (and, with
    mergekit's arithmetic, its compute dtype), so a model's own rows pass through unchanged.
    """

    def __init__(self, reindex: Reindex, name: str, inputs: list[Checkpoint]):
        self.reindex, self.name = reindex, name
        self.by_label = {c.label: c for c in inputs}
        stored = [DTYPES[c.tensors[name].dtype] for c in self.by_label.values()]
        promoted = functools.reduce(torch.promote_types, stored)
        compute = CONFIG_DTYPES[reindex.compute_dtype] if reindex.compute_dtype else None
        # mergekit averages in its dtype (the inputs cast to it); otherwise float64, rounded once
        self.fill_dtype = (compute or promoted) if reindex.mergekit else torch.float64
        self.dtype = torch.promote_types(promoted, compute) if reindex.mergekit and compute else promoted
        self.row_shape = tuple(inputs[0].tensors[name].shape[1:])
        self.pads: dict[str, torch.Tensor] = {}
        self.cache: tuple[tuple[int, int], dict[int, torch.Tensor]] = ((-1, -1), {})  # fill rows of the current block

    def permutes(self, label: str) -> bool:
        return self.reindex.permutes(label)

    def rows(self, label: str, r0: int, r1: int) -> torch.Tensor:
        """Output rows [r0, r1) of model `label`'s tensor, a new tensor in the gather dtype."""
        codes = self.reindex.maps[label][r0:r1]
        ckpt = self.by_label[label]
        out = torch.empty((r1 - r0, *self.row_shape), dtype=self.dtype)
        # own rows in runs of consecutive source rows: each run is one slice of the mapped file
        own = codes >= 0
        breaks = (codes[1:] != codes[:-1] + 1) | ~own[:-1] | ~own[1:]  # between rows i and i+1
        starts = np.flatnonzero(own & np.r_[True, breaks])
        ends = np.flatnonzero(own & np.r_[breaks, True]) + 1
        for s, e in zip(starts.tolist(), ends.tolist()):
            out[s:e] = ckpt.view(self.name, int(codes[s]), int(codes[e - 1]) + 1)
        if (codes < 0).any():
            if self.cache[0] != (r0, r1):  # fills are shared by the models lacking a token: once per block
                self.cache = ((r0, r1), {})
            for code in np.unique(codes[codes < 0]).tolist():
                if code not in self.cache[1]:
                    self.cache[1][code] = self._fill(self.reindex.fills[-1 - code])
                out[torch.from_numpy(np.flatnonzero(codes == code))] = self.cache[1][code].to(self.dtype)
        return out

    def _row(self, label: str, row: int) -> torch.Tensor:
        return self.by_label[label].view(self.name, row, row + 1)[0]

    def _fill(self, fill: Fill) -> torch.Tensor:
        if fill.kind == "zero":
            return torch.zeros(self.row_shape, dtype=self.dtype)
        if fill.kind == "copy":
            return self._row(*fill.rows[0])
        if fill.kind == "pad":
            if fill.model not in self.pads:
                self.pads[fill.model] = self._pad(fill.model)
            return self.pads[fill.model]
        rows = [self._row(label, r) for label, r in fill.rows]
        if not self.reindex.mergekit:
            return (sum(r.double() for r in rows) / len(rows)).to(self.dtype)
        acc = torch.zeros(self.row_shape, dtype=self.fill_dtype)  # mergekit: from zeros, in model order, then ÷
        for r in rows:
            acc = acc + r.to(self.fill_dtype)
        acc /= len(rows)
        return acc

    def _pad(self, label: str) -> torch.Tensor:
        """The mean of a model's re-indexed token rows (mergekit: torch.mean over them, in its dtype)."""
        n = self.reindex.tokens
        if self.reindex.mergekit:  # mergekit holds the whole tensor too
            return torch.mean(self.rows(label, 0, n).to(self.fill_dtype), dim=0)
        total = torch.zeros(self.row_shape, dtype=torch.float64)
        step = max(1, (16 << 20) // max(1, 8 * int(np.prod(self.row_shape, dtype=np.int64))))
        for r0 in range(0, n, step):
            total += self.rows(label, r0, min(n, r0 + step)).double().sum(dim=0)
        return (total / n).to(self.dtype)
