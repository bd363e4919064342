"""`streammerge moe` against mergekit-moe 0.1.5 (fixtures by benchmarks/mergekit/make_moe_fixtures.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from streammerge.errors import ConfigError, MismatchError
from streammerge.front.cli import main
from streammerge.front.moe import build_moe
from streammerge.front.moe_config import MoEConfig

FIX = Path(__file__).parent / "fixtures" / "mergekit_moe"
SEEDS = {"random": 7}  # the --random-seed the fixture was made with


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out |= {k: s.get_tensor(k) for k in s.keys()}
    return out


def config(name: str, **changes) -> MoEConfig:
    cfg = MoEConfig.from_yaml(FIX / "configs" / f"{name}.yaml")
    return MoEConfig(**{**cfg.__dict__, "base_dir": str(FIX / "inputs"), **changes})


def build(name: str, out: Path, **kw):
    return build_moe(config(name), out, seed=SEEDS.get(name, 0), **kw)


@pytest.mark.parametrize("name", ["cheap_embed", "random", "hidden", "qwen_cheap_embed", "qwen3_cheap_embed"])
def test_same_as_mergekit(tmp_path, name):
    build(name, tmp_path / "out")
    ours, theirs = load(tmp_path / "out"), load(FIX / "outputs" / name)
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape, k
        if name == "hidden" and k.endswith("mlp.gate.weight"):
            # bf16 forward passes, ours layer by layer: close (on this machine they came out equal)
            assert torch.allclose(ours[k].float(), t.float(), atol=2e-2), k
        else:
            assert torch.equal(ours[k], t), k
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((FIX / "outputs" / name / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (FIX / "outputs" / name / "tokenizer.json").read_text()
    ours_tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    theirs_tc = json.loads((FIX / "outputs" / name / "tokenizer_config.json").read_text())
    ours_tc.pop("local_files_only"), theirs_tc.pop("local_files_only")  # HF_HUB_OFFLINE at load time
    assert ours_tc == theirs_tc
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == (FIX / "configs" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", ["cheap_embed", "qwen_cheap_embed", "qwen3_cheap_embed"])
def test_transformers_loads_and_runs(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    build(name, tmp_path / "out")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = {"cheap_embed": "MixtralForCausalLM", "qwen_cheap_embed": "Qwen2MoeForCausalLM",
                "qwen3_cheap_embed": "Qwen3MoeForCausalLM"}[name]
    assert type(model).__name__ == expected
    # every tensor loaded as written (Qwen2-MoE's per-expert tensors are fused on load: checked by the keys above)
    written = load(tmp_path / "out")
    state = model.state_dict()
    for k, t in written.items():
        assert k not in state or torch.equal(state[k], t), k
    assert sum(k in state for k in written) >= 21
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = tok(["<s>ab cd e", "<s>i j"], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 24) and torch.isfinite(logits).all()


def test_row_blocks_and_shards_give_the_same_bytes(tmp_path):
    cfg = config("cheap_embed", experts=tuple(
        type(e)(**{**e.__dict__, "noise_scale": 0.01}) if i == 0 else e for i, e in enumerate(config("cheap_embed").experts)))
    build_moe(cfg, tmp_path / "a")
    # one expert per block, a shard per few tensors: the same tensors, bit for bit
    build_moe(cfg, tmp_path / "b", max_memory=4096, max_shard_size=3000)
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 3
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the noise is seeded: reproducible, and only on expert 0
    ref = load(FIX / "outputs" / "cheap_embed")
    gu = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(a[gu][0], ref[gu][0]) and torch.equal(a[gu][1:], ref[gu][1:])


def test_resume_after_interruption(tmp_path):
    whole = tmp_path / "whole"
    build("cheap_embed", whole, max_shard_size=3000)
    out = tmp_path / "out"
    seen = []

    def stop(path):
        seen.append(path)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build("cheap_embed", out, max_shard_size=3000, on_shard_file=stop)
    assert not (out / "model.safetensors.index.json").exists()
    result = build("cheap_embed", out, max_shard_size=3000)
    assert result.reused_shards == 2 and not result.already_complete
    for f in whole.glob("*.safetensors"):
        assert f.read_bytes() == (out / f.name).read_bytes()
    again = build("cheap_embed", out, max_shard_size=3000)
    assert again.already_complete
    with pytest.raises(Exception, match="holds a different merge"):
        build_moe(config("cheap_embed", experts_per_token=1), out)
    assert build_moe(config("cheap_embed", experts_per_token=1), out, force=True).shards


def test_cli_json_and_one_line_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["moe", str(FIX / "configs" / "random.yaml"), str(tmp_path / "x"), "--json", "--random-seed", "7",
                               "--quiet", "--cuda", "--lazy-unpickle"], catch_exceptions=False, env={"HF_HUB_OFFLINE": "1"})
    # relative model paths resolve against the YAML's folder: configs/ has no models, so the error names one
    assert res.exit_code == 1
    err = [line for line in res.output.splitlines() if line.startswith("streammerge: error:")]
    assert len(err) == 1 and "base" in err[0]
    cfg = tmp_path / "random.yaml"
    text = (FIX / "configs" / "random.yaml").read_text()
    for m in ("base", "e1", "e2", "e3"):
        text = text.replace(f": {m}\n", f": {FIX / 'inputs' / m}\n")
    cfg.write_text(text)
    res = runner.invoke(main, ["moe", str(cfg), str(tmp_path / "x"), "--json", "--random-seed", "7", "--quiet"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["ok"] and summary["tensors"] == 21
    ours, theirs = load(tmp_path / "x"), load(FIX / "outputs" / "random")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"experts\[1\].*no positive_prompts"):
        cfg = config("cheap_embed")
        experts = list(cfg.experts)
        experts[1] = type(experts[1])(experts[1].source_model)
        build_moe(MoEConfig(**{**cfg.__dict__, "experts": tuple(experts)}), tmp_path / "o")
    with pytest.raises(ConfigError, match="gate_mode: 'magic'"):
        MoEConfig.from_dict({"base_model": "b", "experts": [{"source_model": "x"}], "gate_mode": "magic"})
    with pytest.raises(ConfigError, match="experts_per_token: 3 but only 1"):
        MoEConfig.from_dict({"base_model": "b", "experts": [{"source_model": "x"}], "experts_per_token": 3})
    with pytest.raises(ConfigError, match="same model"):
        build_moe(config("random", experts=tuple(type(e)("e1") for e in config("random").experts)), tmp_path / "o")
    # Qwen2 experts without a shared expert: mergekit has no output for them either
    with pytest.raises(ConfigError, match="no MoE output architecture fits.*qwen2"):
        build_moe(config("qwen_cheap_embed", shared_experts=()), tmp_path / "o")
    # a shared expert without prompts: mergekit makes a DeepSeek MoE, refused by name
    with pytest.raises(ConfigError, match="DeepSeek"):
        build_moe(config("random", shared_experts=(type(config("random").experts[0])("e1"),)), tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written before the checks


def test_expert_of_another_shape(tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(FIX / "inputs" / "e1", odd)
    from safetensors.torch import save_file

    tensors = load(odd)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 16, dtype=torch.bfloat16)
    save_file(tensors, str(odd / "model.safetensors"))
    cfg = config("random")
    experts = (type(cfg.experts[0])(str(odd)), *cfg.experts[1:])
    with pytest.raises(MismatchError, match=r"experts\[0\].*model.layers.1.mlp.up_proj.weight.*\[8, 16\]"):
        build_moe(MoEConfig(**{**cfg.__dict__, "experts": experts}), tmp_path / "o")


def test_live_bytes_waits_for_the_writer():
    import threading
    import time

    from streammerge.pipeline.moe import LiveBytes

    live = LiveBytes(limit=100, patience=5.0)
    held = [live.track(torch.zeros(25, dtype=torch.uint8)) for _ in range(4)]  # 100 bytes: at the limit
    assert live.live == 100
    writer = threading.Timer(0.3, lambda: held.clear())  # the writer frees them
    writer.start()
    t0 = time.monotonic()
    new = live.track(torch.zeros(25, dtype=torch.uint8))  # goes on once the first of them is freed
    assert 0.2 < time.monotonic() - t0 < 4
    writer.join()  # the other three are freed by then
    assert live.live == 25
    del new
    assert live.live == 0


def test_split_over_workers_gives_the_same_bytes(tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "split"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text((FIX / "configs" / "qwen3_cheap_embed.yaml").read_text()
                        .replace("q3base", str(FIX / "inputs" / "q3base")).replace("q3e", str(FIX / "inputs" / "q3e")))
    runner = CliRunner()
    r = runner.invoke(main, ["moe", str(cfg_path), str(whole), "--max-shard-size", "3000"])
    assert r.exit_code == 0, r.output
    for rank in (1, 0):
        r = runner.invoke(main, ["moe", str(cfg_path), str(out), "--max-shard-size", "3000", "--rank", str(rank),
                                 "--world-size", "2"])
        assert r.exit_code == 0, r.output
        assert "streammerge finalize" in r.output
        assert not (out / "model.safetensors.index.json").exists()
    r = runner.invoke(main, ["finalize", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in whole.iterdir() if p.is_file() and p.name != "README.md")
    assert len([n for n in names if n.endswith(".safetensors")]) > 3
    assert names == sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "README.md")
    for n in names:
        if n != "streammerge_manifest.json":
            assert (whole / n).read_bytes() == (out / n).read_bytes(), n
    # a rerun of a worker on the finished output does nothing
    r = runner.invoke(main, ["moe", str(cfg_path), str(out), "--max-shard-size", "3000", "--rank", "1", "--world-size", "2"])
    assert r.exit_code == 0, r.output
