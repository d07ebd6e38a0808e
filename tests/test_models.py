"""Model loading: the embedded default loads; hub ids fail fast and clearly when the hub is out of reach."""
import time

import pytest

from backend.lm import models
from backend.lm.models import (
    HubUnreachableError,
    apply_lora,
    load_model_and_tokenizer,
    resolve_model_source,
    resolved_lora_targets,
)


def test_default_model_is_a_qwen2_with_lora_targets():
    model, tok = load_model_and_tokenizer("default", device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    peft_model = apply_lora(model, r=4, alpha=8, targets=["q_proj", "down_proj"])
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("down_proj" in n for n in names) and any("q_proj" in n for n in names)


def test_offline_hub_id_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        resolve_model_source("someorg/some-model-not-cached")
    assert time.perf_counter() - t < 5


def test_unreachable_hub_fails_with_a_clear_message(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: (False, "https://hub (no route)"))
    with pytest.raises(HubUnreachableError, match="not in the local cache and the hub is unreachable"):
        resolve_model_source("someorg/some-model-not-cached")


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_model_source(str(tmp_path))


def test_unknown_lora_target_lists_the_linear_modules():
    model, _ = load_model_and_tokenizer("default", device="cpu")
    with pytest.raises(ValueError, match=r"LoRA target modules \['qproj'\] not found.*q_proj"):
        apply_lora(model, targets=["qproj"])


@pytest.mark.parametrize("targets, want", [
    (["all-linear"], ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ([r"re:.*\.(q_proj|down_proj)"], ["down_proj", "q_proj"]),
    (["v_proj", "q_proj"], ["q_proj", "v_proj"])])
def test_lora_targets_as_peft_takes_them(targets, want):
    model, _ = load_model_and_tokenizer("default", device="cpu")
    assert resolved_lora_targets(apply_lora(model, targets=targets)) == want


def test_bad_lora_targets_list_what_lora_can_wrap_with_its_type():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"\['q_proj'\] not found.*c_attn \(Conv1D\).*c_fc \(Conv1D\).*c_proj"):
        apply_lora(gpt2, targets=["q_proj"])                  # GPT-2's Conv1D layers are not nn.Linear
    assert resolved_lora_targets(apply_lora(gpt2, targets=["c_attn", "c_proj"])) == ["c_attn", "c_proj"]
    model, _ = load_model_and_tokenizer("default", device="cpu")
    with pytest.raises(ValueError, match=r"match no module.*q_proj \(Linear\)"):
        apply_lora(model, targets=["re:.*zzz"])
    for bad, msg in ((["all-linear", "q_proj"], "only entry"), (["re:("], "not a regular expression")):
        with pytest.raises(ValueError, match=msg):
            apply_lora(model, targets=bad)


def test_bad_dtype_and_attention():
    with pytest.raises(ValueError, match="dtype 'fp8' is not supported"):
        load_model_and_tokenizer("default", dtype="fp8", device="cpu")
    with pytest.raises(ValueError, match="attn_implementation 'magic' is not supported"):
        load_model_and_tokenizer("default", attn_implementation="magic", device="cpu")
