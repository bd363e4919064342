"""extract-lora: a PEFT adapter from a fine-tune and its base (streammerge/pipeline/extract.py,
streammerge/methods/lowrank.py), loaded by PEFT onto a tiny transformers Llama."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streammerge.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_DIR
from streammerge.errors import ConfigError, MismatchError, OutputError
from streammerge.front.cli import main
from streammerge.methods import lowrank
from streammerge.pipeline.extract import ExtractOptions, extract_lora

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LOW_RANK = 3  # the rank of every weight's change in the fine-tune built here


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base/ (a tiny float32 Llama) and ft/: every linear weight + an exact rank-3 B·A, one norm and the
    embeddings changed too (stored whole by default)."""
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=80, max_position_embeddings=64, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base", safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for name, w in sd.items():
        if w.dim() == 2 and "embed" not in name and "lm_head" not in name:
            b = torch.randn(w.shape[0], LOW_RANK, generator=gen) * 0.05
            a = torch.randn(LOW_RANK, w.shape[1], generator=gen) * 0.05
            w += b @ a
    sd["model.layers.1.input_layernorm.weight"] += 0.01
    sd["model.embed_tokens.weight"][:5] += 0.02
    sd["lm_head.weight"][:, :3] -= 0.02
    ft = transformers.LlamaForCausalLM(config)
    ft.load_state_dict(sd)
    ft.save_pretrained(root / "ft", safe_serialization=True)
    return root, config, sd


def _peft_model(root: Path, adapter: Path):
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter)


