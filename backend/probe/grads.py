"""g = d log p(x_t) / d W[row] for many positions t of one sequence, from one forward pass (batched backward).

    site = resolve_site(model, layer=-1, param="mlp.down_proj.weight", row=0)   # ValueError naming choices
    vecs, logp = row_gradients(model, site, ids, positions, temperature=1.0)     # (K, d_in) float32, (K,)

W is the weight of a Linear y = W u (+ b) inside decoder layer ``layer``. For log p_t (of the token at
sequence index t + 1, predicted at t, under softmax(z / temperature)):

    d log p_t / d W[row] = sum_s delta_{t,s} u_s,   delta_{t,s} = d log p_t / d y_s[row]

so one forward records u (the Linear's input, (T, d_in)) and replaces the Linear's output y by a leaf tensor.
Two exact ways to get delta from there (``Site.path`` says which one a site takes):

- ``"diagonal"``: when no attention lies between y and the logits, delta_{t,s} = 0 for s != t: W is in the
  LAST decoder layer and per-position (``mlp.*``, ``self_attn.q_proj``, ``self_attn.o_proj``; q_s only enters
  row s of the attention, and everything above the layer, the final norm and the LM head, is per position).
  Then ONE backward of sum_k log p_{t_k} w.r.t. y gives every delta_{t_k,t_k} at once (its ``row`` column), and
  g_{t_k} = delta_{t_k,t_k} u_{t_k}. ``self_attn.k_proj`` / ``v_proj`` (k_s, v_s feed every later position
  through the attention) and any earlier layer are not per-position.
- ``"vmap"``: one backward with K one-hot cotangents (``is_grads_batched``: a vmap over the cotangents) gives
  d log p_{t_k} / d y for all k at once, (K, T, d_out); its ``row`` column times u gives the K vectors. Only
  the layers above W are differentiated, and the LM head only at the K positions. On a CPU this costs about K
  backward passes through those layers; on a GPU they run as one.

``row_gradients_loop`` is the baseline (one backward per position, through W itself) the bench compares against.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from backend.grads import hooks

# Linear weights (inside a decoder layer) whose output at position s reaches only position s of that layer's
# output: the MLP (per token, routed MoE experts included), the query and the attention's output projection.
PER_POSITION_PREFIXES = ("mlp.",)
PER_POSITION_PARAMS = ("self_attn.q_proj.weight", "self_attn.o_proj.weight")
PATHS = ("diagonal", "vmap")


@dataclass(frozen=True)
class Site:
    """The probed weight: its Linear module, its name, the row, and whether d log p_t / d y_s vanishes for
    s != t (``diagonal``: one plain backward gives every position's vector; module docstring)."""
    module: torch.nn.Linear
    name: str           # e.g. model.layers.3.mlp.down_proj.weight
    layer: int          # the layer index, non-negative
    row: int
    diagonal: bool = False

    @property
    def row_dim(self) -> int:
        return self.module.in_features

    @property
    def path(self) -> str:
        """How ``row_gradients`` computes this site's vectors by default: "diagonal" or "vmap"."""
        return "diagonal" if self.diagonal else "vmap"


def is_diagonal(param: str, layer: int, n_layers: int) -> bool:
    """True when y = W u of ``param`` in decoder layer ``layer`` (of ``n_layers``, non-negative) reaches the
    logits position by position: the last layer, and a per-position weight (``PER_POSITION_*``). Decided by the
    structure, so an unknown module kind (a fused qkv, k_proj, v_proj) takes the general path."""
    per_position = param.startswith(PER_POSITION_PREFIXES) or param in PER_POSITION_PARAMS
    return layer == n_layers - 1 and per_position


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
    return Site(module, f"{path}.{li}.{param}", li, row, is_diagonal(param, li, n))


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
    """log p of the next token at ``positions`` (K,), from final hidden states (T, H), float32 (or wider)."""
    logits = model.get_output_embeddings()(hidden[positions])                 # (K, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))     # bf16 -> float32; float64 stays
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, ids[positions + 1][:, None])[:, 0]                  # (K,)


