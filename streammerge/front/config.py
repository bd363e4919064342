"""The merge configuration: one frozen, validated object whatever the front end.

A mergekit-style YAML file, CLI flags and a Python call all become a `MergeConfig`. `validate()`
collects every problem and raises once, naming each key.

Parameter values take mergekit's forms: a scalar; a list of numbers (a gradient, interpolated as
mergekit does at t = layer / (n_layers - 1), and t = 0 outside the layers: embeddings, final norm,
lm_head); or one or a list of `{filter, value}` entries (first match wins; an entry without `filter`,
or with `filter: "*"`, is the fallback). A filter is a substring of the tensor name, as in mergekit;
outside `semantics: mergekit`, a filter with `*`, `?` or `[` is a glob on the whole name instead
(mergekit would never match it). Precedence, as mergekit resolves it: a model's own parameters, then
the slice's, then the top-level `parameters`; a filter list that matches nothing falls through.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from streammerge.constants import (
    LORA_DROP_MODES,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
)
from streammerge.errors import ConfigError
from streammerge.methods import Param, registry
from streammerge.methods.ops import MergeOptions
from streammerge.methods.task_vectors import TaskVectorMethod

log = logging.getLogger(__name__)

SEMANTICS = ("default", "mergekit", "peft", "fusionbench")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,  # out_dtype only: the fine-grained FP8 layout (docs/quantized.md)
}
FP8_OUT = ("float8_e4m3fn",)

# What every method reads, from the registry (methods/): numeric per-tensor parameters with their
# defaults (filters and gradients allowed), and the options of a whole merge (top level only).
_DECLARED = [p for m in registry.all_methods() for p in m.params]
TENSOR_PARAMS = {p.name: p.default for p in _DECLARED if p.per_tensor}
OPTION_PARAMS = {p.name: p for p in _DECLARED if not p.per_tensor}
# Which methods read each parameter: one given to another method is ignored with a warning. mergekit
# configs carry weight/density/lambda for every method, which it ignores without a word, as we do.
METHOD_PARAMS = {name: tuple(m.name for m in registry.all_methods() if any(p.name == name for p in m.params))
                 for name in {p.name for p in _DECLARED} - {"weight", "density", "lambda"}}
# mergekit parameters no registered method reads: named as such in the error.
MERGEKIT_PARAMS = {"lambda_", "k", "select_topk", "filter_wise", "rescale_norm"}
# Top-level mergekit keys we don't support yet.
UNSUPPORTED_KEYS = {"chat_template": "chat_template", "modules": "modules"}
KNOWN_METHOD_ALIASES = {"average": "linear", "dare_average": "dare_linear"}


def _param(name: str, method: str | None = None) -> Param:
    """The declaration of parameter `name`: the method's own where it has one (ram's epsilon is not
    della's), else the first method's that reads it."""
    declared = registry.get(method) if method else None
    own = [p for p in declared.params if p.name == name] if declared is not None else []
    return own[0] if own else next(p for p in _DECLARED if p.name == name)


ParamValue = Any  # float | bool | str | list[float] | list[{filter, value}]


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model: where it is and its own parameters (weight, density, ...)."""

    source: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One input of a mergekit output slice: layers [start, end) of a model (None: all its layers)."""

    source: str
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """A mergekit output slice: its output layers merge (or, for passthrough, copy) its sources'
    corresponding layers, in order; the slices stack (plan.py, `stacked_tensors`)."""

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    base: str | None = None  # the slice's base_model, which replaces the top-level one


@dataclass(frozen=True)
class MergeConfig:
    """A whole merge, as the user asked for it.

    Example:
        >>> cfg = MergeConfig(method="ties", base="base/", models=(ModelSpec("ft1/", {"density": 0.5}),),
        ...                   parameters={"lambda": 1.0}, seed=0)
        >>> cfg.validate()
    """

    method: str
    models: tuple[ModelSpec, ...]
    base: str | None = None
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    semantics: str = "default"
    seed: int = 0
    dtype: str | None = None  # mergekit's compute dtype; also the output dtype unless out_dtype is set
    out_dtype: str | None = None
    include: tuple[str, ...] = ()  # glob patterns of tensors to merge (default: all)
    exclude: tuple[str, ...] = ()  # glob patterns of tensors copied from the base
    # Embedding rows re-indexed by token (vocab.py): "base", "union", a model's source or a folder;
    # None copies the base's tokenizer files and leaves rows as they are.
    tokenizer_source: str | None = None
    # mergekit's `tokenizer:` block: {source (default union), tokens: {token: {source, force}}, pad_to_multiple_of}
    tokenizer: Mapping[str, Any] | None = None
    vocab: str = "error"  # differing vocabulary sizes: error | truncate_to_base | truncate_to_smallest
    base_dir: str | None = None  # relative model paths resolve against this (the YAML's folder)
    # A mergekit `slices:` config equivalent to `models:` (one slice, every source the same whole
    # layer range): that slice's own `parameters`, and its layer range, checked against the models.
    slice_parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None
    # Every mergekit `slices:` config, as written. Unless it is a whole-model slice (above) that
    # covers the models' layers, the output layers are stacked from these (plan.py).
    slices: tuple[OutputSlice, ...] = ()
    # A mergekit-multi recipe's named stages (front/recipe.Recipe), which `models`, `base_model` and
    # slice sources may name; None for a plain merge.
    recipe: Any = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> MergeConfig:
        """Reads a mergekit-style YAML file; relative model paths resolve against its folder. A file of
        several YAML documents is a mergekit-multi recipe (docs/recipes.md): the final merge, carrying
        the named stages in `recipe`; `overrides` then apply to every stage."""
        path = Path(path)
        text = read_config_text(path)
        docs = load_yaml_all(text, str(path))
        if len(docs) > 1:  # a mergekit-multi recipe: named stages and a final merge (front/recipe.py)
            from streammerge.front.recipe import recipe_config

            cfg = recipe_config(docs, path)  # overrides (semantics=..., seed=...) apply to every stage, as the CLI's flags
            return replace(cfg, **overrides, recipe=cfg.recipe.map(lambda c: replace(c, **overrides))) if overrides else cfg
        data = docs[0] if docs else None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping with merge_method, models, ...")
        cfg = cls.from_dict(data, base_dir=str(path.parent))
        return replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | None = None) -> MergeConfig:
        """Builds a config from a mergekit-style mapping (the parsed YAML)."""
        # Only plain data (no binary, dates, sets, non-string keys): later steps (the manifest's JSON,
        # the fingerprint) assume it; then the type of every key that must be a string or a list.
        problems = _plain_problems(data, "config")
        if problems:
            raise ConfigError(problems)
        for key in ("merge_method", "base_model", "dtype", "out_dtype", "semantics", "tokenizer_source", "vocab", "name"):
            if data.get(key) is not None and not isinstance(data[key], str):
                problems.append(f"{key}: must be a string, got {_short(data[key])}")
        for key in ("include", "exclude"):
            value = data.get(key)
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)):
                problems.append(f"{key}: must be a glob pattern or a list of them, got {_short(value)}")
        if data.get("tokenizer") is not None and not isinstance(data["tokenizer"], dict):
            problems.append(f"tokenizer: must be a mapping with source, tokens and pad_to_multiple_of, got {_short(data['tokenizer'])}")
        if problems:
            raise ConfigError(problems)
        for key, what in UNSUPPORTED_KEYS.items():
            if key in data:
                problems.append(f"'{key}': mergekit {what} is not supported by streammerge yet")
        known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "semantics",
                 "seed", "include", "exclude", "tokenizer_source", "tokenizer", "name", "vocab"}
        for key in data:
            if key not in known and key not in UNSUPPORTED_KEYS:
                problems.append(f"unknown top-level key '{key}'")
        models: list[ModelSpec] = []
        raw_models = data.get("models") or []
        if not isinstance(raw_models, list):
            problems.append("'models' must be a list of {model: ..., parameters: {...}}")
            raw_models = []
        for i, entry in enumerate(raw_models):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                problems.append(f"models[{i}]: expected a mapping with a 'model' key")
                continue
            if not isinstance(entry["model"], str):
                problems.append(f"models[{i}].model: must be a path or a Hub repo id, got {_short(entry['model'])}")
                continue
            extra = set(entry) - {"model", "parameters", "revision"}
            if extra:
                problems.append(f"models[{i}]: unknown key(s) {sorted(extra)}")
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                problems.append(f"models[{i}].parameters must be a mapping")
                params = {}
            source = str(entry["model"])
            revision = entry.get("revision")
            if revision is not None:  # a Hub revision: carried in the source as `org/name@revision`, as mergekit writes it
                if not isinstance(revision, str) or not revision.strip():
                    problems.append(f"models[{i}].revision: must be a branch, tag or commit name, got {revision!r}")
                elif "@" in source:
                    problems.append(f"models[{i}].revision: {source!r} already names a revision after '@'; give it once")
                else:
                    source = f"{source}@{revision}"
            models.append(ModelSpec(source, dict(params)))
        slice_params: dict[str, Any] = {}
        layer_range = None
        slice_base = None
        slices: tuple[OutputSlice, ...] = ()
        if data.get("slices") is not None:
            if raw_models:
                problems.append("'models' and 'slices': give one of them, as mergekit requires")
            else:
                slices = _parse_slices(data["slices"], problems)
                models, slice_params, layer_range, slice_base = _models_from_slices(slices)
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append("'parameters' must be a mapping")
            params = {}
        method = str(data.get("merge_method", ""))
        if problems:
            raise ConfigError(problems)

        def patterns(key: str) -> tuple[str, ...]:
            value = data.get(key) or ()
            return (value,) if isinstance(value, str) else tuple(str(v) for v in value)

        base = data.get("base_model") if slice_base is None else slice_base  # mergekit: the slice's base wins
        return cls(
            method=method,
            models=tuple(models),
            base=None if base is None else str(base),
            parameters=dict(params),
            semantics=str(data.get("semantics", "default")),
            seed=data.get("seed", 0),
            dtype=data.get("dtype"),
            out_dtype=data.get("out_dtype"),
            include=patterns("include"),
            exclude=patterns("exclude"),
            tokenizer_source=None if data.get("tokenizer_source") is None else str(data["tokenizer_source"]),
            tokenizer=data.get("tokenizer"),
            vocab=str(data.get("vocab", "error")),
            base_dir=base_dir,
            slice_parameters=slice_params,
            layer_range=layer_range,
            slices=slices,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as a mergekit-style mapping (for the manifest and the model card)."""
        out: dict[str, Any] = {"merge_method": self.method}
        if self.base is not None:
            out["base_model"] = self.base
        stacked = bool(self.slices) and self.layer_range is None  # only the slices say where each layer comes from
        if not stacked:
            out["models"] = [
                {"model": m.source, **({"parameters": dict(m.parameters)} if m.parameters else {})} for m in self.models
            ]
        if self.layer_range is not None:
            out["layer_range"] = list(self.layer_range)
        if stacked:
            out["slices"] = [{"sources": [{"model": s.source, **({"layer_range": list(s.layer_range)} if s.layer_range else {}),
                                           **({"parameters": dict(s.parameters)} if s.parameters else {})} for s in sl.sources],
                              **({"parameters": dict(sl.parameters)} if sl.parameters else {}),
                              **({"base_model": sl.base} if sl.base else {})} for sl in self.slices]
        if self.slice_parameters:
            out["slice_parameters"] = dict(self.slice_parameters)
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tokenizer is not None:
            out["tokenizer"] = dict(self.tokenizer)
        if self.vocab != "error":
            out["vocab"] = self.vocab
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        out["semantics"] = self.semantics
        out["seed"] = self.seed
        if self.recipe is not None:
            out["stages"] = self.recipe.to_list()
        return out

    # ---- validation ---------------------------------------------------------------------

    @property
    def method_name(self) -> str:
        return KNOWN_METHOD_ALIASES.get(self.method, self.method)

    def validate(self) -> None:
        """Checks every key and value; raises one ConfigError listing all problems."""
        problems = self._type_problems()
        if problems:  # the checks below assume these types
            raise ConfigError(problems)
        method = registry.get(self.method_name)
        if method is None:
            problems.append(f"merge_method: unknown method {self.method!r}; choose one of {', '.join(registry.names())} "
                            "(`streammerge methods` lists them)")
        elif self.semantics in SEMANTICS and self.semantics not in method.semantics:
            problems.append(f"semantics: {self.semantics} has no {self.method_name} method; use "
                            f"{' or '.join(method.semantics)}")
        if (method is not None and all(p.name != "trim_scope" for p in method.params)
                and self.option("trim_scope", "tensor") != "tensor"):
            problems.append(f"parameters.trim_scope: {self.method_name} sparsifies each tensor on its own; remove trim_scope")
        if self.vocab not in ("error", "truncate_to_base", "truncate_to_smallest"):
            problems.append(f"vocab: unknown value {self.vocab!r}; choose error, truncate_to_base or truncate_to_smallest")
        if self.semantics not in SEMANTICS:
            problems.append(f"semantics: unknown value {self.semantics!r}; choose one of {', '.join(SEMANTICS)}")
        if type(self.seed) is not int or not 0 <= self.seed < 2**63:
            problems.append(f"seed: must be a non-negative integer, got {self.seed!r}")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                problems.append(f"{key}: unknown dtype {value!r}; choose one of bfloat16, float16, float32"
                                + (", float8_e4m3fn" if key == "out_dtype" else ""))
            elif key == "dtype" and value in FP8_OUT:
                problems.append(f"dtype: {value} is an output format only; set out_dtype: {value} and dtype to the "
                                "dtype to merge in (e.g. bfloat16)")
        if not self.models:
            problems.append("models: at least one model to merge is needed")
        if (self.semantics == "mergekit" and getattr(method, "mergekit_appends_base", False) and self.base is not None
                and "weight" not in self.parameters and self.finetunes()[-1].source == self.base
                and self.finetunes()[-1] not in self.models):
            problems.append("base_model: mergekit's linear averages the base in as one more model and needs its "
                            "weight: list the base under models with a weight, or set parameters.weight")
        slice_bases = bool(self.slices) and all(s.base for s in self.slices)
        if method is not None and method.base == "required" and self.base is None and not slice_bases:
            problems.append(f"base_model: the {self.method_name} method needs a base model")
        elif method is not None and not isinstance(method, TaskVectorMethod):
            problems += method.check(len(self.finetunes()) if self.base is not None else len(self.models), self.base is not None)
        problems += self._slice_problems()
        if method is not None and not isinstance(method, TaskVectorMethod):
            problems += self._own_method_problems(method)
        problems += self._tokenizer_problems()
        method = self.method_name
        for key, value in self.parameters.items():
            problems += _check_param(f"parameters.{key}", key, value, top_level=True, method=method)
        for key, value in self.slice_parameters.items():
            problems += _check_param(f"slices[0].parameters.{key}", key, value, top_level=True, method=method)
        for i, model in enumerate(self.models):
            for key, value in model.parameters.items():
                problems += _check_param(f"models[{i}].parameters.{key}", key, value, top_level=False, method=method)
        drops = [m.parameters.get("lora_drop") for m in self.models] + [self.parameters.get("lora_drop")]
        if any(d not in (None, "delta") for d in drops) and getattr(registry.get(self.method_name), "sparsify", None) != "dare":
            problems.append("lora_drop: drops a LoRA adapter's factors in place of DARE's drop on its delta; "
                            "it needs merge_method dare_linear or dare_ties")
        if problems:
            raise ConfigError(problems)

    def _type_problems(self) -> list[str]:
        """Each field's type (a config built in Python can hold anything), and plain data in parameters."""
        problems = []
        for key in ("method", "base", "semantics", "dtype", "out_dtype", "tokenizer_source", "vocab", "base_dir"):
            value = getattr(self, key)
            if not (isinstance(value, str) or (value is None and key not in ("method", "semantics", "vocab"))):
                problems.append(f"{'merge_method' if key == 'method' else 'base_model' if key == 'base' else key}: "
                                f"must be a string, got {_short(value)}")
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                problems.append(f"{key}: must be a list of glob patterns, got {_short(value)}")
        if not isinstance(self.models, (tuple, list)) or not all(
                isinstance(m, ModelSpec) and isinstance(m.source, str) and isinstance(m.parameters, Mapping) for m in self.models):
            problems.append(f"models: must be ModelSpec(source: str, parameters: mapping) entries, got {_short(self.models)}")
            return problems
        paths = [("base_model", self.base), ("tokenizer_source", self.tokenizer_source), ("base_dir", self.base_dir)]
        paths += [(f"models[{i}].model", m.source) for i, m in enumerate(self.models)]
        paths += [(f"slices[{i}].sources[{j}].model", src.source) for i, sl in enumerate(self.slices) for j, src in enumerate(sl.sources)]
        paths += [(f"slices[{i}].base_model", sl.base) for i, sl in enumerate(self.slices)]
        for where, path in paths:
            if isinstance(path, str) and "\x00" in path:  # the OS refuses such a path (ValueError, not an OSError)
                problems.append(f"{where}: a path cannot hold a NUL character, got {_short(path)}")
        problems += _plain_problems(self.parameters, "parameters", mapping=True)
        problems += _plain_problems(self.slice_parameters, "slices[0].parameters", mapping=True)
        for i, m in enumerate(self.models):
            problems += _plain_problems(m.parameters, f"models[{i}].parameters", mapping=True)
        if self.tokenizer is not None:
            problems += _plain_problems(self.tokenizer, "tokenizer", mapping=True)
        return problems

    def _slice_problems(self) -> list[str]:
        """Passthrough copies one model per slice (mergekit allows one input); several slices keep
        their parameters in the slices (one slice's are models[i] and slices[0] above)."""
        problems: list[str] = []
        copies = getattr(registry.get(self.method_name), "copies", False)
        if copies:
            for i, out_slice in enumerate(self.slices):
                if len(out_slice.sources) != 1:
                    problems.append(f"slices[{i}].sources: passthrough copies one model per slice, got {len(out_slice.sources)}; "
                                    "merge them with another method, or give each its own slice")
            if not self.slices and len(self.models) != 1:
                problems.append(f"models: passthrough copies one model, got {len(self.models)}; use slices: to stack layers")
            elif not self.slices and self.base is not None and self.finetunes():  # mergekit adds the base as a second input
                problems.append("base_model: passthrough over models: copies one model; remove base_model or list only it")
        if self.reindexes and (copies or (self.slices and self.layer_range is None)):
            problems.append("tokenizer_source: not supported with layer stacking (partial or several slices, passthrough) yet")
        if len(self.slices) < 2:
            return problems
        method = self.method_name
        for i, out_slice in enumerate(self.slices):
            for key, value in out_slice.parameters.items():
                if key in OPTION_PARAMS:  # resolved once for the whole merge
                    problems.append(f"slices[{i}].parameters.{key}: an option of the whole merge; set it in the top-level parameters")
                else:
                    problems += _check_param(f"slices[{i}].parameters.{key}", key, value, top_level=True, method=method)
            for j, src in enumerate(out_slice.sources):
                for key, value in src.parameters.items():
                    problems += _check_param(f"slices[{i}].sources[{j}].parameters.{key}", key, value, top_level=False,
                                             method=method)
        return problems

    def _own_method_problems(self, method) -> list[str]:
        """What mergekit requires of a method of its own (methods/base.py): a slice's base_model among
        its sources, and every required whole-merge parameter (slerp's and nearswap's t) set."""
        problems = []
        base = None if self.base is None else self.model_key(self.base)
        if (method.base == "required" and self.layer_range is not None
                and base not in {self.model_key(m.source) for m in self.models}):
            problems.append(f"slices[0].sources: {method.name}'s base_model must be one of the sources, as mergekit requires")
        for p in method.params:
            if p.default is None and p.per_tensor and not p.per_model and self.parameters.get(p.name) is None \
                    and self.slice_parameters.get(p.name) is None:
                problems.append(f"parameters.{p.name}: {method.name} needs {p.name}, {p.doc}, e.g. {p.name}: 0.5, "
                                "in the top-level (or slice) parameters")
        return problems

    def _tokenizer_problems(self) -> list[str]:
        problems: list[str] = []
        where = "tokenizer_source"
        source = self.tokenizer_source
        if self.tokenizer is not None:
            where = "tokenizer.source"
            if self.tokenizer_source is not None:
                problems.append("'tokenizer' and 'tokenizer_source': give one of them, as mergekit requires")
            if not isinstance(self.tokenizer, Mapping):
                return problems + ["tokenizer: must be a mapping with source, tokens and pad_to_multiple_of"]
            for key in set(self.tokenizer) - {"source", "tokens", "pad_to_multiple_of"}:
                problems.append(f"tokenizer: unknown key {key!r}; mergekit's keys are source, tokens, pad_to_multiple_of")
            source = self.tokenizer.get("source", "union")
            pad = self.tokenizer.get("pad_to_multiple_of")
            if pad is not None and (type(pad) is not int or pad < 1):
                problems.append(f"tokenizer.pad_to_multiple_of: must be a positive integer, got {pad!r}")
            tokens = self.tokenizer.get("tokens") or {}
            if not isinstance(tokens, Mapping):
                problems.append("tokenizer.tokens: must map token strings to {source, force}")
                tokens = {}
            for token, entry in tokens.items():
                problems += _token_problems(f"tokenizer.tokens[{token!r}]", entry, self._model_names())
        if source is None:
            return problems
        if self.vocab != "error":
            problems.append(f"vocab: {self.vocab} and {where}: both say how vocabularies line up; {where} re-indexes "
                            "embedding rows by token (mergekit's rule): remove one of them")
        if not isinstance(source, str) or (source not in ("base", "union") and source not in self._model_names()
                                           and not os.path.isdir(self._path(source))):
            problems.append(f"{where}: {source!r} is neither 'base', 'union', one of the models, nor a local folder")
        return problems

    def _model_names(self) -> set[str]:
        return {m.source for m in self.models} | ({self.base} if self.base else set())

    @property
    def reindexes(self) -> bool:
        """Whether embedding rows are re-indexed by token (tokenizer_source or a tokenizer: block)."""
        return self.tokenizer_source is not None or self.tokenizer is not None

    def tokenizer_settings(self) -> tuple[str | None, Mapping[str, Any], int | None]:
        """(source, tokens, pad_to_multiple_of): from the tokenizer: block (source defaults to union,
        as in mergekit), else from tokenizer_source."""
        if self.tokenizer is None:
            return self.tokenizer_source, {}, None
        return (str(self.tokenizer.get("source", "union")), self.tokenizer.get("tokens") or {},
                self.tokenizer.get("pad_to_multiple_of"))

    # ---- resolution ---------------------------------------------------------------------

    def _path(self, source: str) -> str:
        if "+" in source and not os.path.exists(self._path_of(source)):  # mergekit's model+lora: each side resolved
            model, plus, adapter = source.partition("+")
            return self._path_of(model) + plus + self._path(adapter)
        return self._path_of(source)

    def _path_of(self, source: str) -> str:
        if self.base_dir and not os.path.isabs(source):
            candidate = os.path.join(self.base_dir, source)
            # `dir/name` beside an existing `dir/`: a local path (perhaps mistyped), never a Hub repo id
            if os.path.exists(candidate) or ("/" in source and os.path.isdir(os.path.join(self.base_dir, source.split("/")[0]))):
                return candidate
        return source

    @property
    def base_path(self) -> str | None:
        return None if self.base is None else self._path(self.base)

    def finetunes(self) -> list[ModelSpec]:
        """The models that contribute a task vector (mergekit lets the base appear in `models`).

        For `linear` these are the averaged models; mergekit's linear also averages in a
        `base_model` that is not listed, as the last input.
        """
        if self.base is None:
            return list(self.models)
        base = self.model_key(self.base)  # `./base` and `base` are the same model
        if self.base_is_input():  # averaged like the others, in its listed place
            return list(self.models)
        if getattr(registry.get(self.method_name), "mergekit_appends_base", False):  # linear
            listed = any(self.model_key(m.source) == base for m in self.models)
            # mergekit appends the base to `models:`, not to the sources of a `slices:` config
            append_base = self.semantics == "mergekit" and not listed and not self.slices
            return list(self.models) + ([ModelSpec(self.base)] if append_base else [])
        return [m for m in self.models if self.model_key(m.source) != base]

    def base_is_input(self) -> bool:
        """A method that takes its base_model as one more input (karcher) and lists it under models:
        then every listed model is an input, in order, and no θ₀ is read apart."""
        method = registry.get(self.method_name)
        return (getattr(method, "base_is_input", False) and self.base is not None
                and any(self.model_key(m.source) == self.model_key(self.base) for m in self.models))

    def output_slices(self) -> tuple[OutputSlice, ...]:
        """The slices, or for passthrough over `models:` one slice of its model's every layer."""
        if self.slices or not self.models:
            return self.slices
        return (OutputSlice((SliceSource(self.models[0].source, None, self.models[0].parameters),)),)

    def model_key(self, source: str) -> str:
        """One name per model however it is written (`./base` and `base`), as finetunes() compares them."""
        return os.path.realpath(self._path(source))

    def model_path(self, spec: ModelSpec) -> str:
        return self._path(spec.source)

    def option(self, key: str, default: Any) -> Any:
        """A whole-merge option: the slice's value, else the top level's, else `default`."""
        for params in (self.slice_parameters, self.parameters):
            if params.get(key) is not None:
                value = params[key]
                kind = OPTION_PARAMS[key].kind if key in OPTION_PARAMS else None
                return _as_bool(value) if kind is bool else kind(_number(value)) if kind in (int, float) else value
        return default

    def merge_options(self) -> MergeOptions:
        """The method and the semantics preset, resolved into the options the ops read."""
        method, preset = self.method_name, self.semantics
        rescale = self.option("rescale", True)
        if preset == "mergekit":
            # mergekit's registered defaults (merge_methods/registry.py)
            declared = registry.get(method)
            normalize = self.option("normalize", getattr(declared, "mergekit_normalize", False))
            rescale = self.option("rescale", getattr(declared, "mergekit_rescale", False))
            opts = MergeOptions(
                method=method,
                merge_func="mean" if normalize else "sum",
                normalize=normalize,
                sign_method=self.option("sign_method", "sum"),
                rescale="l1" if rescale else "none",
                dare_scope=self.option("dare_scope", "all"),
                trim_scope=self.option("trim_scope", "tensor"),
                trim_rule="argsort",
                compute_dtype=DTYPES[self.dtype] if self.dtype else None,
                fused_linear=True,
                positive_zeros=False,
            )
            return opts
        if preset == "peft":
            return MergeOptions(
                method=method,
                merge_func="mean",
                normalize=self.option("normalize", getattr(registry.get(method), "combine", None) == "average"),
                sign_method=self.option("sign_method", "sum"),
                weighted_sign=False,
                mean_divisor="count",
                rescale="inverse" if rescale else "none",
                divide_by_density=True,
                dare_scope=self.option("dare_scope", "all"),
                trim_scope=self.option("trim_scope", "tensor"),
            )
        if preset == "fusionbench":
            return MergeOptions(
                method=method,
                merge_func=self.option("merge_func", "sum"),
                normalize=self.option("normalize", getattr(registry.get(method), "combine", None) == "average"),
                sign_method=self.option("sign_method", "sum"),
                zero_sign="majority",
                trim_rule="inclusive",
                rescale="inverse" if rescale else "none",
                divide_by_density=True,
                dare_scope=self.option("dare_scope", "all"),
                trim_scope=self.option("trim_scope", "global"),
            )
        merge_func = self.option("merge_func", None)
        if merge_func is None:
            merge_func = "sum" if self.option("normalize", True) is False else "mean"
        if getattr(registry.get(method), "sparsify", None) == "band":  # breadcrumbs: no rescale unless asked; then mergekit's L1 ratio
            rescale_rule = "l1" if self.option("rescale", False) else "none"
        else:  # DARE and DELLA: each kept element ÷ its keep probability
            rescale_rule = "inverse" if rescale else "none"
        return MergeOptions(
            method=method,
            merge_func=merge_func,
            normalize=self.option("normalize", getattr(registry.get(method), "combine", None) == "average"),
            sign_method=self.option("sign_method", "sum"),
            rescale=rescale_rule,
            dare_scope=self.option("dare_scope", "linear"),
            trim_scope=self.option("trim_scope", "tensor"),
        )

    def tensor_param(self, key: str, spec: ModelSpec | None, name: str, layer: int | None, n_layers: int, *,
                     slice_parameters: Mapping[str, ParamValue] | None = None) -> float:
        """A numeric parameter for one tensor of one model: model level, else slice level, else top level,
        else the default (mergekit's `ConfigReader.parameter_sources` order). `slice_parameters`: the
        parameters of the output slice the tensor belongs to (default: the single slice's)."""
        declared = _param(key, self.method_name)
        if not declared.per_tensor:  # a whole-merge option a method reads per tensor
            return self.option(key, declared.default_for(self.semantics))
        # parameters of the whole merge (lambda, t) are resolved once per tensor: a model's own value is never read
        own = spec.parameters if spec is not None and declared.per_model else {}
        glob = self.semantics != "mergekit"
        in_slice = self.slice_parameters if slice_parameters is None else slice_parameters
        # As mergekit: a filter list that matches nothing falls through to the next level.
        for params in (own, in_slice, self.parameters):
            if params.get(key) is not None:
                value = resolve_value(params[key], name, layer, n_layers, default=None, glob=glob)
                if value is not None:
                    return value
        return declared.default_for(self.semantics)

    def selected(self, name: str) -> bool:
        """Whether a tensor is merged (else copied from the base), by the include/exclude globs."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def _short(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: a hostile value must not make a megabyte-long message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_problems(value: Any, where: str, *, mapping: bool = False, depth: int = 0) -> list[str]:
    """Where `value` holds something other than plain data (strings, numbers, booleans, null, lists,
    mappings with string keys): YAML's !!binary, dates, sets, or any object a Python caller passed."""
    if mapping and not isinstance(value, Mapping):
        return [f"{where}: must be a mapping, got {_short(value)}"]
    if depth > MAX_CONFIG_DEPTH:
        return [f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep"]
    if value is None or isinstance(value, (str, bool, int, float)):
        return []
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _plain_problems(v, f"{where}[{i}]", depth=depth + 1)]
    if isinstance(value, Mapping):
        problems = []
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(f"{where}: key {_short(k)} is not a string")
            else:
                problems += _plain_problems(v, f"{where}.{k}" if where != "config" else k, depth=depth + 1)
        return problems
    kind = {bytes: "binary data (!!binary)", set: "a set (!!set)"}.get(type(value)) or (
        "a date" if type(value).__name__ in ("date", "datetime") else f"a {type(value).__name__}")
    return [f"{where}: {kind} is not a config value; use numbers, strings, lists and mappings"]


