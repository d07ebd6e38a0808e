"""Position-mode hooks: the factored products <P_{s,m}, G_m> computed during backward, no piece materialised.

    hooks = PositionHooks(sites, world_size=1)                  # build: nothing attached yet
    with attached(hooks.forward_hooks(), hooks.grad_hooks()):   # attach; removed in `finally`
        out = forward_loss(model, batch, scheme, params)
        torch.autograd.grad(out.total, hooks.grad_inputs())     # the backward fires the hooks
    dot, sq, g_sq = hooks.finish()                              # (M, N), (M, N), (M,) float32

For a site (a LoRA matrix, y = W u) the piece of position s is P_s = g_s u_s^T, g = dL/dy. All positions go
through one matmul, so the site's gradient G_m = sum_s g_s u_s^T is complete as soon as its backward ran:

    dot_s = g_s^T G_m u_s                      never forming (N, in, out): one side is r-dimensional
    sq_s  = ||g_s||^2 ||u_s||^2                (||g u^T||_F = ||g|| ||u||)

- lora_B (u = A u_in: (N, r); g: (N, out)): in the hook on its output, G_m^T = u^T g, p = G_m^T g^T (r, N) and
  ||g_s||; the large g is then let go. dot_s = p_s . u_s;
- lora_A (u: the dropped-out input, (N, in); g = dL/d(A u): (N, r)): the sites fed by one tensor (q/k/v,
  gate/up when dropout is off) are done together when the last of them has its g: G = g_cat^T u (every G_m at
  once), p = G u^T (sum r, N) and ||u_s||: each a single read of u. dot_s = p_s . g_s.
The r-dimensional reductions (p . q, ||q||) of every site are deferred to ``finish``, one batched op for all
sites instead of a handful per site: on small models the per-op overhead is what a trace costs.

``extra``: other directions E_m (the eval-loss gradient of ``backend.trace.influence``): <P_{s,m}, E_m> comes
from the same q_s with p_s = E_m^T g_s (lora_B) or E_m u_s (lora_A): one more (r, d) @ (d, N) product per site,
in ``extra_dot`` after ``finish``.

``sketch`` (a ``backend.trace.sketch.Sketcher``): each site's float32 u and g are also handed to it, which adds
the site's random projection of every piece to a per-position sketch (two small products per site; a lora_A
group sharing one input is one fused site there, ``add_group``).

Each site's gradient is thus formed from its pieces; autograd is asked only for ``grad_inputs()`` (the checked
sites, the lowest traced layer by default), which drives the whole backward and gives the check that the pieces
sum to autograd's gradient ("pieces sum to G"). u is the LoRA input autograd saves anyway: keeping it costs no
memory. Under torch.distributed G_m is all-reduced in the hook (the global gradient is the mean of the ranks'
gradients, as DDP averages), and this rank's pieces carry the factor 1 / world_size. With a given G (a traced
batch in several micro-batches) the hook on each output computes against it directly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from backend.trace.sites import LoraSite
from backend.trace.sketch import Sketcher

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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def f32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without the dispatch when t is float32 already (the hooks call it per LoRA matrix)."""
    return t if t.dtype == torch.float32 else t.float()


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
    of pieces is compared with autograd's gradient (``pieces_err``), or, with a given G, summed (``piece_sum``).
    ``extra``: a second direction per site (weight shape), dotted with every piece too (``extra_dot``).
    """

    def __init__(self, sites: list[LoraSite], G: list[torch.Tensor] | None = None, piece_scale: float = 1.0,
                 world_size: int = 1, check: set[int] | None = None, extra: list[torch.Tensor] | None = None,
                 sketch: Sketcher | None = None):
        self.sites = sites
        self.sketch = sketch                                            # per-position sketches (sketch.py)
        self.G = G
        self.extra = extra
        self.parts_x: list[list[torch.Tensor]] = [[] for _ in sites]     # per call: p (r, N) against extra
        self.extra_dot: torch.Tensor | None = None                      # (M, N) after finish, with extra
        self._xt_cache: dict[int, torch.Tensor] = {}
        self.piece_scale = piece_scale
        self.world_size = world_size
        self.check = check or set()
        # per site, per call (micro-batch): p (r, N), q (r, N), big (N,): dot_s = p_s . q_s, ||P_s|| = big_s ||q_s||
        self.parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in sites]
        self.G_seen: list[torch.Tensor | None] = [None] * len(sites)   # global G_m (a view is fine)
        self.pieces_err: dict[int, float] = {}
        self.piece_sum: dict[int, torch.Tensor] = {}
        self.calls = [0] * len(sites)
        self._pending: dict[int, tuple] = {}                           # lora_A: (u, g) awaiting its group
        self._checks: dict[int, list] = {}                             # site -> [own G_m, autograd's G_m]
        self._groups: dict[int, tuple] = {}                            # id(input) -> (input, lora_A sites)
        self._group_of: dict[int, int] = {}                            # lora_A site -> its group's key
        self._gt_cache: dict[int, torch.Tensor] = {}
        self._is_a = [s.part == "lora_A" for s in sites]

    # ---- what to attach ---------------------------------------------------------------------------------

    def forward_hooks(self) -> list[Hook]:
        return [(s.linear, self._make_forward(i)) for i, s in enumerate(self.sites)]

    def grad_hooks(self) -> list[tuple[torch.Tensor, Callable]]:
        """Hooks on the checked sites' weights: they receive autograd's gradient; none when G is given."""
        if self.G is not None:
            return []
        return [(self.sites[i].param, self._make_param(i)) for i in sorted(self.check)]

    def grad_inputs(self) -> list[torch.Tensor]:
        """The weights to ask autograd for: the checked sites. Every LoRA output of a higher layer lies on the
        way to the lowest layer's, so the backward reaches every site."""
        return [self.sites[i].param for i in sorted(self.check)]

    def _make_forward(self, i: int) -> Callable:
        lora_a = self.sites[i].part == "lora_A"

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return                                   # reference passes, no-grad evaluation
            self.calls[i] += 1
            if lora_a and self.G is None:
                # lora_A sites fed by this very tensor (q/k/v, gate/up); the registry holds the tensor itself,
                # so its id cannot be reused by another tensor during the pass
                self._groups.setdefault(id(inputs[0]), (inputs[0], []))[1].append(i)
                self._group_of[i] = id(inputs[0])
            u = inputs[0].detach()                       # an alias: the products must not join the graph
            output.register_hook(lambda g: self._on_output_grad(i, u, g))
        return hook

    def _make_param(self, i: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            self._check(i, auto=grad)
        return hook

    # ---- during backward --------------------------------------------------------------------------------

    def _check(self, i: int, own: torch.Tensor | None = None, auto: torch.Tensor | None = None) -> None:
        """Pair the hook's sum of pieces with autograd's gradient (compared in ``finish``)."""
        pair = self._checks.setdefault(i, [None, None])
        if own is not None:
            pair[0] = own
        else:
            pair[1] = auto

    def _on_output_grad(self, i: int, u: torch.Tensor, g: torch.Tensor) -> None:
        if self.G is None and self._is_a[i]:
            self._pending[i] = (u, g)                    # g is (N, r), small
            key = self._group_of.pop(i)
            group = self._groups[key][1]
            if all(j in self._pending for j in group):   # the last of the sites sharing this input
                del self._groups[key]                    # (forward is over: the id cannot be handed out again)
                self._lora_a_group(group)
            return
        uf = f32(u.reshape(-1, u.shape[-1]))             # (N, in)
        gf = f32(g.reshape(-1, g.shape[-1]))             # (N, out)
        # Every product keeps the r-sized side first, (r, N) @ (N, d) and (r, d) @ (d, N): on CPU these
        # run several times faster than the (N, d) @ (d, r) forms with the same result.
        if self.G is not None:                           # given G (out, in): any site, one at a time
            Gm = self.G[i]
            if i in self.check:
                s = (uf.T @ gf).T * self.piece_scale if Gm.shape[1] <= Gm.shape[0] else (gf.T @ uf) * self.piece_scale
                self.piece_sum[i] = self.piece_sum[i] + s if i in self.piece_sum else s
            if Gm.shape[1] <= Gm.shape[0]:               # small side: in (lora_B). p = G^T g_s, q = u_s
                self.parts[i].append((self._GT(i) @ gf.T, uf.T, torch.linalg.vector_norm(gf, dim=-1)))
                if self.extra is not None:
                    self.parts_x[i].append(self._XT(i) @ gf.T)
            else:                                        # small side: out (lora_A). p = G u_s, q = g_s
                self.parts[i].append((Gm @ uf.T, gf.T, torch.linalg.vector_norm(uf, dim=-1)))
                if self.extra is not None:
                    self.parts_x[i].append(self.extra[i].float() @ uf.T)
            if self.sketch is not None:
                self.sketch.add(len(self.parts[i]) - 1, i, uf, gf)
            return
        GT = uf.T @ gf                                   # lora_B: (r, out) = G_m^T, the sum of its pieces
        if i in self.check:
            self._check(i, own=GT.T.clone())
        self.G_seen[i] = all_reduce_mean(GT, self.world_size)
        self.parts[i].append((GT @ gf.T, uf.T, torch.linalg.vector_norm(gf, dim=-1)))   # (r, N), (r, N), (N,)
        if self.extra is not None:
            self.parts_x[i].append(self._XT(i) @ gf.T)                                   # (r, N): E^T g_s
        if self.sketch is not None:
            self.sketch.add(len(self.parts[i]) - 1, i, uf, gf)

    def _GT(self, i: int) -> torch.Tensor:
        """The given G of site i transposed and contiguous (cached)."""
        if i not in self._gt_cache:
            self._gt_cache[i] = self.G[i].T.contiguous()
        return self._gt_cache[i]

    def _XT(self, i: int) -> torch.Tensor:
        """The extra direction of lora_B site i transposed, float32 and contiguous (cached): (r, out)."""
        if i not in self._xt_cache:
            self._xt_cache[i] = self.extra[i].float().T.contiguous()
        return self._xt_cache[i]

    def _lora_a_group(self, group: list[int]) -> None:
        parts = [self._pending.pop(j) for j in group]
        u = parts[0][0]                                  # the group's members hold aliases of one tensor
        uf = f32(u.reshape(-1, u.shape[-1]))                                    # (N, in)
        gs = [f32(g.reshape(-1, g.shape[-1])) for _, g in parts]                # (N, r_j) each
        gcat = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]                   # (N, sum r)
        Gcat = gcat.T @ uf                                                      # (sum r, in): every G_j
        widths = [g.shape[1] for g in gs]
        Gms = Gcat.split(widths)                                                # views: all-reduced in place below
        for j, Gm in zip(group, Gms):
            if j in self.check:                                                 # this rank's sum of pieces
                self._check(j, own=Gm.clone() if self.world_size > 1 else Gm)
        all_reduce_mean(Gcat, self.world_size)
        for j, Gm in zip(group, Gms):
            self.G_seen[j] = Gm
        XT = Gcat @ uf.T                                                        # (sum r, N): G_j u_s
        nu = torch.linalg.vector_norm(uf, dim=-1)                               # (N,)
        for j, p, gf in zip(group, XT.split(widths), gs):
            self.parts[j].append((p, gf.T, nu))
        if self.extra is not None:
            Ecat = torch.cat([self.extra[j].float() for j in group]) if len(group) > 1 else self.extra[group[0]].float()
            for j, p in zip(group, (Ecat @ uf.T).split(widths)):                      # (r_j, N): E_j u_s
                self.parts_x[j].append(p)
        if self.sketch is not None:
            self.sketch.add_group(len(self.parts[group[0]]) - 1, group, uf, gs, gcat)

    # ---- after backward ---------------------------------------------------------------------------------

    def reset_calls(self) -> None:
        self.calls = [0] * len(self.sites)
        self._groups = {}

    def check_one_call(self) -> None:
        bad = [self.sites[i].name for i, c in enumerate(self.calls) if c != 1]
        assert not bad, (f"LoRA modules called {sorted(set(self.calls))} times in one forward (weight sharing or "
                         f"gradient checkpointing is not supported by position mode): {bad[:3]}")

    def gradient(self) -> list[torch.Tensor]:
        """G_m of every site in its weight's shape (float32, global), as the hooks formed it (G not given)."""
        assert self.G is None, "the hooks were given G"
        assert all(g is not None for g in self.G_seen), "the backward did not reach every site"
        out = [g.T if s.part == "lora_B" else g for g, s in zip(self.G_seen, self.sites)]   # lora_B kept G^T
        assert all(g.shape == s.param.shape for g, s in zip(out, self.sites)), "a site's G has the wrong shape"
        return out

    @torch.no_grad()
    def finish(self, calls: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(M, N) dot and (M, N) squared piece norm of every site and position (micro-batches concatenated),
        scaled to the global loss, and (M,) ||G_m||^2 when the hooks formed G (else None)."""
        missing = [self.sites[i].name for i, p in enumerate(self.parts) if len(p) != calls]
        assert not missing, f"the backward did not reach these LoRA modules: {missing[:3]}"
        M = len(self.sites)
        p = [torch.cat([c[0] for c in parts], 1) if calls > 1 else parts[0][0] for parts in self.parts]
        q = [torch.cat([c[1] for c in parts], 1) if calls > 1 else parts[0][1] for parts in self.parts]
        big = [torch.cat([c[2] for c in parts]) if calls > 1 else parts[0][2] for parts in self.parts]
        N = big[0].shape[0]
        by_width: dict[int, list[int]] = {}
        for i, t in enumerate(q):
            by_width.setdefault(t.shape[0], []).append(i)
        px = None
        if self.extra is not None:
            px = [torch.cat(parts, 1) if calls > 1 else parts[0] for parts in self.parts_x]
        if len(by_width) > 1:                           # rows filled per rank group
            dot = torch.empty(M, N, dtype=torch.float32, device=big[0].device)
            qsq = torch.empty_like(dot)
            if px is not None:
                self.extra_dot = torch.empty_like(dot)
        for idx in by_width.values():                   # usually one group: every LoRA matrix has rank r
            P, Q = torch.stack([p[i] for i in idx]), torch.stack([q[i] for i in idx])      # (m, r, N)
            # the stacks are copies of their own: the products are formed in place (no (m, r, N) temporaries)
            x = torch.stack([px[i] for i in idx]).mul_(Q).sum(1) if px is not None else None
            if len(by_width) == 1:                      # every site, in order: no indexed writes
                if x is not None:
                    self.extra_dot = x
                dot, qsq = P.mul_(Q).sum(1), Q.square_().sum(1)
                continue
            if x is not None:
                self.extra_dot[idx] = x
            dot[idx] = P.mul_(Q).sum(1)
            qsq[idx] = Q.square_().sum(1)
        sq = torch.stack(big).square_().mul_(qsq)
        if self.piece_scale != 1.0:
            dot.mul_(self.piece_scale)
            if self.extra_dot is not None:
                self.extra_dot.mul_(self.piece_scale)
            sq.mul_(self.piece_scale ** 2)
        g_sq = None
        if self.G is None:
            g_sq = torch.stack(torch._foreach_norm(self.G_seen)).square()
            pairs = [(i, o, a) for i, (o, a) in self._checks.items()]
            assert all(o is not None and a is not None for _, o, a in pairs), "a checked site missed a gradient"
            if pairs:
                owns, autos = [o.float() for _, o, _ in pairs], [a.float() for _, _, a in pairs]
                diff = torch.stack(torch._foreach_norm(torch._foreach_sub(owns, autos)))
                ref = torch.stack(torch._foreach_norm(autos)).clamp_min(1e-30)
                self.pieces_err = dict(zip([i for i, _, _ in pairs], (diff / ref).tolist()))
        return dot, sq, g_sq
