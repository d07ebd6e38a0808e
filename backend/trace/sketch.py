"""Per-position gradient sketches (position mode): a k-dimensional random projection of each position's piece,
computed from the factors during the backward, never forming the piece.

    sk = Sketcher(sites, k=128, seed=0, scale=1.0, rows=[n_traced * T], kind="gaussian")   # or "sparse"
    hooks = PositionHooks(sites, ..., sketch=sk)                  # the hooks call sk.add / sk.add_group
    ... forward + backward ...
    S = sk.result()                                               # (k, N) float32: column s = sketch of piece s

Projection. A site m (one LoRA matrix, weight (out, in)) has, at position s, the rank-one piece P_s = g_s u_s^T.
Row j of the site's projection is the rank-one matrix a_j b_j^T, a_j ~ N(0, I_out), b_j ~ N(0, I_in), so

    sk_j(P_s) = <a_j b_j^T, P_s> / sqrt(k) = (a_j . g_s) (b_j . u_s) / sqrt(k)

that is two (k, d) @ (d, N) products and an elementwise product per site: O(k (out + in) N). The a, b of a site
come from a generator seeded by (seed, layer, module, part) only (``site_seed``): the same model and seed give
the same projection at every step and in every run, so sketches are comparable across steps and runs (and across
models with the same LoRA layout). A position's sketch is the sum over sites of its site sketches: the
projection of the concatenated piece by a block matrix whose blocks are independent, still unbiased.

Error (derived for this projection; checked by tests/test_sketch.py against naive pieces). For two positions with
pieces P = (P_m), P' = (P'_m) over the sites m, and c_m = cos(g_m, g'_m), e_m = cos(u_m, u'_m):

    E <sk(P), sk(P')> = <P, P'>
    Var <sk(P), sk(P')> = (1/k) [ ||P||^2 ||P'||^2 + <P, P'>^2
                                  + 2 sum_m ||P_m||^2 ||P'_m||^2 (c_m^2 + e_m^2 + c_m^2 e_m^2) ]

The first two terms are a dense Gaussian JL projection's variance; the sum is the price of rank-one rows
(4th moments of products of Gaussians). It is at most 6 sum_m ||P_m||^2 ||P'_m||^2 <= 6 ||P||^2 ||P'||^2, and
small when the pieces spread over many sites (sum_m ||P_m||^4 << ||P||^4). Worst case (one site, P = P'): the
relative std of ||sk(P)||^2 is sqrt(8/k) (25% at k=128) against sqrt(2/k) (12.5%) for a dense projection;
in general the error of <sk(P), sk(P')> / (||P|| ||P'||) has std at most sqrt(8/k). ``predicted_variance``
evaluates the formula from materialised pieces.

Sparse projection (``kind="sparse"``, TraceConfig.sketch_kind). On each site's wide side (in = hidden for
lora_A, out = hidden for lora_B; ``wide_side``) b_j is replaced by sqrt(k) c_j, c a count sketch: wide coordinate
i goes to bucket h_i with sign sign_i, so c w (k,) is a scatter-add of w, O(wide) instead of O(k wide) per
position; the narrow side (r) keeps a dense Gaussian a_j. With p_{m,i} the piece's slice at wide coordinate i
(the narrow vector g u_i for lora_A) the estimator is still unbiased and

    Var_sparse = Var_gaussian + sum_m [ (1 - 3/k) sum_i ||p_{m,i}||^2 ||p'_{m,i}||^2
                                        + (1 - 5/k) sum_i (p_{m,i} . p'_{m,i})^2 ]

(one site: x_j = a_j.g Gaussian, y_j = (c w)_j; E[X_j^2] by Isserlis, E[sum_j Y_j^2] and Var <cw, cw'> by the
count sketch's pairings; the sites' cross terms are the gaussian kind's). The added term does not shrink with k:
it is small only while each piece spreads over many wide coordinates (sum_i ||p_i||^4 << ||P||^4); a piece on
one coordinate gives Var ||sk||^2 = 2 ||P||^4 at any k. Measured (tests/test_sketch.py, docs/sketches.md): at
k=128 it is about 1.4-1.5x the gaussian kind's rms error on the tiny models, and it barely improves at k=512.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch

from backend.trace.config import SKETCH_KINDS as KINDS
from backend.trace.sites import LoraSite

DEFAULT_KIND = "gaussian"      # see docs/sketches.md, Cost: the sparse kind's error grows with outlier coordinates

CACHE_BYTES = 512 << 20          # projections kept between traces (generating them is a noticeable cost)
_CACHE: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
_CACHE_SIZE = [0]


def site_seed(seed: int, layer: int, module: str, part: str, kind: str = "gaussian") -> int:
    """A 63-bit generator seed from (seed, layer, module, part, kind) alone: stable across processes and versions
    (Python's ``hash`` of a string is salted per process, so it is not used). Gaussian seeds keep their
    original form (sketches stored before ``kind`` existed stay comparable)."""
    tail = "" if kind == "gaussian" else f"|{kind}"
    h = hashlib.blake2b(f"tokviz-sketch|{seed}|{layer}|{module}|{part}{tail}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _cached(key: tuple, make) -> tuple[torch.Tensor, ...]:
    """The cached tensors under ``key``, made by ``make()`` on a miss (LRU within ``CACHE_BYTES``)."""
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    val = make()
    _CACHE[key] = val
    _CACHE_SIZE[0] += sum(t.numel() * t.element_size() for t in val)
    while _CACHE_SIZE[0] > CACHE_BYTES and len(_CACHE) > 1:
        _, old = _CACHE.popitem(last=False)
        _CACHE_SIZE[0] -= sum(t.numel() * t.element_size() for t in old)
    return val


def wide_side(site: LoraSite) -> str:
    """The side a sparse projection hashes: "in" (lora_A: in = hidden) or "out" (lora_B: out = hidden); ties: in."""
    out_f, in_f = site.param.shape
    return "in" if in_f >= out_f else "out"


def sparse_parts(seed: int, site: LoraSite, k: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factors of a site's sparse projection: (a (k, narrow) standard normal, h (wide,) bucket in [0, k),
    sign (wide,) +-1), drawn on the CPU from ``site_seed(..., kind="sparse")``, cached. Row j of the projection
    is a_j (x) sqrt(k) c_j with c_j[i] = sign_i [h_i == j] (a count sketch of the wide side), so
    sk_j = (a_j . narrow)(sum_{i: h_i = j} sign_i wide_i)."""
    out_f, in_f = site.param.shape
    wide, narrow = (in_f, out_f) if wide_side(site) == "in" else (out_f, in_f)

    def make():
        gen = torch.Generator().manual_seed(site_seed(seed, site.layer, site.module, site.part, "sparse"))
        a = torch.randn(k, narrow, generator=gen)                                  # (k, narrow)
        h = torch.randint(k, (wide,), generator=gen)                              # (wide,)
        sign = torch.randint(2, (wide,), generator=gen).mul_(2).sub_(1)           # (wide,) +-1
        return a.to(device=device, dtype=dtype), h.to(device), sign.to(device=device, dtype=dtype)

    return _cached(("sparse", seed, site.layer, site.module, site.part, out_f, in_f, k, str(device), dtype), make)


def projection(seed: int, site: LoraSite, k: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, kind: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """(a (k, out), b (k, in)) of one site, dense: row j of the site's projection is a_j b_j^T / sqrt(k).
    gaussian: standard normal, drawn on the CPU (the same numbers on any device), cached. sparse: the dense
    form of ``sparse_parts`` (for references and tests; the hooks use the factors)."""
    if kind not in KINDS:
        raise ValueError(f"sketch kind {kind!r} is not allowed; choose one of: {', '.join(KINDS)}")
    out_f, in_f = site.param.shape
    if kind == "sparse":
        a, h, sign = sparse_parts(seed, site, k, device, dtype)
        c = torch.zeros(k, h.shape[0], device=device, dtype=dtype)               # (k, wide)
        c[h, torch.arange(h.shape[0], device=device)] = sign * math.sqrt(k)
        return (a, c) if wide_side(site) == "in" else (c, a)

    def make():
        gen = torch.Generator().manual_seed(site_seed(seed, site.layer, site.module, site.part))
        a = torch.randn(k, out_f, generator=gen)                                  # (k, out)
        b = torch.randn(k, in_f, generator=gen)                                   # (k, in)
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)

    return _cached((seed, site.layer, site.module, site.part, out_f, in_f, k, str(device), dtype), make)


class Sketcher:
    """Accumulates the per-position sketch (summed over sites) as the hooks see each site's u and g.

    ``k``: sketch dimension; ``seed``: the projection seed (the trace config's seed, not the step's);
    ``scale``: multiplies every piece (the hooks' ``piece_scale``); ``rows``: per call (micro-batch), how many
    leading positions of the flattened (B*T) batch to sketch (the traced sequences come first); None: all;
    ``kind``: "gaussian" (dense rows) or "sparse" (count sketch on each site's wide side, see the module doc).
    """

    def __init__(self, sites: list[LoraSite], k: int, seed: int, scale: float = 1.0,
                 rows: list[int] | None = None, kind: str = DEFAULT_KIND):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"sketch dimension k={k!r} must be an integer >= 1")
        if kind not in KINDS:
            raise ValueError(f"sketch kind {kind!r} is not allowed; choose one of: {', '.join(KINDS)}")
        self.sites, self.k, self.seed, self.scale, self.rows, self.kind = sites, k, seed, scale, rows, kind
        labels = [(s.layer, s.module, s.part) for s in sites]
        if len(set(labels)) != len(labels):       # equal labels would get equal projections: not independent
            dup = next(lab for lab in labels if labels.count(lab) > 1)
            raise ValueError(f"two LoRA matrices share the label (layer, module, part) = {dup}: their sketch "
                             "projections would be equal; trace them under distinct module names")
        dev = sites[0].param.device
        if kind == "sparse":
            self.proj = [sparse_parts(seed, s, k, dev) for s in sites]
            self.wide_in = [wide_side(s) == "in" for s in sites]
            # index_add_ is nondeterministic on CUDA (atomics): there the count sketch is a dense +-1 (wide, k)
            # product, bitwise reproducible across runs (and cheap next to a GPU step)
            self.cdense = ([torch.zeros(h.shape[0], k, device=dev).index_put_((torch.arange(h.shape[0], device=dev), h),
                                                                            sign) for _, h, sign in self.proj]
                           if dev.type != "cpu" else None)
        else:
            self.proj = [projection(seed, s, k, dev) for s in sites]
        # per call: gaussian (k, rows), sparse (rows, k) (the scatter-add writes rows of k buckets) float32
        self.acc: list[torch.Tensor | None] = []
        self._bcat: dict[tuple[int, ...], torch.Tensor] = {}

    def _acc(self, call: int, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """The call's accumulator and the number of positions sketched in it."""
        while len(self.acc) <= call:
            self.acc.append(None)
        L = n if self.rows is None else min(n, self.rows[call])
        if self.acc[call] is None:
            shape = (L, self.k) if self.kind == "sparse" else (self.k, L)
            self.acc[call] = torch.zeros(shape, dtype=torch.float32, device=device)
        return self.acc[call], L

    @torch.no_grad()
    def add(self, call: int, i: int, uf: torch.Tensor, gf: torch.Tensor) -> None:
        """Site i's pieces g_s u_s^T of one call: uf (N, in), gf (N, out) float32."""
        acc, L = self._acc(call, uf.shape[0], uf.device)
        if L == 0:
            return
        if self.kind == "sparse":
            a, h, sign = self.proj[i]
            wide, narrow = (uf, gf) if self.wide_in[i] else (gf, uf)
            if self.cdense is not None:
                y = wide[:L] @ self.cdense[i]                                    # (L, k)
            else:
                y = torch.zeros(L, self.k, dtype=torch.float32, device=uf.device)
                y.index_add_(1, h, wide[:L] * sign)                             # (L, k): count sketch, O(L wide)
            acc.addcmul_(narrow[:L] @ a.T, y)                                    # (L, k) * (L, k)
            return
        a, b = self.proj[i]
        acc.addcmul_(a @ gf[:L].T, b @ uf[:L].T)                       # (k, L) * (k, L)

    @torch.no_grad()
    def add_group(self, call: int, group: list[int], uf: torch.Tensor, gs: list[torch.Tensor]) -> None:
        """lora_A sites fed by one input: uf (N, in) shared, gs[j] (N, r_j); b u for every site in one product."""
        if self.kind == "sparse":                   # each site hashes u its own way: one scatter-add per site
            for j, gf in zip(group, gs):
                self.add(call, j, uf, gf)
            return
        acc, L = self._acc(call, uf.shape[0], uf.device)
        if L == 0:
            return
        key = tuple(group)
        if key not in self._bcat:
            self._bcat[key] = torch.cat([self.proj[j][1] for j in group]) if len(group) > 1 else self.proj[group[0]][1]
        bu = self._bcat[key] @ uf[:L].T                                # (k |group|, L)
        for j, bu_j, gf in zip(group, bu.split(self.k), gs):
            acc.addcmul_(self.proj[j][0] @ gf[:L].T, bu_j)             # (k, L) * (k, L)

    def result(self) -> torch.Tensor:
        """(k, sum of rows over calls) float32: column s is the sketch of position s's piece (every site)."""
        if not self.acc or any(a is None for a in self.acc):
            raise RuntimeError("the backward reached no sketched LoRA site in some call")
        if self.kind == "sparse":                   # the sqrt(k) of c_j cancels the 1/sqrt(k)
            out = torch.cat(self.acc, 0) if len(self.acc) > 1 else self.acc[0]
            return (out * self.scale).T.contiguous()
        out = torch.cat(self.acc, 1) if len(self.acc) > 1 else self.acc[0]
        return out * (self.scale / math.sqrt(self.k))


def rows_of(sketch: torch.Tensor, n: int, T: int, record: torch.Tensor):
    """The (rows, k) float32 numpy sketches of the recorded positions, in ``build_columns``' row order.
    ``sketch``: (k, n * T) (the sketched sequences, flattened); ``record``: (n_all, T-1) bool, rows beyond n unset."""
    k = sketch.shape[0]
    sel = record[:n].nonzero(as_tuple=True)
    return sketch.view(k, n, T)[:, :, :-1][:, sel[0], sel[1]].T.cpu().numpy()


def predicted_variance(pieces: list[torch.Tensor], k: int, kind: str = "gaussian") -> torch.Tensor:
    """Var <sk(P_x), sk(P_y)> for every pair of positions x, y, from materialised rank-one pieces: ``pieces[m]``
    (n, out_m, in_m) is site m's piece at each of n positions. The formulas of the module docstring; (n, n)
    float64. ``kind="sparse"`` adds, per site, the count sketch's term over the wide side's coordinates."""
    if kind not in KINDS:
        raise ValueError(f"sketch kind {kind!r} is not allowed; choose one of: {', '.join(KINDS)}")
    flat = torch.cat([p.double().reshape(p.shape[0], -1) for p in pieces], 1)      # (n, sum out_m in_m)
    gram = flat @ flat.T                                                             # <P, P'>
    nsq = flat.square().sum(1)
    var = nsq[:, None] * nsq[None, :] + gram.square()
    for Pm in pieces:
        Pm = Pm.double()                                                             # (n, out, in)
        sm = Pm.reshape(Pm.shape[0], -1).square().sum(1)                             # ||P_m||^2
        # rank one, P = g u^T: ||P^T P'||_F^2 = (g.g')^2 ||u||^2 ||u'||^2, ||P P'^T||_F^2 = (u.u')^2 ||g||^2 ||g'||^2
        cg = torch.einsum("xoi,yoj->xyij", Pm, Pm).square().sum((2, 3))
        cu = torch.einsum("xoi,ypi->xyop", Pm, Pm).square().sum((2, 3))
        den = (sm[:, None] * sm[None, :]).clamp_min(1e-300)
        c2, e2 = cg / den, cu / den
        var += 2 * sm[:, None] * sm[None, :] * (c2 + e2 + c2 * e2)
        if kind == "sparse":
            # p_i: the piece's slice at wide coordinate i (a column if wide = in); k times, since var is /k below
            cols = Pm if Pm.shape[2] >= Pm.shape[1] else Pm.transpose(1, 2)           # (n, narrow, wide)
            w2 = cols.square().sum(1)                                                # (n, wide): |p_i|^2
            nn = w2 @ w2.T                                                           # sum_i |p_i|^2 |p'_i|^2
            pp = torch.einsum("xoi,yoi->xyi", cols, cols).square().sum(2)           # sum_i (p_i . p'_i)^2
            var += (k - 3) * nn + (k - 5) * pp
    return var / k