def read_config_text(path: Path) -> str:
    """A config file's text: a regular file, at most MAX_CONFIG_BYTES (+1 read, for load_yaml to
    refuse), UTF-8; ConfigError naming the file otherwise."""
    try:
        if not path.is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"{path}: cannot read config: {'not a regular file' if path.exists() else 'no such file'}")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text") from None


def load_yaml(text: str, where: str) -> Any:
    """Parses YAML safely and within bounds: at most MAX_CONFIG_BYTES, MAX_CONFIG_NODES values with
    every alias expanded, MAX_CONFIG_DEPTH levels, no recursive alias. The node graph is measured
    before any Python object is built, so an alias bomb (a few lines that expand to billions of
    values) is refused at once instead of expanding in validation, the fingerprint or the manifest.

    Raises:
        ConfigError: "<where>: ..." naming what is wrong.
    """
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; a merge config is a few kB")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, where, {}, set(), 1)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    except (ValueError, TypeError, OverflowError) as e:  # a value the YAML constructor cannot build (a 5000-digit int)
        raise ConfigError(f"{where}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        loader.dispose()


def load_yaml_all(text: str, where: str) -> list[Any]:
    """The documents of a YAML stream (`---` between them), each parsed within `load_yaml`'s bounds;
    empty documents (a trailing `---`) are left out."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; a merge config is a few kB")
    loader = yaml.SafeLoader(text)
    docs: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _measure(node, where, {}, set(), 1)
            docs.append(loader.construct_document(node))
            if len(docs) > MAX_RECIPE_STAGES:
                raise ConfigError(f"{where}: more than {MAX_RECIPE_STAGES} documents; a recipe has a few stages")
        return [d for d in docs if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{where}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        loader.dispose()


MAX_RECIPE_STAGES = 64


def _measure(node: Any, where: str, seen: dict[int, tuple[int, int]], open_nodes: set[int], depth: int) -> tuple[int, int]:
    """(values under `node` with aliases expanded, its nesting height), memoized per node: linear time
    however often an alias repeats a node. `depth`: the node's own nesting level."""
    import yaml

    if id(node) in open_nodes:
        raise ConfigError(f"{where}: a recursive alias (an anchor used inside itself)")
    size, height = seen.get(id(node), (0, 0))
    if not size:
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        measured = [_measure(c, where, seen, open_nodes, depth + 1) for c in children]
        open_nodes.discard(id(node))
        size, height = 1 + sum(m[0] for m in measured), 1 + max((m[1] for m in measured), default=0)
        seen[id(node)] = (size, height)
    if depth - 1 + height > MAX_CONFIG_DEPTH:  # a deep node reached again, deeper
        raise ConfigError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep")
    if size > MAX_CONFIG_NODES:
        raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values once its aliases are expanded "
                          "(an alias bomb?); a merge config has a few dozen")
    return size, height


