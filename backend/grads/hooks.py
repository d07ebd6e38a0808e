"""Finding a causal LM's decoder layers and input embedding through peft/DDP/CausalLM wrappers, and capturing
dL/dh at every decoder layer's output with hooks whose lifetime is a ``with`` block.

    layers = decoder_layers(model)                       # the ModuleList (Qwen2/Qwen3/Llama: model.model.layers)
    with LayerGradHooks(model, [0, 3], on_grad) as hooks:
        loss = loss_fn(model(**inputs).logits)
        hooks.backward(loss)                             # on_grad(layer, grad (B, T, D)) per hooked layer

Each hooked layer gets a forward hook that registers a tensor hook on the layer's output hidden state: the
tensor hook receives the total gradient of the loss w.r.t. that tensor, dL/dh_l (every path downstream of it,
the residual stream included). ``output_hidden_states`` would not do: those are copies outside the graph.
The input embedding's output is made a leaf that requires grad, and the backward is asked for that leaf only
(``backward(inputs=...)``), so it reaches every layer but computes no parameter gradient.
"""
from __future__ import annotations

from typing import Callable

import torch

_WRAPPERS = ("module", "base_model", "model")     # DDP, peft PeftModel / LoraModel, CausalLM -> backbone


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost model under DDP and peft wrappers (a CausalLM stays a CausalLM)."""
    m = model
    for _ in range(8):
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m = m.module
        elif hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
        else:
            return m
    return m


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers: a ``layers`` ModuleList on the model or on the backbone under
    ``model``/``transformer`` (Qwen2, Qwen3, Llama, Mistral, ...), through DDP and peft wrappers. ValueError
    naming the module lists the model has otherwise."""
    m = _unwrapped(model)
    for path in ("model.layers", "layers", "transformer.layers", "model.model.layers"):
        obj: object = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    lists = [f"{n} ({len(mod)})" for n, mod in m.named_modules() if isinstance(mod, torch.nn.ModuleList)]
    raise ValueError(f"{type(m).__name__} has no `layers` list of decoder layers (looked for model.layers and "
                     f"layers); its module lists: {', '.join(lists[:10]) or 'none'}")


def input_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The token embedding module (``get_input_embeddings``), through wrappers."""
    m = _unwrapped(model)
    emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    if emb is None:
        raise ValueError(f"{type(m).__name__} has no input embedding (get_input_embeddings)")
    return emb


def _hidden(output: object) -> torch.Tensor:
    """A decoder layer's output hidden state: the tensor itself (transformers 5) or the first of a tuple."""
    h = output[0] if isinstance(output, (tuple, list)) else output
    assert torch.is_tensor(h), f"a decoder layer returned {type(output).__name__}, not a hidden-state tensor"
    return h


class LayerGradHooks:
    """Hooks on the outputs of decoder layers ``layers`` (indices into ``decoder_layers(model)``), attached for
    a ``with`` block. ``on_grad(layer, grad)`` receives dL/dh_l, shape (B, T, D), in the model's dtype, once
    per backward. ``backward(loss)`` runs the one backward (only as far as the embedding output)."""

    def __init__(self, model: torch.nn.Module, layers: list[int],
                 on_grad: Callable[[int, torch.Tensor], None]) -> None:
        self.model, self.layers, self.on_grad = model, list(layers), on_grad
        self.modules = decoder_layers(model)
        self.embedding = input_embedding(model)
        self._handles: list = []
        self.emb_out: torch.Tensor | None = None         # (B, T, D) the leaf the backward stops at

    def _layer_hook(self, layer: int) -> Callable:
        def fwd(_module: torch.nn.Module, _args: object, output: object) -> None:
            h = _hidden(output)
            if h.requires_grad:           # under no_grad (generation, a reference pass) nothing to capture
                h.register_hook(lambda g: self.on_grad(layer, g))
        return fwd

    def _emb_hook(self, _module: torch.nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return output
        # a leaf: the graph starts here whether or not the embedding (or anything) is trainable
        self.emb_out = output.detach().requires_grad_(True)
        return self.emb_out

    def __enter__(self) -> "LayerGradHooks":
        try:
            self._handles.append(self.embedding.register_forward_hook(self._emb_hook))
            for i in self.layers:
                self._handles.append(self.modules[i].register_forward_hook(self._layer_hook(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.emb_out = None

    def backward(self, loss: torch.Tensor) -> None:
        """One backward of ``loss`` down to the embedding output: every hooked layer's tensor hook fires; no
        parameter's ``.grad`` is touched."""
        assert self.emb_out is not None, "backward() needs a forward inside the with block first"
        loss.backward(inputs=[self.emb_out])
