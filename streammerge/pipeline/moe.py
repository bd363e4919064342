"""A mixture of experts built from dense models, as a checkpoint whose tensors are computed when read
(like a recipe stage, pipeline/recipe.py), and the plan that writes it (front/moe.py runs it).

`MoECheckpoint` has exactly the output's tensors, in the output dtype: the base's attention, norms
and embeddings (views of the base's mapped files when no dtype changes), each layer's experts built
from the experts' MLP tensors, and the gates. An ordinary copy plan of it goes through the merge
engine: shards, resume, sha256 receipts and finalize are the merge's own, and the memory is the
engine's row blocks: a block of a stacked expert tensor is one or more whole experts, each read from
its model's file, so the MoE (several times any input) never sits in memory.

Tensor names and layouts are mergekit-moe 0.1.5's (mergekit/moe/mixtral.py, qwen.py, qwen3.py) under
transformers 5:
- Mixtral, and Qwen3-MoE (with the base's q_norm/k_norm, as qwen3.py copies them): `model.layers.L.mlp.experts.gate_up_proj` (experts, 2 x intermediate, hidden): each expert's
  gate_proj rows then its up_proj rows; `...experts.down_proj` (experts, hidden, intermediate);
  `...mlp.gate.weight` (experts, hidden).
- Qwen2-MoE: `...mlp.experts.E.{gate,up,down}_proj.weight`, `...mlp.shared_expert.*`, `...mlp.gate.weight`,
  `...mlp.shared_expert_gate.weight` (1, hidden); zero q/k/v biases for a base without them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from streammerge.errors import MismatchError
from streammerge.front.moe_config import Expert
from streammerge.io.sources import (
    DTYPE_NAMES,
    DTYPES,
    Checkpoint,
    ComputedCheckpoint,
    TensorInfo,
)
from streammerge.pipeline.plan import (
    Plan,
    ShardPlan,
    TensorPlan,
    _assign_shards,
    _file_order,
    pool_shape,
    write_memory,
)

log = logging.getLogger(__name__)

MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
             "input_layernorm.weight", "post_attention_layernorm.weight")
QWEN_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
QWEN3_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


@dataclass(frozen=True)
class Part:
    """Where one output tensor comes from.

    kind: "copy" (rows of `src` in `ckpt`), "zeros", "expert" (a whole source tensor with the
    expert's noise and residual scale), "stack" (one expert per row: the concatenation of `srcs[e]`
    tensors of `ckpts[e]`, each with expert e's noise and scale), "gate" (rows lo..hi of a layer's gates).
    """

    kind: str
    ckpt: Checkpoint | None = None
    src: str = ""
    expert: Expert | None = None
    ckpts: tuple[Checkpoint, ...] = ()
    experts: tuple[Expert, ...] = ()
    srcs: tuple[tuple[str, ...], ...] = ()
    layer: int = 0
    lo: int = 0
    hi: int = 0


class LiveBytes:
    """Back-pressure on computed blocks: the engine hands a copied block to its writer thread without
    a pool buffer, so without this a writer slower than the reads would let computed blocks pile up.
    A new block waits while `limit` bytes of earlier ones are still alive (each is counted until it is
    garbage, i.e. written). Two blocks stay alive whatever the writer does (the one the engine just
    handed over and the one the writer thread last wrote, until its next): a block waits only while
    more than two of the largest blocks are alive, when the writer surely has one queued to free. A
    wait longer than `patience` seconds goes on anyway: never a deadlock."""

    def __init__(self, limit: int, patience: float = 10.0):
        self.limit, self.patience = limit, patience
        self.live = 0
        self.largest = 0
        self.cond = threading.Condition()

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        n = tensor.numel() * tensor.element_size()
        with self.cond:
            deadline = time.monotonic() + self.patience
            self.largest = max(self.largest, n)
            while self.live + n > self.limit and self.live > 2 * self.largest:
                if time.monotonic() > deadline:
                    log.debug("computed blocks: %d bytes still unwritten after %.0f s; going on", self.live, self.patience)
                    break
                self.cond.wait(0.1)
            self.live += n
        weakref.finalize(tensor, self._release, n)
        return tensor

    def _release(self, n: int) -> None:
        with self.cond:
            self.live -= n
            self.cond.notify_all()


def noise_seed(seed: int, *what: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, (seed, *what))).encode()).digest()[:8], "little") >> 1


def noise_and_scale(t: torch.Tensor, expert: Expert, residual: bool, seed: int) -> torch.Tensor:
    """mergekit's noise_and_scale, in the source dtype: + N(0, 1) * noise_scale (from a generator
    seeded by `seed`: mergekit's draws come from torch's global RNG in its own tensor order, which a
    resumable streamed run cannot follow), then * residual_scale for down_proj."""
    if expert.noise_scale is not None:
        g = torch.Generator().manual_seed(seed)
        t = t + torch.randn(t.shape, generator=g, dtype=t.dtype) * expert.noise_scale
    if residual and expert.residual_scale is not None:
        t = t * expert.residual_scale
    return t


class MoECheckpoint(ComputedCheckpoint):
    """The MoE's tensors, computed when read (see the module docstring)."""

    def __init__(self, folder: Path, parts: dict[str, tuple[Part, str, tuple[int, ...]]], gates: Callable[[], torch.Tensor],
                 seed: int, live_limit: int):
        self.path = folder  # the side files (config.json, tokenizer) written for the output
        self.parts = parts
        self._gates_fn, self._gates = gates, None
        self.seed = seed
        self.live = LiveBytes(live_limit)
        file = folder / "moe.safetensors"  # one fake file: the engine orders nothing by it
        self.files, self.tensors, offset = [file], {}, 0
        for name, (_, dtype, shape) in parts.items():
            nbytes = torch.Size(shape).numel() * DTYPES[dtype].itemsize
            self.tensors[name] = TensorInfo(name, dtype, shape, file, offset, nbytes)
            offset += nbytes
        self._fds, self._maps, self._ends = {}, {}, {}
        self._lock = threading.RLock()
        self._held: tuple[str, torch.Tensor] | None = None

    @property
    def label(self) -> str:
        return "the MoE"

    def gates(self) -> torch.Tensor:
        with self._lock:
            if self._gates is None:
                self._gates = self._gates_fn()
            return self._gates

    def advise(self, name: str) -> None:
        part = self.parts[name][0]
        for ckpt, src in [(part.ckpt, part.src)] + [(c, n) for c, names in zip(part.ckpts, part.srcs) for n in names]:
            if ckpt is not None and src:
                try:
                    ckpt.advise(src)
                except (OSError, ValueError):  # only a hint
                    pass

    def view(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        part, dtype, shape = self.parts[name]
        info = self.tensors[name]
        r0, r1 = row_start, info.rows if row_end is None else row_end
        out_dtype = DTYPES[dtype]
        if part.kind == "copy":
            rows = part.ckpt.view(part.src, r0, r1)
            return rows if rows.dtype == out_dtype else self.live.track(rows.to(out_dtype))
        if part.kind == "zeros":
            return torch.zeros((r1 - r0, *shape[1:]), dtype=out_dtype)
        if part.kind == "gate":
            return self.gates()[part.layer, part.lo:part.hi][r0:r1].to(out_dtype)
        if part.kind == "expert":  # noise is drawn for the whole tensor: computed once, kept while read
            with self._lock:
                if self._held is None or self._held[0] != name:
                    self._held = None
                    t = noise_and_scale(part.ckpt.view(part.src), part.expert, "down_proj" in part.src, noise_seed(self.seed, name))
                    self._held = (name, t.to(out_dtype))
                return self._held[1][r0:r1]
        # "stack": one whole expert per row; the block is the concatenation of each expert's sources
        block = torch.empty((r1 - r0, *shape[1:]), dtype=out_dtype)
        for i, e in enumerate(range(r0, r1)):
            at = 0
            for src in part.srcs[e]:
                t = part.ckpts[e].view(src)
                t = noise_and_scale(t, part.experts[e], "down_proj" in src, noise_seed(self.seed, name, e, src))
                block[i, at:at + t.shape[0]] = t
                at += t.shape[0]
        return self.live.track(block)

    def file_identity(self, file: Path) -> list:
        return ["moe", "computed"]

    def close(self) -> None:
        self._held = None


def moe_parts(arch: str, base: Checkpoint, layers: int, experts: list[tuple[Checkpoint, Expert]],
              shared: tuple[Checkpoint, Expert] | None, n_gated: int, out_dtype: str | None, gate_dtype: str,
              head_dims: dict[str, int]) -> tuple[dict[str, tuple[Part, str, tuple[int, ...]]], list[str]]:
    """The output tensors in file order, each (its Part, dtype name, shape); and the base tensors left
    out (not in the output architecture, as mergekit leaves them out). `arch`: "mixtral", "qwen2_moe" or "qwen3_moe".
    Raises MismatchError naming each expert tensor that is missing or of another shape than the base's."""
    problems: list[str] = []

    def dtype_of(*infos: TensorInfo) -> str:
        if out_dtype is not None:
            return out_dtype
        promoted = infos[0].dtype
        for i in infos[1:]:
            promoted = DTYPE_NAMES[torch.promote_types(DTYPES[promoted], DTYPES[i.dtype])]
        return promoted

    def mlp_info(ckpt: Checkpoint, layer: int, proj: str, who: str) -> TensorInfo | None:
        name = f"model.layers.{layer}.mlp.{proj}.weight"
        info, ref = ckpt.tensors.get(name), base.tensors.get(name)
        if info is None:
            problems.append(f"{who} ({ckpt.label}): has no tensor {name!r}; an expert must be a dense model with the "
                            "base's MLP layers")
        elif ref is not None and info.shape != ref.shape:
            problems.append(f"{who} ({ckpt.label}): tensor {name!r} has shape {list(info.shape)} but the base's is "
                            f"{list(ref.shape)}; the experts must be fine-tunes of the base's architecture and size")
        return info

    parts: dict[str, tuple[Part, str, tuple[int, ...]]] = {}
    kept_layer = ATTENTION + {"qwen2_moe": QWEN_BIASES, "qwen3_moe": QWEN3_NORMS}.get(arch, ())
    wanted = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    wanted |= {f"model.layers.{i}.{n}" for i in range(layers) for n in kept_layer}
    order = _file_order(base)
    left_out = [n for n in order if n not in wanted and ".mlp." not in n]
    hidden = base.tensors["model.embed_tokens.weight"].shape[1] if "model.embed_tokens.weight" in base.tensors else 0

    def copy(name: str) -> None:
        info = base.tensors[name]
        parts[name] = (Part("copy", base, name), dtype_of(info), info.shape)

    pre = [n for n in order if n in wanted and not n.startswith("model.layers.")]
    for name in [n for n in pre if "embed_tokens" in n]:
        copy(name)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for n in kept_layer:
            if prefix + n in base.tensors:
                copy(prefix + n)
            elif n in QWEN_BIASES:  # Qwen2-MoE has q/k/v biases: zeros for a Llama base, as mergekit writes
                kv = n.startswith("self_attn.k_") or n.startswith("self_attn.v_")
                rows = head_dims["kv_heads" if kv else "heads"] * head_dims["head_dim"]
                parts[prefix + n] = (Part("zeros"), out_dtype or base.tensors[prefix + "self_attn.q_proj.weight"].dtype, (rows,))
            else:
                problems.append(f"base ({base.label}): has no tensor {prefix + n!r}")
        mlp = {p: mlp_info(base, i, p, "base_model") for p in MLP}
        infos = [(c, e, {p: mlp_info(c, i, p, f"experts[{k}]") for p in MLP}) for k, (c, e) in enumerate(experts)]
        if any(v is None for v in mlp.values()) or any(v is None for _, _, d in infos for v in d.values()):
            continue
        gate_dtype_here = out_dtype or gate_dtype
        if arch in ("mixtral", "qwen3_moe"):  # the same stacked layout (mergekit's convert_checkpoint_tensors)
            inter, width = mlp["gate_proj"].shape
            parts[prefix + "mlp.experts.gate_up_proj"] = (
                Part("stack", ckpts=tuple(c for c, _, _ in infos), experts=tuple(e for _, e, _ in infos),
                     srcs=tuple((d["gate_proj"].name, d["up_proj"].name) for _, _, d in infos)),
                dtype_of(*[d[p] for _, _, d in infos for p in ("gate_proj", "up_proj")]), (len(infos), 2 * inter, width))
            parts[prefix + "mlp.experts.down_proj"] = (
                Part("stack", ckpts=tuple(c for c, _, _ in infos), experts=tuple(e for _, e, _ in infos),
                     srcs=tuple((d["down_proj"].name,) for _, _, d in infos)),
                dtype_of(*[d["down_proj"] for _, _, d in infos]), (len(infos), width, inter))
            parts[prefix + "mlp.gate.weight"] = (Part("gate", layer=i, lo=0, hi=len(infos)), gate_dtype_here, (len(infos), hidden))
            continue
        for k, (c, e, d) in enumerate(infos):
            for p in MLP:
                parts[f"{prefix}mlp.experts.{k}.{p}.weight"] = (Part("expert", c, d[p].name, expert=e), dtype_of(d[p]), d[p].shape)
        sc, se = shared
        sd = {p: mlp_info(sc, i, p, "shared_experts[0]") for p in MLP}
        for p in MLP:
            if sd[p] is not None:
                parts[f"{prefix}mlp.shared_expert.{p}.weight"] = (Part("expert", sc, sd[p].name, expert=se), dtype_of(sd[p]),
                                                                 sd[p].shape)
        parts[prefix + "mlp.gate.weight"] = (Part("gate", layer=i, lo=0, hi=len(infos)), gate_dtype_here, (len(infos), hidden))
        parts[prefix + "mlp.shared_expert_gate.weight"] = (Part("gate", layer=i, lo=len(infos), hi=n_gated), gate_dtype_here,
                                                           (n_gated - len(infos), hidden))
    for name in [n for n in pre if "embed_tokens" not in n]:
        copy(name)
    if problems:
        raise MismatchError(list(dict.fromkeys(problems)))
    return parts, left_out


def moe_plan(ckpt: MoECheckpoint, options, config, max_shard_size: int, max_memory: int) -> Plan:
    """A copy plan of every tensor of `ckpt`, in its order, split into shards of at most `max_shard_size`."""
    tensors = [TensorPlan(n, i.shape, i.dtype, merged=False) for n, i in ckpt.tensors.items()]
    sizes = {t.name: t.nbytes for t in tensors}
    shards: list[ShardPlan] = _assign_shards(tensors, sizes, max_shard_size)
    plan = Plan(config=config, options=options, reference=ckpt.label, sources=(), tensors=tuple(tensors),
                shards=tuple(shards), input_bytes=sum(sizes.values()), peak_memory=0, max_memory=max_memory)
    # the engine's pool and writer's stages, and computed blocks waiting for the writer (LiveBytes)
    capacity, count = pool_shape(plan, [t.rows for t in tensors])
    return replace(plan, peak_memory=capacity * count + write_memory(max_memory) + ckpt.live.limit)
