"""`streammerge moe`: a Mixtral (or Qwen2-MoE, Qwen3-MoE) model from a base and dense experts, from a mergekit-moe config.

The output goes through the merge's own machinery (front/api.py): the folder's lock, the fingerprint
that a rerun resumes against, shards written by the engine and checked by sha256, the manifest and
last the index. What is new is the input: the MoE as a checkpoint computed when read (pipeline/moe.py),
and its config.json and tokenizer, written as mergekit-moe writes them (by transformers' own classes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import yaml

from streammerge import __version__
from streammerge.constants import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_SHARD_SIZE,
    MAX_INDEX_BYTES,
    STATE_DIR,
    STATE_PLAN,
)
from streammerge.errors import (
    CheckpointError,
    ConfigError,
    HubError,
    StreammergeError,
    UnsupportedFeatureError,
)
from streammerge.front import api
from streammerge.front.config import DTYPES as CONFIG_DTYPES
from streammerge.front.config import MergeConfig
from streammerge.front.moe_config import MoEConfig
from streammerge.io import hub
from streammerge.io.sources import DTYPE_NAMES, Checkpoint, read_json
from streammerge.io.writer import copy_file_atomic, write_json_atomic, write_text_atomic
from streammerge.methods import gates as gate_fns
from streammerge.pipeline.engine import Progress, run_plan
from streammerge.pipeline.moe import MoECheckpoint, moe_parts, moe_plan

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")


ARCH_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("streammerge moe writes config.json and the tokenizer with transformers, as mergekit-moe does: "
                          "pip install transformers") from None
    return transformers


def select_architecture(cfg: MoEConfig, model_types: dict[str, str]) -> str:
    """mergekit-moe's choice (scripts/moe.py select_output_arch): Mixtral when it fits, else the first
    that does of DeepSeek, Qwen MoE, Qwen3 MoE; `architecture:` narrows the candidates by name prefix.
    Returns "mixtral", "qwen2_moe" or "qwen3_moe"; a DeepSeek output is refused by name (not built yet)."""
    types = set(model_types.values())
    shared = cfg.shared_experts
    one_type = types.pop() if len(types) == 1 else None
    fits = {
        "Mixtral": (not shared and one_type in ("llama", "mistral"),
                    "Llama or Mistral models and no shared_experts"),
        "DeepSeek MoE": (len(shared) <= 1 and not (shared and (shared[0].positive_prompts or shared[0].negative_prompts))
                         and one_type in ("llama", "mistral"), "Llama or Mistral models, at most one shared expert, without prompts"),
        "Qwen MoE": (len(shared) == 1 and (cfg.gate_mode == "random" or bool(shared[0].positive_prompts))
                     and one_type in ("llama", "mistral", "qwen2"),
                     "Qwen2, Llama or Mistral models and exactly one shared expert (with prompts unless gate_mode: random)"),
        "Qwen3 MoE": (not shared and one_type == "qwen3", "Qwen3 models and no shared_experts"),
    }
    names = [n for n in fits if cfg.architecture is None or n.lower().startswith(cfg.architecture.lower())]
    if not names:
        raise ConfigError(f"architecture: {cfg.architecture!r} names no output architecture; choose one of {', '.join(fits)}")
    ok = [n for n in names if fits[n][0]]
    if not ok:
        mixed = f" (the models are {', '.join(f'{t}: {m}' for m, t in model_types.items())})" if one_type is None else \
            f" (the models are {one_type})"
        needs = "; ".join(f"{n} needs {fits[n][1]}" for n in names)
        raise ConfigError(f"no MoE output architecture fits these models{mixed}: {needs}")
    chosen = "Mixtral" if "Mixtral" in ok else ok[0]
    if chosen == "DeepSeek MoE":
        raise UnsupportedFeatureError("shared_experts: mergekit-moe would build a DeepSeek MoE here (a shared expert "
                                      "without prompts), which streammerge does not build yet; give the shared expert "
                                      "positive_prompts for a Qwen2-MoE, or drop shared_experts for a Mixtral")
    return {"Mixtral": "mixtral", "Qwen MoE": "qwen2_moe", "Qwen3 MoE": "qwen3_moe"}[chosen]


def output_config(arch: str, base_cfg, cfg: MoEConfig, out_dtype: torch.dtype | None):
    """config.json of the output: mergekit-moe's MixtralMoE/QwenMoE/Qwen3MoE._generate_config, line for line."""
    transformers = _transformers()
    n = len(cfg.experts)
    if arch == "mixtral":
        if not isinstance(base_cfg, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_cfg.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_cfg.max_position_embeddings
            base_cfg = mistral
        out = transformers.MixtralConfig(**base_cfg.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = n
        out.num_experts_per_tok = cfg.experts_per_token or 2
        out.sliding_window = None
        _set_dtype(out, out_dtype)
    else:  # Qwen2-MoE and Qwen3-MoE: the same fields, and Qwen2's sliding window and shared expert besides
        qwen3 = arch == "qwen3_moe"
        if qwen3:
            from transformers.models.qwen3_moe import Qwen3MoeConfig as config_class
        else:
            from transformers.models.qwen2_moe import Qwen2MoeConfig as config_class

        out = config_class(**base_cfg.to_dict())
        out.architectures = ["Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM"]
        out.num_experts = n
        out.num_experts_per_tok = cfg.experts_per_token or 2
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.moe_intermediate_size = out.intermediate_size
        if not qwen3:
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
        if out_dtype is not None:
            _set_dtype(out, out_dtype)
    if n & (n - 1):
        log.warning("the model has %d experts, not a power of two: llama.cpp cannot use it", n)
    return out


def _set_dtype(config, dtype: torch.dtype | None) -> None:
    """mergekit sets `torch_dtype`, which transformers 5 names `dtype` (and warns about the old name):
    the same config.json either way."""
    import transformers

    setattr(config, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)


def _out_dtype(cfg: MoEConfig, base_cfg) -> torch.dtype | None:
    """mergekit's select_dtype: the config's dtype, else the base's config.json dtype, else each tensor's own."""
    if cfg.dtype:
        return CONFIG_DTYPES[cfg.dtype]
    dt = getattr(base_cfg, "torch_dtype", None) or getattr(base_cfg, "dtype", None)
    if isinstance(dt, str):
        dt = CONFIG_DTYPES.get(dt)
    return dt if isinstance(dt, torch.dtype) else None


def _model_type(ckpt: Checkpoint, who: str) -> str:
    ckpt.fetch_side_files(["config.json"])
    path = ckpt.folder / "config.json"
    if not path.is_file():
        raise CheckpointError(path, f"{who}: no config.json; mergekit-moe needs each model's config to know its architecture")
    data = read_json(path, MAX_INDEX_BYTES, "not valid JSON")
    kind = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(kind, str):
        raise CheckpointError(path, f"{who}: config.json has no model_type")
    return kind


def build_moe(
    cfg: MoEConfig,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
    force: bool = False,
    progress: Progress | None = None,
    on_total=None,
    seed: int = 0,
    allow_all_same: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    threads: int | None = None,
    on_shard_file=None,
    rank: int = 0,
    world_size: int = 1,
) -> api.MergeResult:
    """Builds the MoE into `output_dir`, resumable like a merge (api.merge): a rerun keeps finished
    shards, a finished build is left as it is, `force` replaces another output there.

    `seed`: the random gates' (and noise's) seed, mergekit-moe's --random-seed.
    `rank`, `world_size`: this worker's share of a build split as api.merge splits a merge (the shards
    api.worker_shards gives it; `streammerge finalize` once all are done; under torchrun both come from
    the process group, rank 0 prepares the folder first and finalizes). Any split gives the same bytes.
    Raises ConfigError, CheckpointError, MismatchError, OutputError: one line each, before any output."""
    start = time.perf_counter()
    out = Path(output_dir)
    cfg.check(allow_all_same)
    transformers = _transformers()
    group, rank, world_size = api._workers(rank, world_size, force)
    held = ExitStack()
    try:
        with ExitStack() as stack:
            opened: dict[str, Checkpoint] = {}
            problems: list[StreammergeError] = []

            def get(source: str, who: str) -> Checkpoint | None:
                path = cfg.path(source)
                key = os.path.realpath(path) if hub.parse_source(path) is None else path
                if key not in opened:
                    try:
                        ckpt = stack.enter_context(hub.open_checkpoint(path))
                    except (CheckpointError, HubError) as e:
                        problems.append(e)
                        return None
                    if not isinstance(ckpt, Checkpoint):  # a LoRA adapter (or a model with one applied)
                        problems.append(ConfigError(f"{who}: {source!r} is a LoRA adapter; an expert is a whole model "
                                                    "(merge the adapter first)"))
                        return None
                    opened[key] = ckpt
                return opened[key]

            base = get(cfg.base_model, "base_model")
            experts = [get(e.source_model, f"experts[{i}]") for i, e in enumerate(cfg.experts)]
            shared = [get(e.source_model, f"shared_experts[{i}]") for i, e in enumerate(cfg.shared_experts)]
            if problems:
                raise problems[0] if len(problems) == 1 else ConfigError([str(p) for p in problems])
            types = {cfg.base_model: _model_type(base, "base_model")}
            for i, (e, c) in enumerate([*zip(cfg.experts, experts), *zip(cfg.shared_experts, shared)]):
                types[e.source_model] = _model_type(c, f"expert {e.source_model}")
            arch = select_architecture(cfg, types)

            base.fetch_side_files(["config.json", "generation_config.json", *TOKENIZER_FILES])
            try:
                base_cfg = transformers.AutoConfig.from_pretrained(str(base.folder))
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(base.folder / "config.json", f"transformers cannot read it: {e}") from None
            out_dtype = _out_dtype(cfg, base_cfg)
            layers = base_cfg.num_hidden_layers
            gated = cfg.gated_experts()
            hidden_mode = cfg.gate_mode.startswith("hidden")
            gate_dtype = "BF16" if hidden_mode else "F32"  # mergekit's hidden states are bf16, its other gates float32
            heads = {"heads": base_cfg.num_attention_heads, "kv_heads": base_cfg.num_key_value_heads,
                     "head_dim": base_cfg.hidden_size // base_cfg.num_attention_heads}
            parts, left_out = moe_parts(arch, base, layers, list(zip(experts, cfg.experts)),
                                        (shared[0], cfg.shared_experts[0]) if arch == "qwen2_moe" else None, len(gated),
                                        DTYPE_NAMES[out_dtype] if out_dtype is not None else None, gate_dtype, heads)
            if left_out:
                log.warning("base_model: %d tensor(s) that a %s model has not are left out, as mergekit-moe leaves them, "
                            "e.g. %r", len(left_out), ARCH_NAMES[arch], left_out[0])

            tokenizer = None
            if cfg.gate_mode in ("cheap_embed",) or hidden_mode or copy_tokenizer:
                try:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base.folder))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(base.folder, f"base_model: transformers cannot load its tokenizer ({e}); mergekit-moe "
                                          "tokenizes the prompts and writes the tokenizer with it") from None
                gate_fns.prepare_tokenizer(tokenizer)
            # tokenized now, before the tokenizer is saved: as in mergekit, the saved tokenizer.json then
            # carries the padding the prompts were tokenized with
            prompts = [] if cfg.gate_mode in ("random", "uniform_random") else [
                (gate_fns.tokenize_prompts(tokenizer, e.positive_prompts),
                 gate_fns.tokenize_prompts(tokenizer, e.negative_prompts) if e.negative_prompts else None) for e in gated]

            def compute_gates() -> torch.Tensor:
                g = gates(cfg, len(gated), base, base_cfg, prompts, layers, seed)
                gate_fns.warn_degenerate(g)
                return g

            live_limit = max(int(max_memory * 0.5), 1)
            moe = MoECheckpoint(out / STATE_DIR / "files", parts, compute_gates, seed, live_limit)
            stack.callback(moe.close)
            plan_cfg = MergeConfig.from_dict({"merge_method": "passthrough", "models": [{"model": cfg.base_model}]})
            options = plan_cfg.merge_options()
            plan = moe_plan(moe, options, plan_cfg, max_shard_size, max_memory)
            inputs = list({id(c): c for c in [base, *experts, *shared]}.values())
            side = {"copy_tokenizer": copy_tokenizer, "write_model_card": write_model_card}
            identity = api.input_identities(inputs)  # one snapshot, fingerprinted and recorded in the state
            fingerprint = _fingerprint(cfg, plan, identity, seed, side)
            mine = api.worker_shards(plan, rank, world_size)
            if on_total is not None:
                on_total(sum(s.input_bytes for s in mine))

            def state() -> None:
                _write_state(out, cfg, plan, identity, fingerprint, output_config(arch, base_cfg, cfg, out_dtype),
                             tokenizer if copy_tokenizer else None, base, seed, write_model_card)

            def run(todo: list, on_shard) -> dict[str, dict]:
                return run_plan(plan, moe, [], out, progress=progress, compile="off", todo=todo, on_shard=on_shard,
                                device="cpu", threads=threads)

            complete, shards, reused = api.write_output(out, plan, inputs, fingerprint, mine, force=force, rank=rank,
                                                        world_size=world_size, group=group, held=held, write_state=state,
                                                        run=run, on_shard_file=on_shard_file)
        return api.MergeResult(output_dir=out, shards=[{k: r[k] for k in ("file", "sha256", "bytes")} for r in shards],
                               total_size=plan.total_size, tensors=len(plan.tensors), merged_tensors=0,
                               seconds=time.perf_counter() - start, reused_shards=reused,
                               already_complete=complete, rank=rank, world_size=world_size,
                               finalized=complete or world_size == 1 or group is not None)
    finally:
        held.close()


def gates(cfg: MoEConfig, n_gated: int, base: Checkpoint, base_cfg, prompts: list, layers: int, seed: int) -> torch.Tensor:
    """(layers, gated experts, hidden): mergekit's get_gate_params for the config's gate_mode, from
    each gated expert's tokenized (positive, negative or None) prompts."""
    hidden = base_cfg.hidden_size
    if cfg.gate_mode in ("random", "uniform_random"):
        return gate_fns.random_gates(layers, n_gated, hidden, seed, uniform=cfg.gate_mode == "uniform_random")
    embed = "model.embed_tokens.weight"
    if embed not in base.tensors:
        raise CheckpointError(base.label, f"base_model: has no {embed!r}; gate_mode {cfg.gate_mode} reads the prompts' embeddings")

    def rows(ids: torch.Tensor) -> torch.Tensor:
        vocab = base.tensors[embed].rows
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise CheckpointError(base.label, f"base_model: the tokenizer gives token id {int(bad[0])} but {embed} has {vocab} "
                                  "rows; the tokenizer does not belong to this model")
        return torch.stack([base.view(embed, int(i), int(i) + 1)[0] for i in ids])

    if cfg.gate_mode == "cheap_embed":
        return gate_fns.cheap_embed_gates(rows, layers, prompts)
    log.info("gates: running the base layer by layer on the prompts (gate_mode %s)", cfg.gate_mode)
    return gate_fns.hidden_gates(lambda name: base.view(name), rows, base_cfg, prompts, average=cfg.gate_mode == "hidden_avg")


def _fingerprint(cfg: MoEConfig, plan, identity: list, seed: int, side: dict) -> str:
    payload = {
        "version": __version__, "kind": "moe", "config": cfg.to_dict(), "seed": seed, "side": side,
        "tensors": [[t.name, list(t.shape), t.out_dtype] for t in plan.tensors],
        "shards": [[s.filename, list(s.tensors)] for s in plan.shards],
        "inputs": identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _write_state(out: Path, cfg: MoEConfig, plan, identity: list, fingerprint: str, out_cfg,
                 tokenizer, base: Checkpoint, seed: int, write_model_card: bool) -> None:
    """What `finalize` needs (api._write_state's format): the side files in .streammerge/files/
    (config.json, the tokenizer, mergekit_moe_config.yml), the plan, the manifest and the model card."""
    files = out / STATE_DIR / "files"
    files.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out / STATE_DIR) as td:
        out_cfg.save_pretrained(td)
        if tokenizer is not None:
            tokenizer.save_pretrained(td)
        for p in sorted(Path(td).iterdir()):
            copy_file_atomic(p, files / p.name)
    if (base.folder / "generation_config.json").is_file():  # mergekit-moe writes none; a MoE generates as its base does
        copy_file_atomic(base.folder / "generation_config.json", files / "generation_config.json")
    if write_model_card and cfg.source_text is not None:  # as mergekit-moe writes it
        write_text_atomic(files / "mergekit_moe_config.yml", cfg.source_text)
    manifest = {
        "format": "streammerge-manifest/1", "streammerge_version": __version__, "kind": "moe",
        "versions": {"torch": torch.__version__.split("+")[0], "python": __import__("platform").python_version()},
        "config": cfg.to_dict(), "seed": seed, "architecture": out_cfg.architectures[0], "total_size": plan.total_size,
    }
    card = None
    if write_model_card:
        models = list(dict.fromkeys([cfg.base_model, *(e.source_model for e in (*cfg.experts, *cfg.shared_experts))]))
        card = ("---\n" + yaml.safe_dump({"base_model": models, "library_name": "transformers",
                                          "tags": ["moe", "merge", "streammerge"]}, sort_keys=False) + "---\n\n"
                f"# Mixture of experts\n\nBuilt with streammerge {__version__} (`streammerge moe`, mergekit-moe's format): "
                f"a {out_cfg.architectures[0]} with {len(cfg.experts)} experts, {cfg.experts_per_token} per token, "
                f"gates from `{cfg.gate_mode}`.\n\n## Configuration\n\n```yaml\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
                + "```\n")
    write_json_atomic(out / STATE_DIR / STATE_PLAN, {
        "fingerprint": fingerprint,
        "inputs": identity,
        "shards": [{"file": s.filename, "tensors": list(s.tensors), "input_bytes": s.input_bytes} for s in plan.shards],
        "manifest": manifest,
        "model_card": card,
        "summary": {"tensors": len(plan.tensors), "merged_tensors": 0, "total_size": plan.total_size},
    })