def _token_problems(where: str, entry: Any, models: set[str]) -> list[str]:
    """One entry of tokenizer.tokens: {source: model | {kind: zero} | {kind: model_token, model,
    token_id | token}, force: bool}, as mergekit's TokenEmbeddingConfig."""
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping) or set(entry) - {"source", "force"}:
        return [f"{where}: expected a mapping with source and force"]
    problems = []
    if not isinstance(entry.get("force", False), bool):
        problems.append(f"{where}.force: must be true or false, got {entry['force']!r}")
    source = entry.get("source")
    if isinstance(source, Mapping):
        kind = source.get("kind")
        if kind == "zero" and set(source) == {"kind"}:
            return problems
        if kind != "model_token" or set(source) - {"kind", "model", "token_id", "token"}:
            expected = "a model, {kind: zero} or {kind: model_token, model, token_id or token}"
            return [*problems, f"{where}.source: expected {expected}, got {dict(source)!r}"]
        if ("token_id" in source) == ("token" in source):
            problems.append(f"{where}.source: give exactly one of token_id and token")
        elif "token_id" in source and (type(source["token_id"]) is not int or source["token_id"] < 0):
            problems.append(f"{where}.source.token_id: must be a non-negative integer, got {source['token_id']!r}")
        source = source.get("model")
    if source is not None and str(source) not in models:
        problems.append(f"{where}.source: {source!r} is not the base nor one of the models")
    return problems


