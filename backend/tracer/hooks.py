"""Position-mode hooks: the factored products <P_{s,m}, G_m> computed during backward, no piece materialised.

    hooks = PositionHooks(sites, world_size=1)                  # build: nothing attached yet
    with attached(hooks.forward_hooks(), hooks.grad_hooks()):   # attach; removed in `finally`
        out = forward_loss(model, batch, scheme, params)
        torch.autograd.grad(out.total, hooks.grad_inputs())     # the backward fires the hooks
    hooks.dot[i], hooks.sq[i]                                   # (B*T,) per site, float32

For a site (a LoRA matrix, y = W u) the piece of position s is P_s = g_s u_s^T, g = dL/dy. All positions go
through one matmul, so the site's gradient G_m = sum_s g_s u_s^T is complete as soon as its backward ran. The
hooks compute, in float32,

    dot_s = g_s^T G_m u_s                      via (N, min(in, out)) products, never (N, in, out)
    sq_s  = ||g_s||^2 ||u_s||^2                (||g u^T||_F = ||g|| ||u||)

Each site's gradient is formed in its hook from the same pieces (G_m = g^T u); autograd is asked only for the
lowest traced layer's weights, which drives the whole backward and gives the check that the pieces sum to
autograd's gradient ("pieces sum to G"). lora_A sites fed by one tensor (q/k/v, gate/up when dropout is off)
are computed together once the last of them has its gradient: one read of u for their gradients, one for
their products, one for ||u_s||. lora_B's large g (N, out) is used at once and let go.

u is the LoRA input autograd saves anyway, so keeping it costs no memory. Under torch.distributed G_m is
all-reduced in the hook (the global gradient is the mean of the ranks' gradients, as DDP averages), and this
rank's pieces carry the factor 1 / world_size. With a given G (a traced batch in several micro-batches) the
output hook computes against it directly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from backend.tracer.sites import LoraSite

Hook = tuple[nn.Module, Callable]


@contextmanager
def attached(forward: list[Hook], grad: list[tuple[torch.Tensor, Callable]] = ()) -> Iterator[None]:
    """Attach module forward hooks and tensor (gradient) hooks for the block; removed in ``finally``."""
    handles = []
    try:
        for module, fn in forward:
            handles.append(module.register_forward_hook(fn))
        for tensor, fn in grad:
            handles.append(tensor.register_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean over ranks, in place (a no-op on one process)."""
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size)
    return t


