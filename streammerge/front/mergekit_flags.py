"""mergekit-yaml's command-line flags on `streammerge merge`, so `streammerge merge config.yaml out/`
runs with whatever flags `mergekit-yaml config.yaml out/` was given (mergekit 0.1.5, its
`mergekit/options.py`).

Each flag is honoured where it means something here (the device, the seed, the shard size, the
tokenizer and model card, mixing architectures, threads, ...); where streaming makes it moot it is
accepted and says so in one `streammerge: info:` line. docs/mergekit.md has the table; `FLAGS` below
is its source. No heavy imports here: this runs before `--help`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

import click

# mergekit's parse_kmb: digits, or digits then k/m/b (case-insensitive) for 10^3, 10^6, 10^9.
_KMB = {"k": 10**3, "m": 10**6, "b": 10**9}


def parse_kmb(text: str) -> int:
    """mergekit's --out-shard-size value: '5B' -> 5_000_000_000, '500M', '1000k', '123'.

    mergekit calls it a number of parameters, but its writer compares it with each shard's tensor
    bytes (numel x element size), so it is a byte count; decimals ('1.5B') fail in mergekit and here.
    """
    value = str(text).strip()
    if value.isdigit():
        return int(value)
    if value[-1:].lower() in _KMB and value[:-1].isdigit():
        return int(value[:-1]) * _KMB[value[-1].lower()]
    raise click.BadParameter(f"{text!r} is not a mergekit size like 5B, 500M, 1000k or 123 (whole numbers; "
                             "k, M, B are 10^3, 10^6, 10^9; mergekit counts bytes)")


class KmbSize(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        return value if isinstance(value, int) else parse_kmb(value)


@dataclass(frozen=True)
class Flag:
    """One mergekit-yaml option: its click declaration, and what streammerge does with it."""

    decls: tuple[str, ...]  # as mergekit declares it: "--cuda/--no-cuda", or "-j", "--num-threads"
    name: str  # the parameter (mergekit's MergeOptions field)
    does: str  # docs/mergekit.md's "streammerge" column
    honoured: bool
    kwargs: dict = field(default_factory=dict)

    @property
    def spellings(self) -> list[str]:
        """Every way to write it on the command line: ['--cuda', '--no-cuda'], ['-j', '--num-threads']."""
        return [s for d in self.decls for s in d.split("/") if s.startswith("-")]


def _pair(name: str) -> tuple[str, ...]:
    """`--name/--no-name` (mergekit's defaults, where an info line depends on them: _MERGEKIT_DEFAULT)."""
    flag = name.replace("_", "-")
    return (f"--{flag}/--no-{flag}",)


MOOT = {
    "lazy_unpickle": "nothing to do: inputs are memory-mapped safetensors read in row blocks, pickles are never loaded",
    "low_cpu_memory": "nothing to do: memory is bounded by --max-memory (row blocks, never whole models); a GPU merge "
                      "stages each block through pinned buffers",
    "read_to_gpu": "nothing to do: with --device cuda every block is copied to the GPU as it is merged",
    "clone_tensors": "nothing to do: every tensor is written from its own bytes",
    "safe_serialization": "streammerge writes safetensors only, never pickles",
    "lora_merge_cache": "nothing to do: a model+lora adapter is applied block by block as the tensors stream; no merged "
                        "copy of the model is saved",
    "lora_merge_dtype": "not used: an adapter's s·B·A is computed in float32 (float64 sums) and added to each weight, "
                        "rounded once to the model's own dtype",
    "async_write": "nothing to do: shards are always written by a writer thread while the next blocks merge",
    "write_threads": "nothing to do: one writer thread streams each shard to disk as it is merged",
    "trust_remote_code": "nothing to do: streammerge reads config.json as data and never runs a model's code",
}

FLAGS: tuple[Flag, ...] = (
    # Dangerous Options
    Flag(_pair("allow_crimes"), "allow_crimes", "merges models whose config.json names different architectures "
         "(refused without it, as mergekit does); their tensors must still match", True, {"default": None}),
    Flag(_pair("unsafe_truncate_embeddings"), "unsafe_truncate_embeddings",
         "`--vocab truncate_to_smallest`: embedding and output rows cut to the smallest vocabulary", True, {"default": None}),
    Flag(_pair("trust_remote_code"), "trust_remote_code", "info line: " + MOOT["trust_remote_code"], False,
         {"default": None}),
    # Storage
    Flag(("--transformers-cache",), "transformers_cache", "Hub downloads go into this folder (huggingface_hub's cache "
         "layout, as `HF_HUB_CACHE=DIR`)", True, {"metavar": "DIR"}),
    Flag(("--lora-merge-cache",), "lora_merge_cache", "info line: " + MOOT["lora_merge_cache"], False, {"metavar": "DIR"}),
    # Miscellaneous
    Flag(("--lora-merge-dtype",), "lora_merge_dtype", "info line: " + MOOT["lora_merge_dtype"], False, {"metavar": "DTYPE"}),
    Flag(("--random-seed",), "random_seed", "`--seed`: the seed of the DARE/DELLA masks", True, {"type": int}),
    Flag(("-v", "--verbose", "verbosity"), "verbosity", "debug lines (`streammerge: debug: ...`) on stderr; "
         "streammerge's info lines show without it", True, {"count": True}),
    Flag(_pair("quiet"), "quiet", "no progress bar or summary, warnings only (`-q`)", True, {}),
    # Performance
    Flag(_pair("cuda"), "cuda", "`--device cuda` (without CUDA: the CPU, with a warning); `--no-cuda`: "
         "`--device cpu`", True, {"default": None}),
    Flag(("--device",), "device", "the same option: auto, cpu, cuda, cuda:N (default auto: a GPU when there is one)", True, {}),
    Flag(_pair("low_cpu_memory"), "low_cpu_memory", "info line: " + MOOT["low_cpu_memory"], False, {"default": None}),
    Flag(_pair("lazy_unpickle"), "lazy_unpickle", "info line: " + MOOT["lazy_unpickle"], False, {"default": None}),
    Flag(_pair("read_to_gpu"), "read_to_gpu", "info line: " + MOOT["read_to_gpu"], False, {"default": None}),
    Flag(_pair("multi_gpu"), "multi_gpu", "info line with the torchrun command that merges on every GPU "
         "(one process per GPU); this run uses one device", True, {"default": None}),
    Flag(("-j", "--num-threads"), "num_threads", "`--threads`: CPU threads for the arithmetic", True, {"type": int}),
    Flag(("--gpu-rich",), "gpu_rich", "`--cuda`, and the --multi-gpu line (mergekit: --cuda --low-cpu-memory "
         "--read-to-gpu --multi-gpu)", True, {"is_flag": True, "default": None}),
    Flag(_pair("async_write"), "async_write", "info line: " + MOOT["async_write"], False, {"default": None}),
    Flag(("--write-threads",), "write_threads", "info line: " + MOOT["write_threads"], False, {"type": int}),
    # Output Settings
    Flag(("--out-shard-size",), "out_shard_size", "the shard limit in mergekit's units (5B = 5e9 bytes: mergekit's writer "
         "counts bytes) and mergekit's write order (by tensor name), so the split is mergekit's; 0: one shard", True,
         {"type": KmbSize()}),
    Flag(_pair("copy_tokenizer"), "copy_tokenizer", "`--no-copy-tokenizer`: no tokenizer files in the output "
         "(config.json and generation_config.json still; a tokenizer_source's merged vocabulary still)", True,
         {"default": None}),
    Flag(_pair("clone_tensors"), "clone_tensors", "info line: " + MOOT["clone_tensors"], False, {"default": None}),
    Flag(_pair("write_model_card"), "write_model_card", "`--no-write-model-card`: no README.md", True,
         {"default": None}),
    Flag(_pair("safe_serialization"), "safe_serialization", "`--no-safe-serialization`: info line: "
         + MOOT["safe_serialization"], False, {"default": None}),
)

# mergekit's default for each boolean flag: the info line shows when a moot flag asks for something else.
_MERGEKIT_DEFAULT = {"copy_tokenizer": True, "write_model_card": True, "safe_serialization": True}


def options(f):
    """Adds every mergekit-yaml flag (except --device and --quiet, which the command has) to a click command."""
    for flag in reversed(FLAGS):
        if flag.name in ("device", "quiet"):
            continue
        f = click.option(*flag.decls, hidden=True, **flag.kwargs)(f)
    return f


def shard_limit(out_shard_size: int) -> int:
    """mergekit's --out-shard-size as a shard size limit: a limit <= 0 writes one shard."""
    return out_shard_size if out_shard_size > 0 else 1 << 62


def resolve(o: dict[str, Any], raw_args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turns the mergekit flags in the parsed options `o` into streammerge's: (options to set, info lines).

    Raises click.UsageError when a mergekit flag contradicts the streammerge option it maps to.
    """
    out: dict[str, Any] = {}
    info: list[str] = []

    def set_once(key: str, value: Any, flag: str, current: Any) -> None:
        if current not in (None, value):
            raise click.UsageError(f"{flag} contradicts --{key.replace('_', '-')} {current}; give one of them")
        out[key] = value

    if o.get("random_seed") is not None:
        set_once("seed", o["random_seed"], f"--random-seed {o['random_seed']}", o.get("seed"))
    if o.get("num_threads") is not None:
        if o["num_threads"] < 1:
            raise click.UsageError(f"--num-threads {o['num_threads']}: give at least 1")
        set_once("threads", o["num_threads"], f"--num-threads {o['num_threads']}", o.get("threads"))
    if o.get("unsafe_truncate_embeddings"):
        set_once("vocab", "truncate_to_smallest", "--unsafe-truncate-embeddings", o.get("vocab"))
    device = o.get("device", "auto")
    if o.get("cuda") or o.get("gpu_rich"):
        if device not in ("auto", "cuda") and not str(device).startswith("cuda:"):
            raise click.UsageError(f"--cuda contradicts --device {device}; give one of them")
        out["device"] = "cuda" if device == "auto" else device
    elif o.get("cuda") is False:
        if device not in ("auto", "cpu"):
            raise click.UsageError(f"--no-cuda contradicts --device {device}; give one of them")
        out["device"] = "cpu"
    if o.get("out_shard_size") is not None:
        size = o["out_shard_size"]
        out["max_shard_size"] = shard_limit(size)
        out["shard_order"] = "name"
    out["allow_crimes"] = bool(o.get("allow_crimes"))
    out["copy_tokenizer"] = o.get("copy_tokenizer") is not False
    out["write_model_card"] = o.get("write_model_card") is not False
    if o.get("transformers_cache"):
        out["hub_cache"] = o["transformers_cache"]
    for name, line in MOOT.items():
        value = o.get(name)
        if value is not None and value != _MERGEKIT_DEFAULT.get(name, False):  # asks for something
            info.append(f"{_spelling(name, value)}: {line}")
    if o.get("multi_gpu") or o.get("gpu_rich"):
        flag = "--gpu-rich" if o.get("gpu_rich") else "--multi-gpu"
        info.append(f"{flag}: this run merges on one device; to use every GPU (one process each, the same bytes) run: "
                    f"{torchrun_command(raw_args)}")
    return out, info


def _spelling(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if value is False:
        return flag.replace("--", "--no-", 1)
    return flag


_DROPPED = {"--multi-gpu", "--no-multi-gpu", "--gpu-rich"}


def torchrun_command(raw_args: list[str]) -> str:
    """This very merge under torchrun on every GPU of the node (--multi-gpu and --gpu-rich left out;
    --gpu-rich's --cuda kept)."""
    args = ["--cuda" if a == "--gpu-rich" else a for a in raw_args if a not in _DROPPED or a == "--gpu-rich"]
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a count is only a convenience here
        gpus = 0
    nproc = str(gpus) if gpus > 1 else "NUM_GPUS"
    return shlex.join(["torchrun", "--nproc_per_node", nproc, "-m", "streammerge", "merge", *args])


def table() -> str:
    """docs/mergekit.md's table of flags, from FLAGS."""
    rows = ["| mergekit-yaml flag | streammerge |", "| --- | --- |"]
    for flag in FLAGS:
        spelled = ", ".join(f"`{s}`" for s in flag.spellings if not s.isidentifier())
        rows.append(f"| {spelled} | {'honoured: ' if flag.honoured else ''}{flag.does} |")
    return "\n".join(rows)
