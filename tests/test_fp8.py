"""Quantized checkpoints (issue 21): FP8 read as its dequantization, FP8 written, other formats named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import COMPILE_MODES, shard_hashes, spy_compiled
from streammerge import MergeConfig, merge
from streammerge.errors import CheckpointError
from streammerge.front.demo import TinyLlama, finetune_of, random_state, save_checkpoint
from streammerge.io import quant
from streammerge.io.sources import DTYPE_NAMES, Checkpoint
from streammerge.io.verify import verify
from streammerge.io.writer import ShardWriter

# dims that are not multiples of 128: edge blocks in both directions (k/v: 96 rows, mlp: 320)
ODD = TinyLlama(hidden=192, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=300)
# whole 128x128 blocks except k/v (64 rows), which stay unquantized in an FP8 output
EVEN = TinyLlama(hidden=256, intermediate=384, layers=2, heads=4, kv_heads=1, vocab=256)


def is_fp8_weight(name: str, shape) -> bool:
    return len(shape) == 2 and "embed" not in name and "lm_head" not in name


def ref_dequant(q: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The fine-grained dequantization, written out: every element times its block's scale, in float32."""
    rows, cols = q.shape
    full = s.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


def ref_quant(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes like DeepSeek's checkpoints (edge blocks partial): s = amax/448 per block."""
    rows, cols = w.shape
    s = torch.empty(-(-rows // block), -(-cols // block))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            amax = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float().abs().max()
            s[i, j] = amax / 448 if amax > 0 else 1.0
    full = s.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), s


def fine_grained(state: dict, folder: Path, shape: TinyLlama) -> tuple[Path, Path]:
    """Writes `state` as a fine-grained FP8 checkpoint, and its float32 dequantization beside it."""
    fp8, deq = {}, {}
    for name, t in state.items():
        if is_fp8_weight(name, t.shape):
            q, s = ref_quant(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = ref_dequant(q, s)
        else:
            fp8[name] = deq[name] = t
    config = shape.config_json(torch.bfloat16)
    qconfig = {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": [128, 128]}}
    a = save_checkpoint(fp8, folder / "fp8", shards=3, config=qconfig)
    return a, save_like(a, deq, folder / "deq", config)


def save_like(model: Path, state: dict, folder: Path, config: dict) -> Path:
    """`state` saved in the files and order `model` holds its tensors (as the merge reads them):
    the output's tensor order follows the reference's files, so both merges write the same layout."""
    folder.mkdir(parents=True)
    weight_map = {}
    with Checkpoint(model) as ckpt:
        order = sorted(ckpt.tensors, key=lambda n: (ckpt.tensors[n].file.name, ckpt.tensors[n].offset))
        files = {n: ckpt.tensors[n].file.name for n in order}
    for file in dict.fromkeys(files.values()):
        names = [n for n in order if files[n] == file]
        entries = [(n, DTYPE_NAMES[state[n].dtype], tuple(state[n].shape), state[n].numel() * state[n].element_size())
                   for n in names]
        writer = ShardWriter(folder / file, entries, {"format": "pt"})
        for n in names:
            writer.write(state[n])
        writer.finish()
        weight_map.update({n: file for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def channelwise(state: dict, folder: Path, shape: TinyLlama) -> tuple[Path, Path]:
    """compressed-tensors FP8: bf16 per-channel weight_scale, per-tensor input_scale (dropped)."""
    fp8, deq = {}, {}
    for name, t in state.items():
        if is_fp8_weight(name, t.shape):
            s = (t.float().abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16)
            q = (t.float() / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
            fp8[name], fp8[name[: -len("weight")] + "weight_scale"] = q, s
            fp8[name[: -len("weight")] + "input_scale"] = torch.tensor([0.5])
            deq[name] = q.float() * s.float()
        else:
            fp8[name] = deq[name] = t
    config = shape.config_json(torch.bfloat16)
    qconfig = {**config, "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}
    a = save_checkpoint(fp8, folder / "ct", shards=2, config=qconfig)
    return a, save_like(a, deq, folder / "ctdeq", config)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    base = random_state(ODD, seed=0)
    out = {"base": save_checkpoint(base, root / "base", shards=2, config=ODD.config_json(torch.bfloat16))}
    for i in (1, 2):
        ft = finetune_of(base, seed=10 + i, scale=0.004)
        out[f"ft{i}"], out[f"ft{i}_deq"] = fine_grained(ft, root / f"ft{i}", ODD)
    out["base_fp8"], out["base_deq"] = fine_grained(base, root / "basefp8", ODD)
    out["ct1"], out["ct1_deq"] = channelwise(finetune_of(base, seed=31, scale=0.004), root / "ct1", ODD)
    return out


def test_reads_the_dequantization_row_block_by_row_block(models):
    with Checkpoint(models["ft1"]) as fp8, Checkpoint(models["ft1_deq"]) as deq:
        assert set(fp8.tensors) == set(deq.tensors)  # no scale tensors
        assert "FP8" in fp8.quantization and "128x128" in fp8.quantization
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                     "model.layers.0.mlp.up_proj.weight"):
            info = fp8.tensors[name]
            assert info.dtype == "F32" and info.nbytes < deq.tensors[name].nbytes / 3
            whole = deq.view(name)
            assert torch.equal(fp8.view(name), whole)
            for r0, r1 in ((0, 1), (5, 133), (127, 129), (128, 256), (info.rows - 3, info.rows)):
                r0, r1 = min(r0, info.rows - 1), min(r1, info.rows)
                assert torch.equal(fp8.view(name, r0, r1), whole[r0:r1]), (name, r0, r1)
        assert torch.equal(fp8.view("model.embed_tokens.weight"), deq.view("model.embed_tokens.weight"))
    with Checkpoint(models["ct1"]) as ct, Checkpoint(models["ct1_deq"]) as deq:
        assert set(ct.tensors) == set(deq.tensors)  # weight_scale and input_scale gone
        assert "per channel" in ct.quantization
        name = "model.layers.1.mlp.gate_proj.weight"
        assert torch.equal(ct.view(name, 7, 300), deq.view(name, 7, 300))


CONFIGS = {
    "ties": "merge_method: ties\nparameters: {density: 0.6}\n",
    "dare_ties": "merge_method: dare_ties\nparameters: {density: 0.5}\nseed: 3\n",
    "slerp": "merge_method: slerp\nparameters: {t: 0.3}\n",
    "della": "merge_method: della\nparameters: {density: 0.5, epsilon: 0.1}\nseed: 3\n",
}


def config_for(method: str, base: Path, fts: list[Path], extra: str = "") -> MergeConfig:
    models = "".join(f"  - model: {p}\n    parameters: {{weight: 0.5}}\n" for p in fts)
    text = f"base_model: {base}\nmodels:\n{models}{CONFIGS[method]}{extra}"
    import yaml
    return MergeConfig.from_dict(yaml.safe_load(text))


@pytest.mark.parametrize("compile", COMPILE_MODES)  # dequantized rows in the numpy kernel, FP8 rows in the compiled one
@pytest.mark.parametrize("method", list(CONFIGS))
def test_fp8_merges_to_the_bytes_of_its_dequantization(models, tmp_path, method, compile, monkeypatch):
    fts = ["ft1", "ft2"] if method != "slerp" else ["ft1"]
    read_as_stored = count_fp8_sources(monkeypatch)
    # small memory budget: many row blocks, which must not change a byte
    merge(config_for(method, models["base_fp8"], [models[f] for f in fts]), tmp_path / "a", max_memory=1 << 20, compile=compile)
    merge(config_for(method, models["base_deq"], [models[f + "_deq"] for f in fts]), tmp_path / "b")
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())
    assert bool(read_as_stored) == (compile == "on" and method != "slerp")  # slerp has its own hooks, in torch


def count_fp8_sources(monkeypatch) -> list:
    """Records each FP8 block the compiled kernel reads as stored."""
    return spy_compiled(monkeypatch, "fp8_source")


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_mixed_bf16_base_and_fp8_finetunes(models, tmp_path, compile, monkeypatch):
    read_as_stored = count_fp8_sources(monkeypatch)
    merge(config_for("ties", models["base"], [models["ft1"], models["ct1"]], "dtype: bfloat16\n"), tmp_path / "a",
          max_memory=1 << 20, compile=compile)
    merge(config_for("ties", models["base"], [models["ft1_deq"], models["ct1_deq"]], "dtype: bfloat16\n"), tmp_path / "b")
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert verify(tmp_path / "a").ok
    assert bool(read_as_stored) == (compile == "on")  # block-wise and per-channel FP8 fine-tunes side by side


# ---- FP8 out ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("even")
    base = random_state(EVEN, seed=1)
    cfg = EVEN.config_json(torch.bfloat16)
    return {"base": save_checkpoint(base, root / "base", shards=2, config=cfg),
            "ft1": save_checkpoint(finetune_of(base, 5, 0.004), root / "ft1", shards=2, config=cfg),
            "ft2": save_checkpoint(finetune_of(base, 6, 0.004), root / "ft2", shards=2, config=cfg)}


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(folder.glob("model-*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.parametrize("compile", COMPILE_MODES)  # quantized by torch, or by the compiled kernel
def test_fp8_output_is_the_bf16_merge_quantized(even, tmp_path, compile, monkeypatch):
    fused, apart = spy_compiled(monkeypatch, "merge_quantize"), spy_compiled(monkeypatch, "quantize_rows")
    fts = [even["ft1"], even["ft2"]]
    merge(config_for("dare_ties", even["base"], fts, "dtype: bfloat16\nout_dtype: float8_e4m3fn\n"), tmp_path / "fp8",
          max_memory=1 << 20, max_shard_size=400_000, compile=compile)
    assert bool(fused) == (compile == "on") and not apart  # the compiled kernel merges and quantizes in one pass
    if compile == "on":  # --check-finite looks at the merged block before it is quantized: merged, then quantized
        merge(config_for("dare_ties", even["base"], fts, "dtype: bfloat16\nout_dtype: float8_e4m3fn\n"), tmp_path / "apart",
              max_memory=1 << 20, max_shard_size=400_000, compile=compile, check_finite=True)
        assert apart and shard_hashes(tmp_path / "apart") == shard_hashes(tmp_path / "fp8")
    merge(config_for("dare_ties", even["base"], fts, "dtype: bfloat16\n"), tmp_path / "bf16")
    got, want = merged_state(tmp_path / "fp8"), merged_state(tmp_path / "bf16")
    quantized = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    assert sorted(quantized) == sorted(n for n in want if is_fp8_weight(n, want[n].shape) and want[n].shape[0] % 128 == 0)
    assert set(got) == set(want) | {n + "_scale_inv" for n in quantized}
    for name, x in want.items():
        if name not in quantized:
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], x), name
            continue
        q, s = ref_quant(x)  # the documented rounding, written out independently
        assert torch.equal(got[name].view(torch.uint8), q.view(torch.uint8)) and torch.equal(got[name + "_scale_inv"], s), name
        err = (ref_dequant(got[name], s) - x.float()).abs()
        bound = torch.maximum(x.float().abs() * 2**-4, s.repeat_interleave(128, 0).repeat_interleave(128, 1) * 2**-10)
        assert bool((err <= bound).all()), name  # within half an e4m3 step
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert "model.layers.0.self_attn.k_proj" in qc["modules_to_not_convert"]
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(got)
    assert verify(tmp_path / "fp8").ok
    # read back: the FP8 output is an FP8 input like any other
    with Checkpoint(tmp_path / "fp8") as back:
        assert set(back.tensors) == set(want)


def test_exactly_representable_values_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(256, 384, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    q[::128, ::128] = 448.0  # every block reaches the top of the range
    s = 2.0 ** torch.randint(-12, -4, (2, 3), generator=gen).float()
    assert [torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in [(quant.quantize(ref_dequant(q, s))[0], q)]] == [True]
    assert torch.equal(quant.quantize(ref_dequant(q, s))[1], s)
    assert torch.equal(quant.quantize(torch.zeros(128, 128))[1], torch.ones(1, 1))  # an all-zero block: scale 1


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_fp8_in_fp8_out_keeps_the_bytes(tmp_path, compile):
    """One FP8 model through linear (weight 1): what it dequantizes to quantizes back to its own bytes
    when its scales are powers of two and each block reaches 448."""
    gen = torch.Generator().manual_seed(1)
    state = random_state(EVEN, seed=2)
    fp8 = {}
    for name, t in state.items():
        if is_fp8_weight(name, t.shape) and t.shape[0] % 128 == 0:
            x = (torch.randn(t.shape, generator=gen) * 100).clamp(-448, 448)
            x[::128, ::128] = -448.0
            x[x.to(torch.float8_e4m3fn).float() == 0] = 1.0  # no -0: it merges to +0 (linear sums from zero)
            q = x.to(torch.float8_e4m3fn)
            fp8[name] = q
            fp8[name + "_scale_inv"] = 2.0 ** torch.randint(-12, -4, (t.shape[0] // 128, t.shape[1] // 128), generator=gen).float()
        else:
            fp8[name] = t
    src = save_checkpoint(fp8, tmp_path / "in", shards=1, config={**EVEN.config_json(torch.bfloat16),
                                                                  "quantization_config": {"quant_method": "fp8"}})
    cfg = MergeConfig.from_dict({"merge_method": "linear", "models": [{"model": str(src), "parameters": {"weight": 1.0}}],
                                 "dtype": "bfloat16", "out_dtype": "float8_e4m3fn"})
    merge(cfg, tmp_path / "out", compile=compile)
    got = merged_state(tmp_path / "out")
    assert set(got) == set(fp8)
    for name, t in fp8.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.slow  # transformers' import / subprocesses / a local HTTP Hub: seconds each
def test_transformers_loads_the_fp8_output(even, tmp_path):
    transformers = pytest.importorskip("transformers")
    merge(config_for("ties", even["base"], [even["ft1"], even["ft2"]], "dtype: bfloat16\nout_dtype: float8_e4m3fn\n"),
          tmp_path / "out")
    # on the CPU, transformers loads fine-grained FP8 by dequantizing it (to bf16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    params = dict(model.named_parameters())
    with Checkpoint(tmp_path / "out") as back:
        for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"):
            assert torch.equal(params[name].detach().float(), back.view(name).to(params[name].dtype).float()), name


# ---- other formats: one line --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bnb", "gptq", "ct_int", "suffix", "mxfp4", "gguf", "no_scale"])
def test_other_quantizations_get_one_line(tmp_path, kind):
    folder = tmp_path / "m"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"]}
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.uint8)}
    if kind == "bnb":
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    elif kind == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        tensors = {"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 4, dtype=torch.int32)}
    elif kind == "ct_int":
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    elif kind == "suffix":
        tensors["model.layers.0.mlp.up_proj.weight.absmax"] = torch.zeros(4)
    elif kind == "mxfp4":
        tensors = {"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(4, 4, dtype=torch.uint8),
                   "model.layers.0.mlp.experts.down_proj_scales": torch.zeros(4, dtype=torch.uint8)}
    elif kind == "no_scale":
        tensors = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}
    path = folder
    if kind == "gguf":
        path = folder / "model-Q4_K_M.gguf"
        path.write_bytes(b"GGUF" + bytes(60))
    else:
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(path)
    text = str(err.value)
    assert "\n" not in text
    expected = {"bnb": "bitsandbytes", "gptq": "GPTQ", "ct_int": "pack-quantized", "suffix": "bitsandbytes",
                "mxfp4": "MXFP4", "gguf": "GGUF", "no_scale": "without a scale"}[kind]
    assert expected in text and ("dequantize" in text or "full-precision" in text or "scale" in text), text


@pytest.mark.slow  # transformers' import / subprocesses / a local HTTP Hub: seconds each
def test_cli_plan_and_inspect_show_fp8(models, tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n  - model: {models['ft1']}\n"
                   f"    parameters: {{weight: 1, density: 0.5}}\n  - model: {models['ct1']}\n    parameters: {{weight: 1, density: 0.5}}\n"
                   "dtype: bfloat16\nout_dtype: float8_e4m3fn\n")
    run = subprocess.run([sys.executable, "-m", "streammerge", "plan", str(cfg)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"{models['ft1']}: FP8" in run.stdout and "per channel" in run.stdout
    assert "0 tensors written as FP8" in run.stdout  # 192 x 320: no whole 128x128 blocks
    run = subprocess.run([sys.executable, "-m", "streammerge", "inspect", str(models["base"]), str(models["ft1"]),
                          str(models["ct1"]), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.slow  # transformers' import / subprocesses / a local HTTP Hub: seconds each
def test_fp8_repo_on_the_hub_merges_like_its_local_folder(models, tmp_path, fakehub):
    """An FP8 fine-tune as a Hub repo: config.json fetched for its quantization_config, the scales'
    shards scheduled with their weights', shards deleted after use."""
    fakehub.add_folder("org/ft1", models["ft1"])
    with Checkpoint(models["ft1"]) as local:  # some scale lies in another shard than its weight
        assert any(len(t.files) == 2 for t in local.tensors.values())
    merge(config_for("ties", models["base"], ["org/ft1", models["ft2"]]), tmp_path / "remote", delete_downloaded=True)
    merge(config_for("ties", models["base"], [models["ft1"], models["ft2"]]), tmp_path / "local")
    assert shard_hashes(tmp_path / "remote") == shard_hashes(tmp_path / "local")
