"""g = d log p(x_t) / d W[row] for many positions t of one sequence, from one forward pass (batched backward).

    site = resolve_site(model, layer=-1, param="mlp.down_proj.weight", row=0)   # ValueError naming choices
    vecs, logp = row_gradients(model, site, ids, positions, temperature=1.0)     # (K, d_in) float32, (K,)

W is the weight of a Linear y = W u (+ b) inside decoder layer ``layer``. For log p_t (of the token at
sequence index t + 1, predicted at t, under softmax(z / temperature)):

    d log p_t / d W[row] = sum_s delta_{t,s} u_s,   delta_{t,s} = d log p_t / d y_s[row]

so one forward records u (the Linear's input, (T, d_in)) and replaces the Linear's output y by a leaf tensor;
one backward with K one-hot cotangents (``is_grads_batched``: a vmap over the cotangents) gives
d log p_{t_k} / d y for all k at once, (K, T, d_out); its ``row`` column times u gives the K vectors. Only the
layers above W are differentiated, and the LM head only at the K positions. ``row_gradients_loop`` is the
baseline (one backward per position, through W itself) the bench compares against.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from backend.grads import hooks


@dataclass(frozen=True)
class Site:
    """The probed weight: its Linear module, its name, and the row."""
    module: torch.nn.Linear
    name: str           # e.g. model.layers.3.mlp.down_proj.weight
    layer: int          # the layer index, non-negative
    row: int

    @property
    def row_dim(self) -> int:
        return self.module.in_features


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(path, layers) of a causal LM's decoder layers: ``backend.grads.hooks.decoder_layers`` (the one lookup
    of them, through wrappers; ValueError naming the module lists otherwise) and their module path."""
    layers = hooks.decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers), layers


def linear_weights(layer: torch.nn.Module) -> list[str]:
    """Names (inside the layer) of the weights of its Linear modules: the parameters a probe can take."""
    return [f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n]


def resolve_site(model: torch.nn.Module, layer: int, param: str, row: int) -> Site:
    """The probed weight; ValueError naming the valid layers, parameter names or rows when one is wrong."""
    path, layers = decoder_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} decoder layers; "
                         f"allowed: 0..{n - 1} or -{n}..-1")
    li = layer % n
    choices = linear_weights(layers[li])
    if param not in choices:
        raise ValueError(f"param {param!r} is not a Linear weight of layer {li}; choose one of: {', '.join(choices)}")
    module = layers[li].get_submodule(param.removesuffix(".weight"))
    if not 0 <= row < module.out_features:
        raise ValueError(f"row {row} is out of range for {param} of shape {tuple(module.weight.shape)}: "
                         f"allowed rows 0..{module.out_features - 1}")
    return Site(module, f"{path}.{li}.{param}", li, row)


@contextmanager
def _capture(module: torch.nn.Module) -> Iterator[dict]:
    """While active, the module's forward records its input ``u`` and turns its output into a leaf ``y`` that
    requires grad (the graph below it is cut: only the layers above are differentiated)."""
    got: dict = {}

    def hook(mod: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        got["u"] = inputs[0].detach()
        got["y"] = output.detach().requires_grad_(True)
        return got["y"]

    handle = module.register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


def _head_logp(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """log p of the next token at ``positions`` (K,), from final hidden states (T, H), float32."""
    logits = model.get_output_embeddings()(hidden[positions])                 # (K, V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, ids[positions + 1][:, None])[:, 0]                  # (K,)


@torch.no_grad()
def _check(ids: torch.Tensor, positions: torch.Tensor) -> None:
    assert ids.dim() == 1 and positions.dim() == 1, "ids (T,) and positions (K,)"
    if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= len(ids) - 1):
        raise ValueError(f"positions must lie in 0..{len(ids) - 2} (each predicts the next token)")


def row_gradients(model: torch.nn.Module, site: Site, ids: torch.Tensor, positions: torch.Tensor,
                  temperature: float = 1.0, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors (K, d_in) float32, log p (K,)) for the tokens at sequence indices ``positions + 1``.

    ``ids``: (T,) one sequence (no padding); ``positions``: (K,) the indices that predict them. One forward;
    one batched backward per ``chunk`` positions."""
    _check(ids, positions)
    dev = site.module.weight.device
    ids, positions = ids.to(dev), positions.to(dev)
    K = len(positions)
    if K == 0:
        return torch.zeros(0, site.row_dim), torch.zeros(0)
    base = getattr(model, model.base_model_prefix)
    with _capture(site.module) as got, torch.enable_grad():
        hidden = base(input_ids=ids[None]).last_hidden_state[0]               # (T, H)
        u, y = got["u"][0], got["y"]                                          # (T, d_in), (1, T, d_out)
        vecs, logps = [], []
        for start in range(0, K, chunk):
            pos = positions[start:start + chunk]
            logp = _head_logp(model, hidden, ids, pos, temperature)           # (k,)
            eye = torch.eye(len(pos), device=dev, dtype=logp.dtype)           # (k, k): one cotangent each
            (gy,) = torch.autograd.grad(logp, y, grad_outputs=eye, is_grads_batched=True,
                                        retain_graph=start + chunk < K)       # (k, 1, T, d_out)
            delta = gy[:, 0, :, site.row].float()                             # (k, T)
            vecs.append(delta @ u.float())                                    # (k, d_in)
            logps.append(logp.detach())
    return torch.cat(vecs).cpu(), torch.cat(logps).float().cpu()


def row_gradients_loop(model: torch.nn.Module, site: Site, ids: torch.Tensor, positions: torch.Tensor,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: one forward, then one backward per position through W itself (``W.grad[row]``)."""
    _check(ids, positions)
    dev = site.module.weight.device
    ids, positions = ids.to(dev), positions.to(dev)
    W = site.module.weight
    was = W.requires_grad
    W.requires_grad_(True)
    try:
        with torch.enable_grad():
            hidden = getattr(model, model.base_model_prefix)(input_ids=ids[None]).last_hidden_state[0]
            logp = _head_logp(model, hidden, ids, positions, temperature)     # (K,)
            vecs = [torch.autograd.grad(logp[k], W, retain_graph=True)[0][site.row].float()
                    for k in range(len(positions))]
    finally:
        W.requires_grad_(was)
    out = torch.stack(vecs) if vecs else torch.zeros(0, site.row_dim)
    return out.cpu(), logp.detach().float().cpu()
