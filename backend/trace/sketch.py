"""Per-position gradient sketches (position mode): a k-dimensional random projection of each position's piece,
computed from the factors during the backward, never forming the piece.

    sk = Sketcher(sites, k=128, seed=0, scale=1.0, rows=[n_traced * T], kind="gaussian")   # "gaussian-full", "sparse"
    hooks = PositionHooks(sites, ..., sketch=sk)                  # the hooks call sk.add / sk.add_group
    ... forward + backward ...
    S = sk.result()                                               # (k, N) float32: column s = sketch of piece s

Projection. A site m (one LoRA matrix, weight (out, in)) has, at position s, the rank-one piece P_s = x_s y_s^T,
written with y on its hidden side (``hidden_side``: y = u, the input, for lora_A; y = g, the output gradient,
for lora_B) and x on its rank side. Row j of the site's projection is the rank-one matrix a_{m,j} b_{G(m),w(j)}^T:

    sk_j(P_s) = (a_{m,j} . x_s) (b_{G(m),w(j)} . y_s) / sqrt(k),   a ~ N(0, I_rank), b ~ N(0, I_hidden)

- a_{m,j}: independent for every site and row, from (seed, layer, module, part);
- b: one set per *group* G(m) (``hidden_key``): the lora_A sites of a layer fed by one input (q/k/v, gate/up)
  share it, every other site has its own, from (seed, layer, group, part). The group's rows are those of the
  fused matrix [A_q; A_k; A_v] (its piece is g_cat u^T and (a_q, a_k, a_v)_j ~ N(0, I_{3r})): one b u and one
  (k, 3r) @ (3r, N) product per group instead of three (k, in) @ (in, N);
- w(j) = j mod (k / share): each hidden-side functional serves ``share`` rows (``row_share``: "gaussian" 4 at
  k = 128 and other multiples of 4 from 128, 2 at k = 64, 1 below 64; "gaussian-full" 1), so the costly
  (k / share, hidden) @ (hidden, N) product shrinks by share; the rows stay independent through their own a.

Per site (group) that is an (N, hidden) @ (hidden, k / share) and an (N, rank) @ (rank, k) product and an
elementwise product (the hooks hand over u and g in float32; the accumulator is held as (share, N, k / share),
where the hidden side broadcasts over the leading axis, and reordered to (N, k) at the end).
Projections depend on the seed and the site labels only: the same model and seed give the same projection at
every step and in every run, so sketches are comparable across steps and runs (and across models with the same
LoRA layout). A position's sketch is the sum over sites of its site sketches.

Error (derived for this projection; checked by tests/test_sketch.py against naive pieces over many seeds). E over
a (independent, mean zero) gives cross-site terms mean zero, and E over b gives E <sk(P), sk(P')> = <P, P'>.
Conditioning on b, each row is a product of two jointly Gaussian sums (Isserlis); the b-average is again Isserlis.
With R_G(s) the group's pieces stacked along the rank side (a (sum rank, hidden) matrix, one site: x y^T) and
for a pair of positions p, q

    C = 2 sum_G ||R_G(p) R_G(q)^T||_F^2
    A = sum_G <R_G(p) R_G(p)^T, R_G(q) R_G(q)^T>,   B = sum_G <R_G(p) R_G(q)^T, R_G(q) R_G(p)^T>
    Var <sk(P), sk(P')> = (1/k) [ ||P||^2 ||P'||^2 + <P, P'>^2 + C + A + B ] + (share/k) (A + B)

The first two terms are a dense Gaussian JL projection's variance; C + A + B is the price of rank-one rows and
share (A + B) that of rows sharing b. For a single site (x y^T, x' y'^T; c, e the cosines of x, x' and of
y, y') C + (1 + share)(A + B) = ||P||^2 ||P'||^2 (2 e^2 + (1 + share)(c^2 + c^2 e^2)): share = 1 is the
symmetric 2 (c^2 + e^2 + c^2 e^2) of independent rows. Each of C / 2, A, B is at most ||P_G||^2 ||P'_G||^2 (Cauchy-
Schwarz), so the error of <sk(P), sk(P')> / (||P|| ||P'||) has std at most sqrt((6 + 2 share)/k): sqrt(14/k) =
0.33 for "gaussian" at k=128, sqrt(8/k) = 0.25 for "gaussian-full" (one site, P = P'); with the pieces spread
over many sites (sum_G ||P_G||^4 << ||P||^4) it is near a dense projection's sqrt((1 + cos^2)/k). Fusing a
group makes it one site in these sums: barely more error than three independent sites (docs/sketches.md).
``predicted_variance`` evaluates the formula from materialised pieces.

Sparse projection (``kind="sparse"``, TraceConfig.sketch_kind). On each site's wide side (in = hidden for
lora_A, out = hidden for lora_B; ``wide_side``) b_j is replaced by sqrt(k) c_j, c a count sketch: wide coordinate
i goes to bucket h_i with sign sign_i, so c w (k,) is a scatter-add of w, O(wide) instead of O(k wide) per
position; the narrow side (r) keeps a dense Gaussian a_j. With p_{m,i} the piece's slice at wide coordinate i
(the narrow vector g u_i for lora_A) the estimator is still unbiased and

    Var_sparse = Var_gaussian + sum_m [ (1 - 3/k) sum_i ||p_{m,i}||^2 ||p'_{m,i}||^2
                                        + (1 - 5/k) sum_i (p_{m,i} . p'_{m,i})^2 ]

(one site: x_j = a_j.g Gaussian, y_j = (c w)_j; E[X_j^2] by Isserlis, E[sum_j Y_j^2] and Var <cw, cw'> by the
count sketch's pairings; the sites' cross terms are the gaussian kind's). Var_gaussian here is the formula above
with every site its own group and share = 1 (the sparse kind's sites are independent). The added term does not
shrink with k: it is small only while each piece spreads over many wide coordinates (sum_i ||p_i||^4 <<
||P||^4); a piece on one coordinate gives Var ||sk||^2 = 2 ||P||^4 at any k. Measured (tests/test_sketch.py,
docs/sketches.md): at k=128 it is about 1.2-1.4x the gaussian kind's rms error on the tiny models, 2-3x at k=512
(it barely improves with k).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch

from backend.trace.config import SKETCH_KINDS as KINDS
from backend.trace.config import row_share
from backend.trace.sites import LoraSite

DEFAULT_KIND = "gaussian"      # see docs/sketches.md, Cost: the sparse kind's error grows with outlier coordinates

# lora_A modules of one layer that read the same tensor (Llama / Qwen / Mistral names): one fused site
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                "up_proj": "mlp_in"}

CACHE_BYTES = 512 << 20          # projections kept between traces (generating them is a noticeable cost)
_CACHE: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
_CACHE_SIZE = [0]
LAYOUTS_KEPT = 4                 # Sketcher layouts (per-site projection lists) kept between traces
_LAYOUTS: OrderedDict[tuple, tuple] = OrderedDict()


def site_seed(seed: int, layer: int, module: str, part: str, kind: str = "gaussian") -> int:
    """A 63-bit generator seed from (seed, layer, module, part, kind) alone: stable across processes and versions
    (Python's ``hash`` of a string is salted per process, so it is not used). ``kind`` tags the draw ("sparse",
    "gaussian-rank", "gaussian-hidden"; "gaussian", no tag, was the previous gaussian projection's)."""
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


def hidden_side(site: LoraSite) -> str:
    """The side of a site the gaussian kind shares within a group and reuses across rows: its model-width side,
    "in" for lora_A (the module's input), "out" for lora_B (the module's output)."""
    return "in" if site.part == "lora_A" else "out"


def hidden_key(site: LoraSite) -> tuple[int, str, str]:
    """The label of a site's hidden-side projection: lora_A sites of one layer fed by one input (q/k/v:
    ``attn_in``, gate/up: ``mlp_in``) share it, (layer, group, "lora_A"); every other site has its own,
    (layer, module, part)."""
    if site.part == "lora_A" and site.module in INPUT_GROUPS:
        return (site.layer, INPUT_GROUPS[site.module], "lora_A")
    return (site.layer, site.module, site.part)


def gaussian_parts(seed: int, site: LoraSite, k: int, wide_dim: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of a site's gaussian projection: (a (k, rank side) standard normal, from (seed, layer, module,
    part); b (wide_dim, hidden side) standard normal, from (seed, ``hidden_key``): one per group of sites fed by
    one input). Drawn on the CPU (the same numbers on any device), cached. Row j of the projection is
    a_j b_{j mod wide_dim}^T / sqrt(k) (wide_dim = k / ``row_share``)."""
    kw = wide_dim
    out_f, in_f = site.param.shape
    hid, rank = (in_f, out_f) if hidden_side(site) == "in" else (out_f, in_f)
    layer, group, part = hidden_key(site)

    def make_a():
        gen = torch.Generator().manual_seed(site_seed(seed, site.layer, site.module, site.part, "gaussian-rank"))
        return (torch.randn(k, rank, generator=gen).to(device=device, dtype=dtype),)        # (k, rank)

    def make_b():
        gen = torch.Generator().manual_seed(site_seed(seed, layer, group, part, "gaussian-hidden"))
        return (torch.randn(kw, hid, generator=gen).to(device=device, dtype=dtype),)        # (wide_dim, hidden)

    a = _cached(("g-rank", seed, site.layer, site.module, site.part, rank, k, str(device), dtype), make_a)[0]
    b = _cached(("g-hidden", seed, layer, group, part, hid, kw, str(device), dtype), make_b)[0]
    return a, b


def projection(seed: int, site: LoraSite, k: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, kind: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """(a (k, out), b (k, in)) of one site, dense: row j of the site's projection is a_j b_j^T / sqrt(k).
    gaussian kinds: ``gaussian_parts`` with the hidden side's k / share rows repeated share times; sparse: the
    dense form of ``sparse_parts``. For references and tests; the hooks use the factors."""
    share = row_share(kind, k)
    if kind == "sparse":
        a, h, sign = sparse_parts(seed, site, k, device, dtype)
        c = torch.zeros(k, h.shape[0], device=device, dtype=dtype)               # (k, wide)
        c[h, torch.arange(h.shape[0], device=device)] = sign * math.sqrt(k)
        return (a, c) if wide_side(site) == "in" else (c, a)
    a, b = gaussian_parts(seed, site, k, k // share, device, dtype)
    b = b.repeat(share, 1)                                                        # (k, hidden): row j = b_{j mod kw}
    return (a, b) if hidden_side(site) == "in" else (b, a)


class Sketcher:
    """Accumulates the per-position sketch (summed over sites) as the hooks see each site's u and g.

    ``k``: sketch dimension; ``seed``: the projection seed (the trace config's seed, not the step's);
    ``scale``: multiplies every piece (the hooks' ``piece_scale``); ``rows``: per call (micro-batch), how many
    leading positions of the flattened (B*T) batch to sketch (the traced sequences come first); None: all;
    ``kind``: "gaussian" (rank-one Gaussian rows; the hidden side shared by the sites fed by one input and each
    hidden-side functional by ``row_share`` rows), "gaussian-full" (the same, one functional per row) or "sparse"
    (count sketch on each site's wide side). See the module doc.
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
        self.kw = k // row_share(kind, k)                                   # hidden-side functionals per site
        # the per-site projection layout, kept for the next trace of the same sites (building it: ~0.2 ms)
        lkey = (kind, seed, k, str(dev), tuple((*lab, *s.param.shape) for lab, s in zip(labels, sites)))
        layout = _LAYOUTS.get(lkey)
        if layout is None:
            layout = _LAYOUTS[lkey] = self._layout(sites, k, seed, kind, dev)
            while len(_LAYOUTS) > LAYOUTS_KEPT:
                _LAYOUTS.popitem(last=False)
        else:
            _LAYOUTS.move_to_end(lkey)
        if kind == "sparse":
            self.proj, self.wide_in, self.cdense = layout
        else:
            self.key, self.rank_t, self.hid_t, self.hid_in, self._plans = layout
            self._last: tuple | None = None                                  # (call, key, input, b u)
        self._abuf: dict[int, torch.Tensor] = {}                             # gaussian rank-side products
        # per call: (share, rows, wide_dim) float32, entry [c, s, w] the sketch row c * wide_dim + w of position s
        # (sparse and gaussian-full: share 1, (1, rows, k))
        self.acc: list[torch.Tensor | None] = []

    def _layout(self, sites: list[LoraSite], k: int, seed: int, kind: str, dev: torch.device) -> tuple:
        """sparse: (proj, wide_in, cdense); gaussian kinds: (key, rank_t, hid_t, hid_in, plans)."""
        if kind == "sparse":
            proj = [sparse_parts(seed, s, k, dev) for s in sites]
            # index_add_ is nondeterministic on CUDA (atomics): there the count sketch is a dense +-1 (wide, k)
            # product, bitwise reproducible across runs (and cheap next to a GPU step)
            cdense = ([torch.zeros(h.shape[0], k, device=dev).index_put_((torch.arange(h.shape[0], device=dev), h),
                                                                        sign) for _, h, sign in proj]
                      if dev.type != "cpu" else None)
            return proj, [wide_side(s) == "in" for s in sites], cdense
        # transposed once: (L, d) @ (d, k) products run ~2x faster on CPU than (k, d) @ (d, L) for small d
        parts = [gaussian_parts(seed, s, k, self.kw, dev) for s in sites]
        key = [hidden_key(s) for s in sites]
        # row j = c * wide_dim + w of a as a4[c, :, w] (share, rank, wide_dim): the rank-side product is then
        # written in the accumulator's (share, L, wide_dim) layout, where the hidden side (L, wide_dim)
        # broadcasts over the leading axis (~2x faster than broadcasting it inside an (L, share, wide_dim) view)
        rank_t = [_cached(("g-rank-4", seed, s.layer, s.module, s.part, a.shape[1], k, self.kw, str(dev)),
                          lambda a=a: (a.T.reshape(a.shape[1], -1, self.kw).permute(1, 0, 2).contiguous(),))[0]
                  for s, (a, _) in zip(sites, parts)]                          # (share, rank, wide_dim)
        hid_t = {kk: _cached(("g-hidden-T", seed, *kk, b.shape[1], self.kw, str(dev)),
                             lambda b=b: (b.T.contiguous(),))[0]
                 for kk, (_, b) in zip(key, parts)}                            # per key (hidden, wide_dim)
        plans: dict[tuple[int, ...], tuple] = {}                               # add_group: per group of sites
        return key, rank_t, hid_t, [hidden_side(s) == "in" for s in sites], plans

    def _acc(self, call: int, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """The call's accumulator and the number of positions sketched in it."""
        while len(self.acc) <= call:
            self.acc.append(None)
        L = n if self.rows is None else min(n, self.rows[call])
        if self.acc[call] is None:
            self.acc[call] = torch.zeros(self.k // self.kw, L, self.kw, dtype=torch.float32, device=device)
        return self.acc[call], L

    def _alpha(self, rank: torch.Tensor, a4: torch.Tensor) -> torch.Tensor:
        """rank (L, r) @ a4 (share, r, wide_dim) -> (share, L, wide_dim), into a buffer reused by every site (consumed
        at once by ``addcmul_``): a fresh result per site costs an allocation and its first touch."""
        L = rank.shape[0]
        buf = self._abuf.get(L)
        if buf is None:
            buf = self._abuf[L] = torch.empty(a4.shape[0], L, self.kw, dtype=torch.float32, device=rank.device)
        if a4.shape[0] == 1:
            torch.mm(rank, a4[0], out=buf[0])
        else:
            torch.bmm(rank.expand(a4.shape[0], *rank.shape), a4, out=buf)
        return buf

    def add(self, call: int, i: int, uf: torch.Tensor, gf: torch.Tensor) -> None:
        """Site i's pieces g_s u_s^T of one call: uf (N, in), gf (N, out) float32."""
        if torch.is_grad_enabled():              # hooks run without grad already: no decorator's cost per call
            with torch.no_grad():
                return self.add(call, i, uf, gf)
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
            acc[0].addcmul_(narrow[:L] @ a.T, y)                                 # (L, k) * (L, k)
            return
        hid, rank = (uf, gf) if self.hid_in[i] else (gf, uf)
        if L < hid.shape[0]:
            hid, rank = hid[:L], rank[:L]
        key = self.key[i]
        # sites sharing a hidden projection fed one input one after another (the given-G path's q/k/v): b u once.
        # One slot: it holds the input alive (its address cannot be reused meanwhile) but never more than one
        last = self._last
        if (last is not None and last[:2] == (call, key) and last[2].data_ptr() == hid.data_ptr()
                and last[2].shape == hid.shape and last[2].stride() == hid.stride()):
            beta = last[3]
        else:
            beta = hid @ self.hid_t[key]                                         # (L, wide_dim)
            self._last = (call, key, hid, beta) if self.hid_in[i] else None
        acc.addcmul_(self._alpha(rank, self.rank_t[i]), beta)                  # (share, L, wide_dim) * (L, wide_dim)

    def add_group(self, call: int, group: list[int], uf: torch.Tensor, gs: list[torch.Tensor],
                  gcat: torch.Tensor | None = None) -> None:
        """lora_A sites fed by one input: uf (N, in) shared, gs[j] (N, r_j) (``gcat``: their concatenation, if
        at hand). Sites sharing a hidden projection (q/k/v) are one fused site [A_q; A_k; A_v]: one u b and one
        (L, sum r) @ (sum r, k) product."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.add_group(call, group, uf, gs, gcat)
        if self.kind == "sparse":                   # each site hashes u its own way: one scatter-add per site
            for j, gf in zip(group, gs):
                self.add(call, j, uf, gf)
            return
        acc, L = self._acc(call, uf.shape[0], uf.device)
        if L == 0:
            return
        plan = self._plans.get(tuple(group))
        if plan is None:                            # per hidden key: the members' places in group, their a
            by_key: dict[tuple, list[int]] = {}
            for n, j in enumerate(group):
                by_key.setdefault(self.key[j], []).append(n)
            bcat = torch.cat([self.hid_t[key] for key in by_key], 1) if len(by_key) > 1 else self.hid_t[
                next(iter(by_key))]                                                    # (in, wide_dim * keys)
            parts = [(tuple(idx), torch.cat([self.rank_t[group[n]] for n in idx], 1) if len(idx) > 1
                      else self.rank_t[group[idx[0]]]) for idx in by_key.values()]      # (share, sum r, wide_dim)
            plan = self._plans[tuple(group)] = (bcat, parts)
        bcat, parts = plan
        beta = (uf if L == uf.shape[0] else uf[:L]) @ bcat                     # (L, wide_dim * keys)
        for (idx, acat), beta_key in zip(parts, beta.split(self.kw, 1) if len(parts) > 1 else (beta,)):
            if gcat is not None and len(parts) == 1:
                g = gcat
            else:
                g = torch.cat([gs[n] for n in idx], 1) if len(idx) > 1 else gs[idx[0]]   # (N, sum r)
            acc.addcmul_(self._alpha(g if L == g.shape[0] else g[:L], acat), beta_key)

    def result(self) -> torch.Tensor:
        """(k, sum of rows over calls) float32, a transposed view: column s is the sketch of position s's piece
        (every site)."""
        if not self.acc or any(a is None for a in self.acc):
            raise RuntimeError("the backward reached no sketched LoRA site in some call")
        self._last = None
        self._abuf.clear()
        acc = torch.cat(self.acc, 1) if len(self.acc) > 1 else self.acc[0]       # (share, N, wide_dim)
        # sparse: the sqrt(k) of c_j cancels the 1/sqrt(k)
        scale = self.scale if self.kind == "sparse" else self.scale / math.sqrt(self.k)
        out = torch.empty(acc.shape[1], acc.shape[0], acc.shape[2], dtype=acc.dtype, device=acc.device)
        torch.mul(acc.permute(1, 0, 2), scale, out=out)                          # (N, share, wide_dim) = (N, k)
        return out.view(acc.shape[1], self.k).T


def rows_of(sketch: torch.Tensor, n: int, T: int, record: torch.Tensor):
    """The (rows, k) float32 numpy sketches of the recorded positions, in ``build_columns``' row order.
    ``sketch``: (k, n * T) (the sketched sequences, flattened); ``record``: (n_all, T-1) bool, rows beyond n unset."""
    b, s = record[:n].nonzero(as_tuple=True)
    idx = (b * T + s).to(sketch.device)
    # one index_select of whole rows of the (N, k) storage (``Sketcher.result`` is its transposed view), else of
    # columns: several times faster than advanced indexing of a (k, n, T-1) view
    if sketch.T.is_contiguous():
        return sketch.T.index_select(0, idx).cpu().numpy()
    return sketch.index_select(1, idx).T.cpu().numpy()


def predicted_variance(pieces: list[torch.Tensor], k: int, kind: str = "gaussian",
                       sites: list[LoraSite] | None = None) -> torch.Tensor:
    """Var <sk(P_x), sk(P_y)> for every pair of positions x, y, from materialised rank-one pieces: ``pieces[m]``
    (n, out_m, in_m) is site m's piece at each of n positions. The formulas of the module docstring; (n, n)
    float64. Gaussian kinds: ``sites`` (aligned with ``pieces``) gives the groups sharing a hidden projection and
    each piece's hidden side (None: every piece its own group, hidden side = the wider one), ``row_share`` the
    rows per hidden-side functional. ``kind="sparse"`` (independent sites, independent rows): the singleton
    formula plus, per site, the count sketch's term over the wide side's coordinates."""
    kw = k // row_share(kind, k)
    if sites is not None and len(sites) != len(pieces):
        raise ValueError(f"{len(sites)} sites for {len(pieces)} pieces: pass one site per piece")
    if kind == "sparse" and sites is not None:
        raise ValueError("the sparse kind's sites are independent: leave sites=None")
    flat = torch.cat([p.double().reshape(p.shape[0], -1) for p in pieces], 1)      # (n, sum out_m in_m)
    gram = flat @ flat.T                                                             # <P, P'>
    nsq = flat.square().sum(1)
    var = nsq[:, None] * nsq[None, :] + gram.square()
    # each piece as (n, rank, hidden) = x y^T (y: the side shared in a group and reused across rows)
    groups: dict[object, list[torch.Tensor]] = {}
    for m, Pm in enumerate(pieces):
        Pm = Pm.double()
        if sites is not None:
            hid_in = hidden_side(sites[m]) == "in"
        else:
            hid_in = Pm.shape[2] >= Pm.shape[1]
        groups.setdefault(hidden_key(sites[m]) if sites is not None else m, []).append(
            Pm if hid_in else Pm.transpose(1, 2))
    wide = 0
    for members in groups.values():
        R = torch.cat(members, 1) if len(members) > 1 else members[0]               # (n, sum rank, hidden): fused
        N = torch.einsum("pah,qbh->pqab", R, R)                                     # R(p) R(q)^T
        c = 2 * N.square().sum((2, 3))                                              # 2 ||R(p) R(q)^T||^2
        d = torch.diagonal(N, dim1=0, dim2=1).permute(2, 0, 1).reshape(N.shape[0], -1)   # R(p) R(p)^T
        t = d @ d.T + (N * N.transpose(0, 1)).sum((2, 3))                           # A + B (module doc)
        var += c + t
        wide = wide + t
        if kind == "sparse":
            # p_i: the piece's slice at wide coordinate i; k times, since var is /k below
            w2 = R.square().sum(1)                                                   # (n, wide): |p_i|^2
            nn = w2 @ w2.T                                                           # sum_i |p_i|^2 |p'_i|^2
            pp = torch.einsum("xoi,yoi->xyi", R, R).square().sum(2)                 # sum_i (p_i . p'_i)^2
            var += (k - 3) * nn + (k - 5) * pp
    return var / k + wide / kw