@torch.no_grad()
def _check(ids: torch.Tensor, positions: torch.Tensor) -> None:
    assert ids.dim() == 1 and positions.dim() == 1, "ids (T,) and positions (K,)"
    if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= len(ids) - 1):
        raise ValueError(f"positions must lie in 0..{len(ids) - 2} (each predicts the next token)")


def row_gradients(model: torch.nn.Module, site: Site, ids: torch.Tensor, positions: torch.Tensor,
                  temperature: float = 1.0, chunk: int = 32, path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors (K, d_in) float32, log p (K,)) for the tokens at sequence indices ``positions + 1``.

    ``ids``: (T,) one sequence (no padding); ``positions``: (K,) the indices that predict them. One forward;
    then per ``chunk`` positions one backward: a plain one (``path`` "diagonal", only for a ``site.diagonal``
    site) or one batched over one-hot cotangents ("vmap"). ``path`` "auto" is ``site.path``."""
    _check(ids, positions)
    if path == "auto":
        path = site.path
    if path not in PATHS:
        raise ValueError(f"path {path!r} is not allowed: choose 'auto' or one of {', '.join(PATHS)}")
    if path == "diagonal" and not site.diagonal:
        raise ValueError(f"path 'diagonal' is wrong for {site.name}: its output reaches other positions through "
                         "attention (only per-position weights of the last layer qualify); use 'vmap'")
    dev = site.module.weight.device
    ids, positions = ids.to(dev), positions.to(dev)
    K = len(positions)
    if K == 0:
        return torch.zeros(0, site.row_dim), torch.zeros(0)
    base = getattr(model, model.base_model_prefix)
    with _capture(site.module) as got, torch.enable_grad():
        hidden = base(input_ids=ids[None], use_cache=False).last_hidden_state[0]          # (T, H)
        u, y = got["u"][0], got["y"]                                          # (T, d_in), (1, T, d_out)
        vecs, logps = [], []
        for start in range(0, K, chunk):
            pos = positions[start:start + chunk]
            retain = start + chunk < K
            if path == "diagonal":
                v, logp = _diagonal(model, site, hidden, ids, pos, u, y, temperature, retain)
                vecs.append(v)
                logps.append(logp)
                continue
            logp = _head_logp(model, hidden, ids, pos, temperature)           # (k,)
            eye = torch.eye(len(pos), device=dev, dtype=logp.dtype)           # (k, k): one cotangent each
            (gy,) = torch.autograd.grad(logp, y, grad_outputs=eye, is_grads_batched=True,
                                        retain_graph=retain)                  # (k, 1, T, d_out)
            delta = gy[:, 0, :, site.row].float()                             # (k, T)
            vecs.append(delta @ u.float())                                    # (k, d_in)
            logps.append(logp.detach())
    return torch.cat(vecs).cpu(), torch.cat(logps).float().cpu()


def _diagonal(model: torch.nn.Module, site: Site, hidden: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
              u: torch.Tensor, y: torch.Tensor, temperature: float, retain: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors (k, d_in), log p (k,)) of ``pos`` (k,) at a diagonal site, from one backward of
    sum_k log p_{t_k}: its gradient at (t_k, row) is delta_{t_k,t_k}, since no other position's log p depends on
    y_{t_k}. A position listed twice would add up in the sum, so the sum runs over the distinct ones."""
    uniq, inv = torch.unique(pos, return_inverse=True)                        # (k',), (k,)
    logp = _head_logp(model, hidden, ids, uniq, temperature)                  # (k',)
    (gy,) = torch.autograd.grad(logp.sum(), y, retain_graph=retain)           # (1, T, d_out)
    delta = gy[0, uniq, site.row].float()                                     # (k',)
    return (delta[:, None] * u[uniq].float())[inv], logp.detach()[inv]       # (k, d_in), (k,)


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
            base = getattr(model, model.base_model_prefix)
            hidden = base(input_ids=ids[None], use_cache=False).last_hidden_state[0]      # (T, H)
            logp = _head_logp(model, hidden, ids, positions, temperature)     # (K,)
            vecs = [torch.autograd.grad(logp[k], W, retain_graph=True)[0][site.row].float()
                    for k in range(len(positions))]
    finally:
        W.requires_grad_(was)
    out = torch.stack(vecs) if vecs else torch.zeros(0, site.row_dim)
    return out.cpu(), logp.detach().float().cpu()
