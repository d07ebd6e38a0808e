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
import re
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


def wrappable_modules(model: torch.nn.Module) -> dict[str, str]:
    """Last name -> layer type of every module peft's LoRA can wrap (Linear, transformers' Conv1D as in GPT-2,
    Embedding, Conv1d/2d/3d), the lm_head aside: what a target may name."""
    from transformers.pytorch_utils import Conv1D
    kinds = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    out: dict[str, str] = {}
    for n, m in model.named_modules():
        if isinstance(m, kinds) and n and n.rsplit(".", 1)[-1] != "lm_head":
            out.setdefault(n.rsplit(".", 1)[-1], type(m).__name__)
    return out


def lora_target_spec(targets: tuple[str, ...] | list[str]) -> str | list[str]:
    """What peft's ``target_modules`` gets: ``["all-linear"]`` -> "all-linear" (peft's shorthand: every linear
    layer but the output head), ``["re:PATTERN"]`` -> the regex PATTERN (peft matches it against full module
    names), else the list of module names."""
    targets = list(targets)
    if targets == ["all-linear"]:
        return "all-linear"
    if len(targets) == 1 and targets[0].startswith("re:"):
        pattern = targets[0][3:]
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"lora_targets {targets[0]!r}: not a regular expression ({e})") from None
        return pattern
    bad = [t for t in targets if t == "all-linear" or t.startswith("re:")]
    if bad:
        raise ValueError(f"lora_targets {bad} must be the only entry (all-linear, or one re:PATTERN)")
    return targets


def apply_lora(model, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS):
    """Wrap ``model`` in a peft LoRA model. ``targets``: module names, ``["all-linear"]`` or ``["re:PATTERN"]``
    (``lora_target_spec``); a name that matches no module, or a pattern that matches none, raises ValueError
    listing every module peft can wrap with its layer type. ``resolved_lora_targets(model)`` says what got
    adapters."""
    from peft import LoraConfig, get_peft_model
    spec = lora_target_spec(targets)
    wrappable = wrappable_modules(model)
    listing = ", ".join(f"{n} ({k})" for n, k in sorted(wrappable.items()))
    if isinstance(spec, list):
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in spec if t not in names]
        if missing:
            raise ValueError(f"LoRA target modules {missing} not found in the model; modules LoRA can wrap: "
                             f"{listing}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=spec, task_type="CAUSAL_LM",
                     bias="none", fan_in_fan_out=any(k == "Conv1D" for k in wrappable.values()))
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        if "not found in the base model" not in str(e) and "did not match" not in str(e):
            raise
        raise ValueError(f"LoRA targets {list(targets)} match no module of the model; modules LoRA can wrap: "
                         f"{listing}") from None


def resolved_lora_targets(model: torch.nn.Module) -> list[str]:
    """The last names of the modules a peft LoRA model adapted (what all-linear or a pattern resolved to)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")})
