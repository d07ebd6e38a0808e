"""Load a causal LM and its tokenizer (the embedded default, a local directory, or a hub id) and add LoRA.

    model, tok = load_model_and_tokenizer("default")                 # data/models/tiny-arith, CPU, float32
    model, tok = load_model_and_tokenizer("Qwen/Qwen2.5-1.5B", dtype="bf16", device="cuda")
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])

A hub id that is not in the local cache fails at once with a clear message when the hub is unreachable or
``HF_HUB_OFFLINE`` is set: we never wait on a network that is not there. ``trust_remote_code`` is off unless
the caller asks for it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from backend.store import paths

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
NAMED_MODELS = {"default": paths.DEFAULT_MODEL_DIR, "tiny-arith": paths.DEFAULT_MODEL_DIR,
                "tiny-modadd": paths.MODADD_MODEL_DIR}


class HubUnreachableError(RuntimeError):
    """A hub id was asked for, it is not cached locally, and the hub cannot be reached."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available; use 'cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True, endpoint
    except OSError as e:
        return False, f"{endpoint} ({type(e).__name__}: {e})"


def resolve_model_source(name: str) -> tuple[str, bool]:
    """(path or hub id, is_local). Raises a clear error for a missing path or an unreachable hub."""
    if name in NAMED_MODELS:
        p = NAMED_MODELS[name]
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"the embedded model {name!r} is missing at {p}; "
                                    "rebuild it with `python -m backend build-demo-model`")
        return str(p), True
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ValueError(f"model path {p} exists but holds no config.json (not a saved transformers model)")
        return str(p.resolve()), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    # A hub id: use the cache if it has it, else insist on a reachable hub.
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return name, False
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise HubUnreachableError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                  "set; download it first, pass a local directory, or use 'default'")
    ok, where = _hub_reachable()
    if not ok:
        raise HubUnreachableError(f"model {name!r} is not in the local cache and the hub is unreachable: {where}. "
                                  "Pass a local directory or use the embedded default ('default').")
    return name, False


def load_tokenizer(name: str = "default", trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    src, local = resolve_model_source(name)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code,
                                        local_files_only=local or None)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(name: str = "default", dtype: str = "auto", device: str = "auto",
                             attn_implementation: str = "auto", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer. See the module docstring."""
    from transformers import AutoModelForCausalLM
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {attn_implementation!r} is not supported; "
                         f"allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    dev = resolve_device(device)
    src, local = resolve_model_source(name)
    kwargs = dict(dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code)
    if local:
        kwargs["local_files_only"] = True
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs).to(dev)
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    return model, tok


def apply_lora(model, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS):
    """Wrap ``model`` in a peft LoRA model; every target name must match at least one module."""
    from peft import LoraConfig, get_peft_model
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"LoRA target modules {missing} not found in the model; linear modules: {', '.join(linear)}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)
