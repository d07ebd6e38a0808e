"""Where the traced parameters live: every LoRA matrix of a peft model, found by module name.

    sites = discover_lora_modules(model)                       # Qwen2, Llama, any peft LoRA on nn.Linear
    sites[0].name    # 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default'
    sites[0].layer, sites[0].module, sites[0].part             # 0, 'q_proj', 'lora_A'

A *site* is one ``nn.Linear`` (lora_A or lora_B of one adapted module): y = W u, its gradient is
sum_s g_s u_s^T with u_s its input (after the LoRA dropout, for lora_A) and g_s the gradient at its output
(which already carries the LoRA scaling alpha/r, for lora_B). Names are the module paths of
``named_modules()`` of the unwrapped model, so hooks and saved adapter tensors use the same names.
"""
from __future__ import annotations

import dataclasses
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_SITE = re.compile(r"^(?P<parent>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)$")


@dataclass(frozen=True)
class LoraSite:
    """One LoRA matrix: ``layer`` (-1 outside the decoder stack), ``module`` (q_proj ...), ``part``."""
    layer: int
    module: str
    part: str
    linear: nn.Linear
    name: str
    parent: nn.Module = field(repr=False, compare=False, default=None)   # the peft LoRA layer (q_proj ...)

    @property
    def param(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def param_name(self) -> str:
        return self.name + ".weight"

    def __iter__(self):
        """Unpacks as (layer, module, part, linear)."""
        return iter((self.layer, self.module, self.part, self.linear))


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[LoraSite]]]" = weakref.WeakKeyDictionary()


def discover_lora_modules(model: nn.Module, targets: tuple[str, ...] | list[str] | None = None) -> list[LoraSite]:
    """Every active LoRA matrix of ``model`` (a peft model, possibly DDP-wrapped), in module order.

    ``targets`` keeps only the named modules (``q_proj``, ``down_proj``, ...); a name that matches no LoRA
    module raises ValueError listing the ones there are. Raises ValueError for a model without LoRA, merged
    adapters, LoRA variants (DoRA ...) whose update is not B A u, and frozen LoRA weights.

    The walk over the modules is cached per model, keyed by its adapters, active adapters and merge state (what
    peft changes when adapters are added, switched or merged).
    """
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    active = getattr(model, "active_adapters", ())
    key = (tuple(targets) if targets is not None else None, tuple(getattr(model, "peft_config", {}) or {}),
           tuple(active) if not callable(active) else ())       # transformers' own method on a plain model
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key and all(s.param.requires_grad and not _merged(s) for s in hit[1]):
        return list(hit[1])
    sites = _discover(model, targets)
    _CACHE[model] = (key, sites)
    return list(sites)


def _merged(site: LoraSite) -> bool:
    return bool(getattr(site.parent, "merged", False))


def _discover(model: nn.Module, targets) -> list[LoraSite]:
    modules = dict(model.named_modules())
    sites: list[LoraSite] = []
    for name, mod in modules.items():
        m = _SITE.match(name)
        if m is None or not isinstance(mod, nn.Linear):
            continue
        parent = modules[m["parent"]]
        active = getattr(parent, "active_adapters", None) or []
        if m["adapter"] not in active:
            continue
        if getattr(parent, "merged", False):
            raise ValueError(f"{m['parent']}: the adapter is merged into the base weights; unmerge it to trace")
        if m["adapter"] in (getattr(parent, "lora_variant", None) or {}):
            raise ValueError(f"{m['parent']}: LoRA variant {type(parent.lora_variant[m['adapter']]).__name__} "
                             "(e.g. DoRA) is not supported: the tracer needs the plain update B A u")
        if not mod.weight.requires_grad:
            raise ValueError(f"{name}.weight does not require grad: the traced parameters must be trainable")
        layer = _LAYER.search("." + name + ".")
        sites.append(LoraSite(layer=int(layer.group(1)) if layer else -1, module=m["parent"], part=m["part"],
                              linear=mod, name=name, parent=parent))
    if not sites:
        raise ValueError("the model has no active LoRA modules (lora_A/lora_B nn.Linear); apply peft LoRA first")
    names = module_names([s.module for s in sites])
    sites = [dataclasses.replace(s, module=names[s.module]) for s in sites]
    if targets is not None:                      # a label (attn.c_proj) or a last name (c_proj: every such module)
        found = sorted({s.module for s in sites} | {s.module.rsplit(".", 1)[-1] for s in sites})
        missing = [t for t in targets if t not in found]
        if missing:
            raise ValueError(f"target_modules {missing} have no LoRA adapter; LoRA modules: {', '.join(found)}")
        sites = [s for s in sites if s.module in targets or s.module.rsplit(".", 1)[-1] in targets]
    return sites


def module_names(paths: list[str]) -> dict[str, str]:
    """The ``module`` label of each LoRA-wrapped module path: its last name (``q_proj``) where that names one
    module per decoder block, else its path inside the block (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``, which
    a last name would merge into one label), the same label in every layer."""
    def in_block(path: str) -> str:
        m = _LAYER.search("." + path + ".")
        return ("." + path + ".")[m.end():-1] if m else path
    by_short: dict[str, set[str]] = {}
    for p in paths:
        by_short.setdefault(p.rsplit(".", 1)[-1], set()).add(in_block(p))
    return {p: p.rsplit(".", 1)[-1] if len(by_short[p.rsplit(".", 1)[-1]]) == 1 else in_block(p) for p in paths}


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable LoRA tensor of ``model`` by parameter name (what ``save_step_state`` stores)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def sketch_direction(shapes: list[torch.Size], seed: int, i: int, device: torch.device | str) -> list[torch.Tensor]:
    """Random direction ``i`` of a sketch: one standard normal tensor per traced matrix (``shapes``), float32.

    Drawn from a generator seeded with (seed, i) on ``device``, so direction i does not depend on how the
    directions are batched, and ``verify`` regenerates it on the same device type.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + i)
    return [torch.randn(shape, generator=gen, device=device, dtype=torch.float32) for shape in shapes]
