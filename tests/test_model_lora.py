"""mergekit's `model+lora` references: the model with a PEFT LoRA adapter applied (W + s·B·A), checked
against PEFT's own merge_and_unload on a tiny transformers Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from streammerge import CheckpointError, ConfigError, MergeConfig, ModelSpec, merge
from streammerge.constants import SAFETENSORS_INDEX
from streammerge.front.cli import main
from streammerge.io.lora import split_model_lora

# transformers' own FutureWarning while PEFT wraps the model (is_gradient_checkpointing): not ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _load(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / SAFETENSORS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lora(request, tmp_path_factory):
    """model/ (a tiny Llama), lora/ (a PEFT adapter on three of its modules, B non-zero), and PEFT's
    merge_and_unload of the two (the reference), all in one dtype."""
    dtype = getattr(torch, request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(root / "model", safe_serialization=True)
    lora_config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapted = peft.get_peft_model(model, lora_config)
    with torch.no_grad():  # PEFT's random B is tiny: make the product large enough to matter in every dtype
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted.save_pretrained(root / "lora", safe_serialization=True)
    merged = adapted.merge_and_unload()
    reference = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return root, reference, dtype


def _passthrough(root: Path, source: str, out: Path) -> dict[str, torch.Tensor]:
    cfg = MergeConfig(method="passthrough", models=(ModelSpec(source),), base_dir=str(root))
    merge(cfg, out)
    return _load(out)


def test_model_plus_lora_is_peft_merge_and_unload(lora, tmp_path):
    root, reference, dtype = lora
    got = _passthrough(root, "model+lora", tmp_path / "out")
    assert set(got) == set(reference)
    plain = load_file(root / "model" / "model.safetensors")
    adapted = [n for n in got if any(m in n for m in ("q_proj", "v_proj", "down_proj"))]
    assert len(adapted) == 6
    factors = load_file(root / "lora" / "adapter_model.safetensors")
    scaling = 12 / 4
    eps = torch.finfo(dtype).eps
    for name, tensor in got.items():
        assert tensor.dtype == dtype
        if name in adapted:
            assert not torch.equal(tensor, plain[name])  # the adapter changed it
            key = "base_model.model." + name.removesuffix(".weight")
            a, b = factors[key + ".lora_A.weight"].double(), factors[key + ".lora_B.weight"].double()
            w = plain[name].double()
            # W + τ, τ = s·B·A rounded to float32 (twice: the sum, the scaling), the sum rounded once to the dtype
            tau = scaling * (b @ a)
            exact = w + tau
            bound = eps / 2 * exact.abs() + 2 ** -23 * tau.abs() * 1.01
            assert ((tensor.double() - exact).abs() <= bound).all(), name
            # PEFT sums the product in float32 (bf16: rounds τ to bf16, then adds in bf16): within a few ulps of its terms
            terms = w.abs() + scaling * (b.abs() @ a.abs())
            assert ((tensor.double() - reference[name].double()).abs() <= 4 * eps * terms).all(), name
        else:
            assert torch.equal(tensor, reference[name]), name  # untouched: the model's bytes


def test_model_plus_lora_in_a_merge_and_from_the_cli(lora, tmp_path):
    """As a fine-tune of its own model (task_arithmetic, weight 1, no rescale): the adapted weights again."""
    root, reference, dtype = lora
    (root / "ta.yaml").write_text("merge_method: task_arithmetic\nbase_model: model\nmodels:\n"
                                  "  - model: model+lora\n    parameters: {weight: 1.0}\n")
    out = tmp_path / "ta"
    result = CliRunner().invoke(main, ["merge", str(root / "ta.yaml"), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    got, passthrough = _load(out), _passthrough(root, "model+lora", tmp_path / "pt")
    for name, tensor in got.items():
        ulp = torch.finfo(dtype).eps * passthrough[name].float().abs().clamp_min(1e-3)
        assert ((tensor.float() - passthrough[name].float()).abs() <= ulp).all(), name
    manifest = json.loads((out / "streammerge_manifest.json").read_text())
    assert manifest["config"]["models"][0]["model"] == "model+lora"


def test_model_plus_lora_errors(tmp_path, lora):
    root, _, _ = lora
    assert split_model_lora("org/a+org/b") == ("org/a", "org/b")
    assert split_model_lora(str(root / "model")) is None
    with pytest.raises(ConfigError, match="one model, '\\+', one LoRA adapter"):
        split_model_lora("a+b+c")
    with pytest.raises(CheckpointError, match="is not a LoRA adapter"):
        _passthrough(root, "model+model", tmp_path / "o1")
    with pytest.raises(CheckpointError, match="in model\\+lora the model before '\\+' is a full checkpoint"):
        _passthrough(root, "lora+lora", tmp_path / "o2")


def test_a_changed_adapter_is_another_merge(lora, tmp_path):
    """The adapter is part of the inputs' identity: a finished merge with another adapter is not taken as done."""
    import shutil

    root, _, _ = lora
    work = tmp_path / "w"
    shutil.copytree(root / "model", work / "model")
    shutil.copytree(root / "lora", work / "lora")
    out = tmp_path / "out"
    _passthrough(work, "model+lora", out)
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    (work / "lora" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3}))
    with pytest.raises(Exception, match="holds a different merge"):
        _passthrough(work, "model+lora", out)