def _check_param(where: str, key: str, value: Any, *, top_level: bool, method: str = "") -> list[str]:
    if key in TENSOR_PARAMS:
        # mergekit ignores these silently; a config written for it must still run, so say it, don't fail.
        if key in METHOD_PARAMS and method not in METHOD_PARAMS[key]:
            log.warning("%s: ignored: '%s' is a parameter of %s; the %s method does not use it",
                        where, key, " and ".join(METHOD_PARAMS[key]), method)
            return []
        if not _param(key, method).per_model and not top_level:
            log.warning("%s: ignored, as mergekit does: '%s' applies to the whole merge; set it in the top-level parameters", where, key)
            return []
        try:
            samples = _numbers_in(value)
        except (TypeError, ValueError) as e:
            return [f"{where}: {e}"]
        declared = _param(key, method)
        bad = next((p for p in map(declared.problem, samples) if p), None)
        return [f"{where}: {bad}"] if bad else []
    if key in OPTION_PARAMS:
        if not top_level:
            return [f"{where}: '{key}' is an option of the whole merge; set it in the top-level parameters"]
        if key in METHOD_PARAMS and method not in METHOD_PARAMS[key]:
            log.warning("%s: ignored: '%s' is an option of %s; the %s method does not use it",
                        where, key, " and ".join(METHOD_PARAMS[key]), method)
        declared = _param(key, method)
        if declared.kind is bool:
            try:
                _as_bool(value)
                return []
            except ValueError:
                return [f"{where}: must be true or false, got {value!r}"]
        if declared.kind is str:
            return [] if value in declared.choices else [f"{where}: must be one of {', '.join(declared.choices)}, got {value!r}"]
        try:
            number = _number(value)
        except ValueError as e:
            return [f"{where}: {e}"]
        if declared.kind is int and number != int(number):
            return [f"{where}: must be an integer, got {value!r}"]
        bad = declared.problem(number)
        return [f"{where}: {bad}"] if bad else []
    if key == "lora_drop":  # LoRA adapters only (lora.py): where DARE's drop happens
        return [] if value in LORA_DROP_MODES else [f"{where}: must be one of {', '.join(LORA_DROP_MODES)}, got {value!r}"]
    if key in MERGEKIT_PARAMS:
        return [f"{where}: mergekit parameter '{key}' is not supported by streammerge yet"]
    return [f"{where}: unknown parameter '{key}'"]


