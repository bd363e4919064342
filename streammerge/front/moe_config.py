"""mergekit-moe's config (`streammerge moe config.yaml out/`), read and checked as mergekit 0.1.5 reads it.

The keys are mergekit's `MoEMergeConfig` (mergekit/moe/config.py): `base_model`, `experts` (each
`source_model`, `positive_prompts`, `negative_prompts`, `noise_scale`, `residual_scale`), `gate_mode`,
`dtype`, `experts_per_token`, `shared_experts`, `architecture`. mergekit (pydantic) ignores other keys
without a word; here each is named in a warning. Its `is_bad_config` refusals are made here too, with
every problem of the file at once, each naming its key.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from streammerge.errors import ConfigError
from streammerge.front.config import DTYPES, load_yaml, read_config_text

log = logging.getLogger(__name__)

# "hidden" and "hidden_last" take the last token's hidden state, "hidden_avg" the mean over tokens
# (mergekit's router.get_gate_params); "uniform_random" is torch.nn.Linear's default initialization.
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")


@dataclass(frozen=True)
class Expert:
    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source_model": self.source_model}
        if self.positive_prompts:
            out["positive_prompts"] = list(self.positive_prompts)
        if self.negative_prompts:
            out["negative_prompts"] = list(self.negative_prompts)
        for key in ("noise_scale", "residual_scale"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class MoEConfig:
    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None
    base_dir: str | None = field(default=None, compare=False)  # relative model paths resolve here (the YAML's folder)
    source_text: str | None = field(default=None, compare=False)  # the YAML as given: mergekit_moe_config.yml

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MoEConfig:
        path = Path(path)
        text = read_config_text(path)
        data = load_yaml(text, str(path))
        return replace(cls.from_dict(data, base_dir=str(path.parent), where=str(path)), source_text=text)

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: str | None = None, where: str = "config") -> MoEConfig:
        """Every problem of the mapping at once (ConfigError), each naming its key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a mergekit-moe config is a YAML mapping with base_model and experts")
        problems: list[str] = []
        for key in data:
            if key not in TOP_KEYS:
                hint = " (mergekit-moe 0.1.5 has no tokenizer options: the base's tokenizer is written)" if "tokenizer" in str(key) else ""
                log.warning("%s: unknown key %r ignored, as mergekit-moe ignores it%s", where, key, hint)
        base = data.get("base_model")
        if not isinstance(base, str) or not base:
            problems.append("base_model: required, the model whose attention, norms and embeddings the MoE keeps "
                            "(a folder or a Hub repo id)")
        experts = _experts(data.get("experts"), "experts", problems, required=True)
        shared = _experts(data.get("shared_experts"), "shared_experts", problems, required=False)
        gate_mode = data.get("gate_mode", "hidden")
        if gate_mode not in GATE_MODES:
            problems.append(f"gate_mode: {gate_mode!r}; choose one of {', '.join(GATE_MODES)}")
        dtype = data.get("dtype")
        if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
            problems.append(f"dtype: {dtype!r}; choose bfloat16, float16 or float32")
        per_token = data.get("experts_per_token", 2)
        if type(per_token) is not int or per_token < 1:
            problems.append(f"experts_per_token: {per_token!r}; must be a whole number >= 1 (mergekit: 'Experts per token must be >= 1')")
        elif experts and len(experts) < per_token:
            problems.append(f"experts_per_token: {per_token} but only {len(experts)} expert(s); list at least as many "
                            "experts as experts_per_token")
        arch = data.get("architecture")
        if arch is not None and not isinstance(arch, str):
            problems.append(f"architecture: {arch!r}; a name such as Mixtral or 'Qwen MoE'")
        if problems:
            raise ConfigError([f"{where}: {p}" for p in problems])
        return cls(base, tuple(experts), gate_mode, dtype, per_token, tuple(shared), arch, base_dir)

    def check(self, allow_all_same: bool = False) -> None:
        """mergekit's `is_bad_config`: prompts where the gates need them, not the same prompts (or the
        same model) for every expert."""
        problems: list[str] = []
        prompted = self.gate_mode not in ("random", "uniform_random")
        if prompted:
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    problems.append(f"experts[{i}] ({e.source_model}): no positive_prompts; gate_mode {self.gate_mode} "
                                    "builds each expert's gate from its prompts (or use gate_mode: random)")
            if not problems and len(self.experts) > 1 and len({(e.positive_prompts, e.negative_prompts) for e in self.experts}) == 1:
                problems.append("experts: every expert has the same positive and negative prompts: the gates would not tell "
                                "them apart; give each expert prompts of what should be routed to it")
        if self.shared_experts:
            with_prompts = {bool(e.positive_prompts) for e in self.shared_experts}
            if len(with_prompts) > 1:
                problems.append("shared_experts: give prompts to every shared expert or to none (mergekit: not a mix)")
        if not allow_all_same and len(self.experts) > 1 and len({e.source_model for e in self.experts}) == 1:
            problems.append("experts: every expert is the same model: the MoE would compute what that model computes, "
                            "with more memory; pass --i-understand-this-is-not-useful-without-training to build it anyway")
        if problems:
            raise ConfigError(problems)

    def path(self, source: str) -> str:
        """A model's path: relative to the YAML's folder when it exists there, else as given (a Hub repo id)."""
        if self.base_dir and not os.path.isabs(source):
            candidate = os.path.join(self.base_dir, source)
            if os.path.exists(candidate):
                return candidate
        return source

    def gated_experts(self) -> list[Expert]:
        """The experts that get a gate vector, in mergekit's order: the routed experts, then the shared
        ones when they have prompts (or the gates are random)."""
        shared = list(self.shared_experts)
        if shared and (shared[0].positive_prompts or self.gate_mode in ("random", "uniform_random")):
            return [*self.experts, *shared]
        return list(self.experts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base_model": self.base_model, "experts": [e.to_dict() for e in self.experts],
                               "gate_mode": self.gate_mode, "experts_per_token": self.experts_per_token}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shared_experts:
            out["shared_experts"] = [e.to_dict() for e in self.shared_experts]
        if self.architecture is not None:
            out["architecture"] = self.architecture
        return out


def _experts(value: Any, key: str, problems: list[str], required: bool) -> list[Expert]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        problems.append(f"{key}: a list of experts, each with source_model (and prompts)")
        return []
    out = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: a mapping with source_model, positive_prompts, ...")
            continue
        for k in entry:
            if k not in EXPERT_KEYS:
                log.warning("%s: unknown key %r ignored, as mergekit-moe ignores it", where, k)
        source = entry.get("source_model")
        if not isinstance(source, str) or not source:
            problems.append(f"{where}.source_model: required, a model folder or Hub repo id")
            continue
        prompts = {}
        for k in ("positive_prompts", "negative_prompts"):
            p = entry.get(k)
            if p is not None and (not isinstance(p, list) or not all(isinstance(s, str) for s in p)):
                problems.append(f"{where}.{k}: a list of strings")
                p = None
            prompts[k] = tuple(p or ())
        scales = {}
        for k in ("noise_scale", "residual_scale"):
            s = entry.get(k)
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                problems.append(f"{where}.{k}: {s!r}; a number")
                s = None
            scales[k] = None if s is None else float(s)
        out.append(Expert(source, prompts["positive_prompts"], prompts["negative_prompts"], **scales))
    return out