def test_exact_low_rank_comes_back_and_peft_loads_it(models, tmp_path):
    root, config, sd = models
    out = tmp_path / "adapter"
    # float32 storage leaves rounding noise (~1e-7 relative) beyond rank 3: the energy rule drops it
    result = extract_lora(str(root / "ft"), out, base=str(root / "base"), options=ExtractOptions(max_rank=8, energy=1 - 1e-9))
    lora = [t for t in result.tensors if t.kind == "lora"]
    assert len(lora) == 14 and all(t.rank == LOW_RANK for t in lora)  # rank 3 found where 8 were allowed
    assert max(t.error for t in lora) < 1e-6  # float32 precision
    config_json = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config_json["r"] == LOW_RANK and config_json["lora_alpha"] == LOW_RANK and not config_json["rank_pattern"]
    assert sorted(config_json["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config_json["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.1.input_layernorm"]
    model = _peft_model(root, out)
    merged = model.merge_and_unload().state_dict()
    for name, w in sd.items():
        torch.testing.assert_close(merged[name], w, rtol=0, atol=2e-6, msg=name)
    ids = torch.arange(20).view(2, 10)
    want = transformers.LlamaForCausalLM(config)
    want.load_state_dict(sd)
    torch.testing.assert_close(_peft_model(root, out)(ids).logits, want(ids).logits, rtol=0, atol=1e-4)


def test_embed_lora_randomized_and_bytes_invariant(models, tmp_path):
    """--embed-lora factors embeddings (lora_embedding_A/B) and lm_head; the randomized SVD gives the
    same bytes with any memory budget and thread count, and PEFT applies what it wrote."""
    root, config, sd = models
    opts = ExtractOptions(max_rank=6, embed_lora=True, svd="randomized", seed=3, energy=1 - 1e-9)
    one = extract_lora(str(root / "ft"), tmp_path / "a", base=str(root / "base"), options=opts, max_memory=1 << 30)
    threads = torch.get_num_threads()
    try:
        extract_lora(str(root / "ft"), tmp_path / "b", base=str(root / "base"), options=opts, max_memory=4 << 20, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert _sha(tmp_path / "a" / ADAPTER_WEIGHTS) == _sha(tmp_path / "b" / ADAPTER_WEIGHTS)
    kinds = {t.name: t for t in one.tensors}
    assert kinds["model.embed_tokens.weight"].kind == "embedding" and kinds["model.embed_tokens.weight"].rank == 1
    assert kinds["model.layers.0.self_attn.q_proj.weight"].method == "randomized"
    assert kinds["model.layers.0.self_attn.q_proj.weight"].error < 1e-6
    weights = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert weights["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (1, 80)
    assert weights["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (48, 1)
    merged = _peft_model(root, tmp_path / "a").merge_and_unload().state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(merged[name], sd[name], rtol=0, atol=2e-6, msg=name)


def test_truncation_error_matches_exact_svd():
    """A full-rank τ truncated to rank k: the reported error is the best rank-k error (Eckart-Young),
    and the randomized factors come within 1 % of it."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 60, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 60, generator=gen, dtype=torch.float64))
    s = 0.8 ** torch.arange(60, dtype=torch.float64)
    tau = u @ torch.diag(s) @ v.T
    read = lambda r0, r1: tau[r0:r1]  # noqa: E731
    best = float((s[10:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    exact = lowrank.exact_svd(tau, lowrank.RankRule(10))
    a, b = lowrank.lora_factors(exact)
    assert lowrank.relative_error(read, (300, 200), a, b, exact.norm_sq) == pytest.approx(best, rel=1e-9)
    rand = lowrank.randomized_svd(read, (300, 200), lowrank.RankRule(10), seed=1)
    a, b = lowrank.lora_factors(rand)
    assert lowrank.relative_error(read, (300, 200), a, b, rand.norm_sq) < best * 1.01
    # energy: the fewest components holding 90 % of ||τ||²; sv_epsilon: σ > ε only
    k90 = int((torch.cumsum(s ** 2, 0) / (s ** 2).sum() < 0.9).sum()) + 1
    assert len(lowrank.exact_svd(tau, lowrank.RankRule(50, energy=0.9)).s) == k90
    assert len(lowrank.exact_svd(tau, lowrank.RankRule(50, sv_epsilon=0.5)).s) == int((s > 0.5).sum())


def test_cli_json_table_rerun_force(models, tmp_path):
    root, _, _ = models
    out = tmp_path / "cli"
    args = ["extract-lora", str(root / "ft"), str(out), "--base", str(root / "base"), "--energy", "0.999999999", "--rank", "4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "model.layers.0.mlp.down_proj.weight" in r.output and "rel. error" in r.output
    sha = _sha(out / ADAPTER_WEIGHTS)
    r = CliRunner().invoke(main, [*args, "--json"])
    summary = json.loads(r.stdout)
    assert r.exit_code == 0 and summary["already_complete"] and summary["max_rank_used"] == LOW_RANK
    assert {t["name"]: t["rank"] for t in summary["tensors"]}["model.layers.0.self_attn.q_proj.weight"] == LOW_RANK
    r = CliRunner().invoke(main, [*args[:-1], "2"])  # other options: refused without --force
    assert r.exit_code == 1 and "holds a different extraction" in r.stderr
    r = CliRunner().invoke(main, [*args[:-1], "2", "--force", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["max_rank_used"] == 2
    assert _sha(out / ADAPTER_WEIGHTS) != sha and not (out / STATE_DIR).exists()
    # mergekit's spelling of the same command
    r = CliRunner().invoke(main, ["extract-lora", "--model", str(root / "ft"), "--base-model", str(root / "base"),
                                  "--out-path", str(tmp_path / "mk"), "--energy", "0.999999999", "--max-rank", "4", "--no-lazy-unpickle", "-q"])
    assert r.exit_code == 0, r.output
    assert _sha(tmp_path / "mk" / ADAPTER_WEIGHTS) == sha


def test_resume_after_a_failure_leaves_nothing_complete(models, tmp_path, monkeypatch):
    import streammerge.pipeline.extract as ex

    root, _, _ = models
    out = tmp_path / "resume"
    real, calls = ex._extract_one, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "_extract_one", dies)
    with pytest.raises(KeyboardInterrupt):
        extract_lora(str(root / "ft"), out, base=str(root / "base"), options=ExtractOptions(max_rank=4))
    assert not (out / ADAPTER_CONFIG).exists() and not (out / ADAPTER_WEIGHTS).exists()
    monkeypatch.setattr(ex, "_extract_one", real)
    again = extract_lora(str(root / "ft"), out, base=str(root / "base"), options=ExtractOptions(max_rank=4))
    assert again.reused == 4
    fresh = extract_lora(str(root / "ft"), tmp_path / "fresh", base=str(root / "base"), options=ExtractOptions(max_rank=4))
    assert _sha(out / ADAPTER_WEIGHTS) == _sha(fresh.output_dir / ADAPTER_WEIGHTS)


def test_bad_inputs_one_line(models, tmp_path):
    root, _, sd = models
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((root / "ft" / "config.json").read_text())
    broken = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    broken["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    broken["extra.weight"] = torch.zeros(3, 3)
    save_file(broken, bad / "model.safetensors")
    with pytest.raises(MismatchError) as e:
        extract_lora(str(root / "ft"), tmp_path / "o1", base=str(bad))
    assert "model.norm.weight: in the fine-tune but not in the base" in str(e.value)
    r = CliRunner().invoke(main, ["extract-lora", str(bad), str(tmp_path / "o2"), "--base", str(root / "base")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "model.layers.0.mlp.up_proj.weight: shape [5, 5] in the fine-tune but [96, 48] in the base" in r.stderr
    with pytest.raises(MismatchError, match="not a 2-D weight"):
        extract_lora(str(root / "ft"), tmp_path / "o3", base=str(root / "base"), options=ExtractOptions(include=("norm",)))
    with pytest.raises(ConfigError, match="needs .* MiB; raise --max-memory"):
        extract_lora(str(root / "ft"), tmp_path / "o4", base=str(root / "base"), max_memory=1000,
                     options=ExtractOptions(svd="randomized"))
    assert not (tmp_path / "o4" / ADAPTER_CONFIG).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a streammerge extraction"):
        extract_lora(str(root / "ft"), foreign, base=str(root / "base"), force=True)
    r = CliRunner().invoke(main, ["extract-lora", str(root / "ft"), str(tmp_path / "o5"), "--base", str(root / "nope"), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu_within_rounding(models, tmp_path):
    root, _, _ = models
    opts = ExtractOptions(max_rank=4, svd="randomized")
    cpu = extract_lora(str(root / "ft"), tmp_path / "cpu", base=str(root / "base"), options=opts, device="cpu")
    gpu = extract_lora(str(root / "ft"), tmp_path / "gpu", base=str(root / "base"), options=opts, device="cuda")
    for c, g in zip(cpu.tensors, gpu.tensors):
        assert c.rank == g.rank and abs(c.error - g.error) < 1e-6


def test_hub_inputs_and_push(models, tmp_path, monkeypatch, fakehub):
    """Hub ids as FINETUNE and --base (the merge's machinery), and --push-to-hub of the finished adapter."""
    root, _, _ = models
    monkeypatch.setenv("HF_TOKEN", fakehub.token)
    fakehub.add_folder("org/base", root / "base")
    fakehub.add_folder("org/ft", root / "ft")
    out = tmp_path / "hub"
    r = CliRunner().invoke(main, ["extract-lora", "org/ft", str(out), "--base", "org/base", "--rank", "4", "-q",
                                  "--push-to-hub", "me/adapter"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/base"
    local = extract_lora(str(root / "ft"), tmp_path / "local", base=str(root / "base"), options=ExtractOptions(max_rank=4))
    assert _sha(out / ADAPTER_WEIGHTS) == _sha(local.output_dir / ADAPTER_WEIGHTS)
    pushed = fakehub.files("me/adapter")
    for p in out.iterdir():
        assert pushed[p.name] == p.read_bytes(), p.name


def test_float64_checkpoints_are_read_not_written(tmp_path):
    # A float64 row block widened "to float64" on the CPU is the mapped, read-only file itself:
    # τ must be computed in a copy (this crashed with SIGSEGV).
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    ft = base + torch.randn(32, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 16, generator=gen, dtype=torch.float64)
    for name, w in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.self_attn.q_proj.weight": w.clone()}, tmp_path / name / "model.safetensors")
    result = extract_lora(str(tmp_path / "ft"), tmp_path / "out", base=str(tmp_path / "base"), options=ExtractOptions(max_rank=4))
    assert [t.kind for t in result.tensors] == ["lora"]
    assert torch.equal(load_file(tmp_path / "ft" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"], ft)
