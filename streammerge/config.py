"""The merge configuration: one frozen, validated object whatever the front end.

A mergekit-style YAML file, CLI flags and a Python call all become a `MergeConfig`. `validate()`
collects every problem and raises once, naming each key.

Parameter values take mergekit's forms: a scalar; a list of numbers (a gradient, interpolated as
mergekit does at t = layer / (n_layers - 1), and t = 0 outside the layers: embeddings, final norm,
lm_head); or a list of `{filter, value}` entries (first match wins; an entry without `filter` is the
fallback). A filter with `*`, `?` or `[` is a glob on the tensor name, otherwise a substring.
Model-level parameters take precedence over the top-level `parameters`; a model-level filter list
that matches nothing falls through to the top level, as in mergekit.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from .constants import LORA_DROP_MODES
from .errors import ConfigError, UnsupportedFeatureError
from .ops import METHODS, MergeOptions

SEMANTICS = ("default", "mergekit", "peft", "fusionbench")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Parameters that may vary per model and per tensor (gradients and filters allowed).
TENSOR_PARAMS = {"weight": 1.0, "density": 1.0, "lambda": 1.0, "trim_density": 1.0}
# Options of the whole merge: scalars, top-level `parameters` only.
OPTION_PARAMS = {
    "normalize": (bool,),
    "rescale": (bool,),
    "merge_func": ("mean", "sum", "max"),
    "sign_method": ("sum", "count"),
    "dare_scope": ("all", "linear"),
    "trim_scope": ("tensor", "global"),
    "int8_mask": (bool,),  # accepted for mergekit configs; it changes nothing in the result
}
# mergekit parameters of methods we don't have yet: named in the error.
KNOWN_UNSUPPORTED_PARAMS = {"epsilon", "gamma", "lambda_", "t", "k", "select_topk", "filter_wise", "rescale_norm"}
# Top-level mergekit keys we don't support yet.
UNSUPPORTED_KEYS = {"slices": "slices (layer-range merges)", "chat_template": "chat_template", "modules": "modules"}
KNOWN_METHOD_ALIASES = {"average": "linear", "dare_average": "dare_linear"}
OTHER_MERGEKIT_METHODS = {
    "slerp", "passthrough", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock",
    "nearswap", "nuslerp", "karcher", "sce", "arcee_fusion", "multislerp", "task_arithmetic_sce",
}

ParamValue = Any  # float | bool | str | list[float] | list[{filter, value}]


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model: where it is and its own parameters (weight, density, ...)."""

    source: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)


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
    tokenizer_source: str | None = None  # "base" (default) or one model's source
    vocab: str = "error"  # differing vocabulary sizes: error | truncate_to_base | truncate_to_smallest
    base_dir: str | None = None  # relative model paths resolve against this (the YAML's folder)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> MergeConfig:
        """Reads a mergekit-style YAML file; relative model paths resolve against its folder."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text("utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping with merge_method, models, ...")
        cfg = cls.from_dict(data, base_dir=str(path.parent))
        return replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | None = None) -> MergeConfig:
        """Builds a config from a mergekit-style mapping (the parsed YAML)."""
        problems: list[str] = []
        for key, what in UNSUPPORTED_KEYS.items():
            if key in data:
                problems.append(f"'{key}': mergekit {what} is not supported by streammerge yet")
        known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "semantics",
                 "seed", "include", "exclude", "tokenizer_source", "tokenizer", "name", "vocab"}
        for key in data:
            if key not in known and key not in UNSUPPORTED_KEYS:
                problems.append(f"unknown top-level key '{key}'")
        if "tokenizer" in data:
            problems.append("'tokenizer': mergekit tokenizer settings are not supported yet; use tokenizer_source")
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
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append("'parameters' must be a mapping")
            params = {}
        method = str(data.get("merge_method", ""))
        if problems and KNOWN_METHOD_ALIASES.get(method, method) in OTHER_MERGEKIT_METHODS:  # e.g. slerp + slices
            problems.insert(0, f"merge_method '{method}' is a mergekit method streammerge does not support yet")
        if problems:
            raise ConfigError(problems)

        def patterns(key: str) -> tuple[str, ...]:
            value = data.get(key) or ()
            return (value,) if isinstance(value, str) else tuple(str(v) for v in value)

        base = data.get("base_model")
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
            tokenizer_source=data.get("tokenizer_source"),
            vocab=str(data.get("vocab", "error")),
            base_dir=base_dir,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as a mergekit-style mapping (for the manifest and the model card)."""
        out: dict[str, Any] = {"merge_method": self.method}
        if self.base is not None:
            out["base_model"] = self.base
        out["models"] = [
            {"model": m.source, **({"parameters": dict(m.parameters)} if m.parameters else {})} for m in self.models
        ]
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.vocab != "error":
            out["vocab"] = self.vocab
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        out["semantics"] = self.semantics
        out["seed"] = self.seed
        return out

    # ---- validation ---------------------------------------------------------------------

    @property
    def method_name(self) -> str:
        return KNOWN_METHOD_ALIASES.get(self.method, self.method)

    def validate(self) -> None:
        """Checks every key and value; raises one ConfigError listing all problems."""
        problems: list[str] = []
        if self.method_name in OTHER_MERGEKIT_METHODS:
            raise UnsupportedFeatureError(
                f"merge_method '{self.method}' is a mergekit method streammerge does not support yet; "
                f"supported: {', '.join(sorted(METHODS))}"
            )
        if self.method_name not in METHODS:
            problems.append(f"merge_method: unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        if self.vocab not in ("error", "truncate_to_base", "truncate_to_smallest"):
            problems.append(f"vocab: unknown value {self.vocab!r}; choose error, truncate_to_base or truncate_to_smallest")
        if self.semantics not in SEMANTICS:
            problems.append(f"semantics: unknown value {self.semantics!r}; choose one of {', '.join(SEMANTICS)}")
        if type(self.seed) is not int or not 0 <= self.seed < 2**63:
            problems.append(f"seed: must be a non-negative integer, got {self.seed!r}")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                problems.append(f"{key}: unknown dtype {value!r}; choose one of bfloat16, float16, float32")
        if not self.models:
            problems.append("models: at least one model to merge is needed")
        if (self.semantics == "mergekit" and self.method_name == "linear" and self.base is not None
                and "weight" not in self.parameters and self.finetunes()[-1].source == self.base
                and self.finetunes()[-1] not in self.models):
            problems.append("base_model: mergekit's linear averages the base in as one more model and needs its "
                            "weight: list the base under models with a weight, or set parameters.weight")
        if self.method_name != "linear" and self.method_name in METHODS and self.base is None:
            problems.append(f"base_model: the {self.method_name} method needs a base model")
        if self.tokenizer_source not in (None, "base") and self.tokenizer_source not in {m.source for m in self.models}:
            if self.tokenizer_source == "union":
                problems.append("tokenizer_source: 'union' (merged vocabularies) is not supported yet; use 'base' or a model")
            else:
                problems.append(f"tokenizer_source: {self.tokenizer_source!r} is neither 'base' nor one of the models")
        for key, value in self.parameters.items():
            problems += _check_param(f"parameters.{key}", key, value, top_level=True)
        for i, model in enumerate(self.models):
            if "+" in model.source and not os.path.exists(self._path(model.source)):
                problems.append(f"models[{i}]: 'model+lora' syntax is not supported yet ({model.source!r})")
            for key, value in model.parameters.items():
                problems += _check_param(f"models[{i}].parameters.{key}", key, value, top_level=False)
        drops = [m.parameters.get("lora_drop") for m in self.models] + [self.parameters.get("lora_drop")]
        if any(d not in (None, "delta") for d in drops) and METHODS.get(self.method_name, ("",))[0] != "dare":
            problems.append("lora_drop: drops a LoRA adapter's factors in place of DARE's drop on its delta; "
                            "it needs merge_method dare_linear or dare_ties")
        if problems:
            raise ConfigError(problems)

    # ---- resolution ---------------------------------------------------------------------

    def _path(self, source: str) -> str:
        if self.base_dir and not os.path.isabs(source):
            candidate = os.path.join(self.base_dir, source)
            if os.path.exists(candidate):
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
        base = os.path.realpath(self._path(self.base))  # `./base` and `base` are the same model
        if self.method_name == "linear":
            listed = any(os.path.realpath(self._path(m.source)) == base for m in self.models)
            append_base = self.semantics == "mergekit" and not listed
            return list(self.models) + ([ModelSpec(self.base)] if append_base else [])
        return [m for m in self.models if os.path.realpath(self._path(m.source)) != base]

    def model_path(self, spec: ModelSpec) -> str:
        return self._path(spec.source)

    def option(self, key: str, default: Any) -> Any:
        return self.parameters.get(key, default)

    def merge_options(self) -> MergeOptions:
        """The method and the semantics preset, resolved into the options the ops read."""
        method, preset = self.method_name, self.semantics
        rescale = self.option("rescale", True)
        if preset == "mergekit":
            normalize = self.option("normalize", method in ("ties", "linear"))
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
                normalize=self.option("normalize", method == "linear"),
                sign_method=self.option("sign_method", "sum"),
                weighted_sign=False,
                mean_divisor="count",
                rescale="inverse" if rescale else "none",
                dare_scope=self.option("dare_scope", "all"),
                trim_scope=self.option("trim_scope", "tensor"),
            )
        if preset == "fusionbench":
            return MergeOptions(
                method=method,
                merge_func=self.option("merge_func", "sum"),
                normalize=self.option("normalize", method == "linear"),
                sign_method=self.option("sign_method", "sum"),
                zero_sign="majority",
                trim_rule="inclusive",
                rescale="inverse" if rescale else "none",
                dare_scope=self.option("dare_scope", "all"),
                trim_scope=self.option("trim_scope", "global"),
            )
        merge_func = self.option("merge_func", None)
        if merge_func is None:
            merge_func = "sum" if self.option("normalize", True) is False else "mean"
        return MergeOptions(
            method=method,
            merge_func=merge_func,
            normalize=self.option("normalize", method == "linear"),
            sign_method=self.option("sign_method", "sum"),
            rescale="inverse" if rescale else "none",
            dare_scope=self.option("dare_scope", "linear"),
            trim_scope=self.option("trim_scope", "tensor"),
        )

    def tensor_param(self, key: str, spec: ModelSpec | None, name: str, layer: int | None, n_layers: int) -> float:
        """A numeric parameter for one tensor of one model: model level, else top level, else default."""
        # As mergekit: a model-level filter list that matches nothing falls through to the top level.
        for params in (spec.parameters if spec is not None else {}, self.parameters):
            if params.get(key) is not None:
                value = resolve_value(params[key], name, layer, n_layers, default=None)
                if value is not None:
                    return value
        return TENSOR_PARAMS[key]

    def selected(self, name: str) -> bool:
        """Whether a tensor is merged (else copied from the base), by the include/exclude globs."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def _check_param(where: str, key: str, value: Any, *, top_level: bool) -> list[str]:
    if key in TENSOR_PARAMS:
        try:
            samples = _numbers_in(value)
        except (TypeError, ValueError) as e:
            return [f"{where}: {e}"]
        if key == "density" or key == "trim_density":
            bad = [v for v in samples if not 0 < v <= 1]
            if bad:
                return [f"{where}: density must be in (0, 1], got {bad[0]}"]
        return []
    if key in OPTION_PARAMS:
        if not top_level:
            return [f"{where}: '{key}' is an option of the whole merge; set it in the top-level parameters"]
        allowed = OPTION_PARAMS[key]
        if allowed == (bool,):
            return [] if isinstance(value, bool) else [f"{where}: must be true or false, got {value!r}"]
        return [] if value in allowed else [f"{where}: must be one of {', '.join(allowed)}, got {value!r}"]
    if key == "lora_drop":  # LoRA adapters only (lora.py): where DARE's drop happens
        return [] if value in LORA_DROP_MODES else [f"{where}: must be one of {', '.join(LORA_DROP_MODES)}, got {value!r}"]
    if key in KNOWN_UNSUPPORTED_PARAMS:
        return [f"{where}: mergekit parameter '{key}' is not supported by streammerge yet"]
    return [f"{where}: unknown parameter '{key}'"]


def _numbers_in(value: Any) -> list[float]:
    """Every number a parameter value can produce; raises on a malformed value."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return [float(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, dict) for v in value):
            out: list[float] = []
            for entry in value:
                if "value" not in entry or set(entry) - {"filter", "value"}:
                    raise ValueError("each filter entry needs 'value' and optionally 'filter'")
                out += _numbers_in(entry["value"])
            return out
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
    raise ValueError(f"expected a number, a list of numbers (gradient) or a list of {{filter, value}}, got {value!r}")


def _matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
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
    value: ParamValue, name: str, layer: int | None, n_layers: int, *, default: float | None
) -> float | None:
    """A parameter value for tensor `name` in `layer` (None outside numbered layers) of `n_layers`."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        # In order, as mergekit does: the first entry whose filter matches (or that has none) wins.
        for entry in value:
            pattern = entry.get("filter")
            if not pattern or _matches(str(pattern), name):
                return resolve_value(entry["value"], name, layer, n_layers, default=default)
        return default
    if isinstance(value, list):  # a gradient over the layers, as mergekit interpolates it
        if len(value) == 1:
            return float(value[0])
        pos = gradient_position(layer, n_layers) * (len(value) - 1)
        lo = min(int(math.floor(pos)), len(value) - 2)
        frac = pos - lo
        return float(value[lo]) * (1 - frac) + float(value[lo + 1]) * frac
    return float(value)


LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer number of a tensor like `model.layers.7.mlp.up_proj.weight`, else None."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None