_TRUE, _FALSE = {"true", "yes", "on", "t", "y", "1"}, {"false", "no", "off", "f", "n", "0"}


def _as_bool(value: Any) -> bool:
    """A boolean option as mergekit (pydantic) reads it: true/false, 0/1, or 'yes', 'off', ... ."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"not a boolean: {value!r}")


def _number(value: Any) -> float:
    """A scalar as mergekit reads a float: a number, or a numeric string (YAML reads `1e-3` as one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _numbers_in(value: Any) -> list[float]:
    """Every number a parameter value can produce; raises on a malformed value."""
    if isinstance(value, dict):  # a single {filter, value} entry, as mergekit allows
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out: list[float] = []
        for entry in value:
            if "pattern" in entry:
                raise ValueError("filter entries take 'filter', not 'pattern' (mergekit 0.1.5 ignores 'pattern' "
                                 "and applies the entry to every tensor)")
            if "value" not in entry or set(entry) - {"filter", "value"}:
                raise ValueError("each filter entry needs 'value' and optionally 'filter'")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ValueError(f"a filter is a tensor name pattern (a string), got {_short(entry['filter'])}")
            out += _numbers_in(entry["value"])
        return out
    if isinstance(value, list) and value and not any(isinstance(v, (dict, list)) for v in value):
        try:
            return [_number(v) for v in value]
        except ValueError:
            pass
    elif isinstance(value, (bool, int, float)):
        return [_number(value)]
    elif isinstance(value, str):
        try:
            return [_number(value)]
        except ValueError:
            pass
    raise ValueError(f"expected a number, a list of numbers (gradient) or a list of {{filter, value}}, got {value!r}")


def _matches(pattern: str, name: str, glob: bool) -> bool:
    """mergekit: `filter` is a substring of the tensor name, `*` matches all. With `glob`, a pattern
    holding `*`, `?` or `[` is a glob on the whole name (mergekit would never match it)."""
    if pattern == "*":
        return True
    if glob and any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def gradient_position(layer: int | None, n_layers: int) -> float:
    """mergekit's t in [0, 1]: layer / (n_layers - 1), 1 for a single layer.

    Tensors outside the numbered layers (embeddings, final norm, lm_head) take t = 0, the first
    value: mergekit plans its pre- and post-layer weights with a config reader made at t = 0.
    """
    if layer is None:
        return 0.0
    return layer / (n_layers - 1) if n_layers > 1 else 1.0


def resolve_value(
    value: ParamValue, name: str, layer: int | None, n_layers: int, *, default: float | None, glob: bool = True
) -> float | None:
    """A parameter value for tensor `name` in `layer` (None outside numbered layers) of `n_layers`."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        # In order, as mergekit does: the first entry whose filter matches (or that has none) wins.
        for entry in value:
            pattern = entry.get("filter")
            if pattern is None or _matches(str(pattern), name, glob):
                return resolve_value(entry["value"], name, layer, n_layers, default=default, glob=glob)
        return default
    if isinstance(value, list):  # a gradient over the layers, exactly as mergekit's evaluate_setting
        values = [_number(v) for v in value]
        scaled = gradient_position(layer, n_layers) * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return _number(value)


def _parse_slices(slices: Any, problems: list[str]) -> tuple[OutputSlice, ...]:
    """mergekit's `slices:`: a list of output slices, each a list of sources {model, layer_range
    [start, end), parameters}; every source of a slice gives the same number of layers, as mergekit
    requires. Layer counts are checked against the models in plan.py."""
    if not isinstance(slices, list) or not slices:
        problems.append("'slices': expected a list of output slices, each {sources: [{model, layer_range}, ...]}")
        return ()
    out: list[OutputSlice] = []
    for i, out_slice in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(out_slice, dict):
            problems.append(f"{where}: expected a mapping with 'sources'")
            continue
        for key in sorted(set(out_slice) - {"sources", "parameters", "base_model"}):
            what = "residual_weight" if key == "residual_weight" else f"unknown key '{key}'"
            problems.append(f"{where}: {what} is not supported")
        raw = out_slice.get("sources")
        if not isinstance(raw, list) or not raw:
            problems.append(f"{where}.sources: expected a list of {{model, layer_range, parameters}}")
            continue
        sources: list[SliceSource] = []
        for j, src in enumerate(raw):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                problems.append(f"{at}: expected a mapping with 'model' and 'layer_range'")
                continue
            if not isinstance(src["model"], str):
                problems.append(f"{at}.model: must be a path or a Hub repo id, got {_short(src['model'])}")
                continue
            for key in sorted(set(src) - {"model", "layer_range", "parameters"}):
                problems.append(f"{at}: unknown key '{key}'")
            lr = src["layer_range"]
            if not (isinstance(lr, list) and len(lr) == 2 and all(type(v) is int for v in lr)):
                problems.append(f"{at}.layer_range: expected [start, end], got {lr!r}")
                continue
            if not 0 <= lr[0] < lr[1]:
                problems.append(f"{at}.layer_range: {lr} is empty or reversed; layers [start, end) need 0 <= start < end")
                continue
            if any(s.source == str(src["model"]) for s in sources):  # mergekit: "Duplicate merge inputs"
                problems.append(f"{at}: model {str(src['model'])!r} is already a source of this slice; list each model once per slice")
                continue
            params = src.get("parameters") or {}
            if not isinstance(params, dict):
                problems.append(f"{at}.parameters must be a mapping")
                params = {}
            sources.append(SliceSource(str(src["model"]), (lr[0], lr[1]), dict(params)))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            ranges = [list(s.layer_range) for s in sources]
            problems.append(f"{where}: layer ranges {ranges} differ in length; each output layer merges one layer of every "
                            "source, so all sources of a slice need as many layers")
        params = out_slice.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"{where}.parameters must be a mapping")
            params = {}
        base = out_slice.get("base_model")
        if base is not None and not isinstance(base, str):
            problems.append(f"{where}.base_model: must be a path or a Hub repo id, got {_short(base)}")
            base = None
        out.append(OutputSlice(tuple(sources), dict(params), None if base is None else str(base)))
    return tuple(out)


def _models_from_slices(slices: tuple[OutputSlice, ...]) -> tuple[list[ModelSpec], dict, tuple[int, int] | None, str | None]:
    """The `models:` view of a slices config. One slice: its sources with their parameters, its own
    parameters and base, and its layer range when every source takes the same [0, n) (a candidate
    for the whole-model merge, if n is the models' layer count). Several slices: every model they
    read, once, for opening; their parameters stay in the slices."""
    if len(slices) != 1:
        seen: dict[str, ModelSpec] = {}
        for out_slice in slices:
            for name in [s.source for s in out_slice.sources] + ([out_slice.base] if out_slice.base else []):
                seen.setdefault(name, ModelSpec(name))
        return list(seen.values()), {}, None, None
    (only,) = slices
    ranges = {s.layer_range for s in only.sources}
    layer_range = ranges.pop() if len(ranges) == 1 and next(iter(ranges))[0] == 0 else None
    models = [ModelSpec(s.source, dict(s.parameters)) for s in only.sources]
    return models, dict(only.parameters), layer_range, only.base


LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer number of a tensor like `model.layers.7.mlp.up_proj.weight`, else None."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None