class PositionHooks:
    """Per-site hooks for one traced pass (one or more micro-batches).

    ``G``: the batch gradient per site, when known beforehand (micro-batched traced batch); None: each site's
    gradient comes from this backward (one micro-batch), which must ask autograd for ``grad_inputs()``.
    ``piece_scale`` multiplies every piece (1 / (micro-batches x world size)). ``check``: site indices whose sum
    of pieces is compared with G (``pieces_err``, or ``piece_sum`` with a given G).
    """

    def __init__(self, sites: list[LoraSite], G: list[torch.Tensor] | None = None, piece_scale: float = 1.0,
                 world_size: int = 1, check: set[int] | None = None):
        self.sites = sites
        self.G = G
        self.piece_scale = piece_scale
        self.world_size = world_size
        self.check = check or set()
        self.dot: list[list[torch.Tensor]] = [[] for _ in sites]     # per site, per call: (N,)
        self.sq: list[list[torch.Tensor]] = [[] for _ in sites]
        self.g_sqnorm: list[torch.Tensor | None] = [None] * len(sites)   # ||G_m||^2 (global)
        self.pieces_err: dict[int, float] = {}                       # ||sum_s P_s - G_m|| / ||G_m||, local
        self.piece_sum: dict[int, torch.Tensor] = {}                 # with a given G: this rank's sum of pieces
        self.calls = [0] * len(sites)
        self._pending: dict[int, tuple] = {}                         # lora_A: (u, g) awaiting its group
        self._checks: dict[int, torch.Tensor] = {}                   # the first of (own, autograd's) G_m
        self._groups: dict[int, list[int]] = {}                      # id(input tensor) -> lora_A sites
        self._group_of: dict[int, list[int]] = {}

    def forward_hooks(self) -> list[Hook]:
        return [(s.linear, self._make_forward(i)) for i, s in enumerate(self.sites)]

    def grad_hooks(self) -> list[tuple[torch.Tensor, Callable]]:
        """Hooks on the checked sites' weights: they receive autograd's gradient; none when G is given."""
        if self.G is not None:
            return []
        return [(self.sites[i].param, self._make_param(i)) for i in sorted(self.check)]

    def grad_inputs(self) -> list[torch.Tensor]:
        """The weights to ask autograd for: the checked sites (the lowest traced layer by default). Every LoRA
        output of a higher layer lies on the way to them, so the backward reaches every site; the other weights'
        gradients are left to the hooks, which form them anyway."""
        return [self.sites[i].param for i in sorted(self.check)]

    def _make_forward(self, i: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return                                   # reference passes, no-grad evaluation
            self.calls[i] += 1
            u = inputs[0]
            if self.G is None and self.sites[i].part == "lora_A":
                self._group_of[i] = self._groups.setdefault(id(u), [])
                self._group_of[i].append(i)              # lora_A sites fed by this very tensor (q/k/v, gate/up)
            output.register_hook(lambda g: self._on_output_grad(i, u, g))
        return hook

    def _make_param(self, i: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            self._check(i, auto=grad)
        return hook

    def _check(self, i: int, own: torch.Tensor | None = None, auto: torch.Tensor | None = None) -> None:
        """Compare the hook's sum of pieces with autograd's gradient, whichever arrives second."""
        have = self._checks.pop(i, None)
        if have is None:
            self._checks[i] = own if own is not None else auto
            return
        own, auto = (own, have) if own is not None else (have, auto)
        self.pieces_err[i] = _rel(own, auto)

    def _on_output_grad(self, i: int, u: torch.Tensor, g: torch.Tensor) -> None:
        if self.G is None and self.sites[i].part == "lora_A":
            self._pending[i] = (u, g)                    # g is (N, r), small
            group = self._group_of.pop(i)
            if all(j in self._pending for j in group):   # the last of the sites sharing this input
                self._group_products(group)
            return
        uf = u.reshape(-1, u.shape[-1]).float()          # (N, in)
        gf = g.reshape(-1, g.shape[-1]).float()          # (N, out)
        if self.G is not None:
            if i in self.check:
                s = (gf.T @ uf) * self.piece_scale
                self.piece_sum[i] = self.piece_sum[i] + s if i in self.piece_sum else s
            self._products(i, uf, gf, self.G[i])
            return
        Gm = gf.T @ uf                                   # (out, r): lora_B's gradient, sum of its pieces
        if i in self.check:
            self._check(i, own=Gm.clone())
        self._set_g([i], Gm)
        self._products(i, uf, gf, Gm)

    def _group_products(self, group: list[int]) -> None:
        """lora_A sites that share one input u: their gradients and products from one read of u each way."""
        parts = [self._pending.pop(j) for j in group]
        u = parts[0][0]
        uf = u.reshape(-1, u.shape[-1]).float()                                 # (N, in)
        gs = [g.reshape(-1, g.shape[-1]).float() for _, g in parts]             # (N, r_j) each
        gcat = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]                   # (N, sum r)
        Gcat = gcat.T @ uf                                                      # (sum r, in): every G_j
        for j, Gm in zip(group, Gcat.split([g.shape[1] for g in gs])):
            if j in self.check:
                self._check(j, own=Gm.clone())
        self._set_g(group, Gcat)
        X = uf @ Gcat.T                                                         # (N, sum r): G_j u_s
        nu = torch.linalg.vector_norm(uf, dim=-1)                               # (N,)
        c = 0
        for j, gf in zip(group, gs):
            r = gf.shape[1]
            self._append(j, torch.linalg.vecdot(X[:, c:c + r], gf), torch.linalg.vector_norm(gf, dim=-1) * nu)
            c += r

    def _set_g(self, idx: list[int], G: torch.Tensor) -> None:
        """Make the rows of G (the sites ``idx``, stacked) global and keep each site's ||G_m||^2."""
        all_reduce_mean(G, self.world_size)
        if len(idx) == 1:
            self.g_sqnorm[idx[0]] = torch.linalg.vector_norm(G).square()
            return
        sq = G.square().sum(1)                                                  # (sum r,)
        c = 0
        for j in idx:
            r = self.sites[j].param.shape[0]
            self.g_sqnorm[j] = sq[c:c + r].sum()
            c += r

    def _products(self, i: int, uf: torch.Tensor, gf: torch.Tensor, Gm: torch.Tensor) -> None:
        out_dim, in_dim = Gm.shape
        if out_dim <= in_dim:
            dot = torch.linalg.vecdot(uf @ Gm.T, gf)     # (N,): u_s -> G_m u_s (out), then . g_s
        else:
            dot = torch.linalg.vecdot(gf @ Gm, uf)       # (N,): g_s -> G_m^T g_s (in), then . u_s
        self._append(i, dot, torch.linalg.vector_norm(gf, dim=-1) * torch.linalg.vector_norm(uf, dim=-1))

    def _append(self, i: int, dot: torch.Tensor, norm: torch.Tensor) -> None:
        """Record site i's dot (N,) and piece norm (N,) (||g_s|| ||u_s||), scaled to the global loss."""
        if self.piece_scale != 1.0:
            dot, norm = dot * self.piece_scale, norm * self.piece_scale
        self.dot[i].append(dot)
        self.sq[i].append(norm.square())

    def reset_calls(self) -> None:
        self.calls = [0] * len(self.sites)
        self._groups = {}

    def check_one_call(self) -> None:
        bad = [self.sites[i].name for i, c in enumerate(self.calls) if c != 1]
        assert not bad, (f"LoRA modules called {sorted(set(self.calls))} times in one forward (weight sharing or "
                         f"gradient checkpointing is not supported by position mode): {bad[:3]}")
