"""The tracer's config: one dataclass, validated on construction.

    cfg = TraceConfig(mode="token", magnitude="sketch", sketch_k=64, max_sequences=4)
    cfg = TraceConfig.from_dict(saved)          # as stored with every traced step
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

MODES = ("position", "token")
TRACE_LOSSES = ("scheme", "ce")
MAGNITUDES = ("exact", "sketch", "none")
TOKEN_POSITIONS = ("all", "response")
AUTOCAST_DTYPES = ("bfloat16", "float16")
# backend.trace.sketch: rank-one Gaussian rows, a hidden-side factor per 4 rows | one per row | count sketch
SKETCH_KINDS = ("gaussian", "gaussian-full", "sparse")
SKETCH_SHARE = 4               # gaussian: sketch rows per hidden-side functional (docs/sketches.md, Cost and Error)
SKETCH_MIN_WIDE = 32           # ... while at least this many functionals remain (small k: the error grows fast)


def row_share(kind: str, k: int) -> int:
    """How many sketch rows share one hidden-side functional. gaussian: the largest of SKETCH_SHARE (4), 2 that
    divides k and leaves at least SKETCH_MIN_WIDE (32) functionals (4 at k = 128, 256, ...; 2 at k = 64), else 1;
    gaussian-full and sparse: 1 (every row its own)."""
    if kind not in SKETCH_KINDS:
        raise ValueError(f"sketch kind {kind!r} is not allowed; choose one of: {', '.join(SKETCH_KINDS)}")
    if kind != "gaussian":
        return 1
    return next((s for s in (SKETCH_SHARE, 2) if k % s == 0 and k // s >= SKETCH_MIN_WIDE), 1)


def sketch_error_bound(kind: str, k: int) -> float | None:
    """The bound on the standard deviation of a sketch's cosine error, |cos(sk, sk') - cos(P, P')|, for pieces
    anywhere (one LoRA matrix, P = P' is the worst case): sqrt((6 + 2 share) / k) for the gaussian kinds; None for
    "sparse", whose error has a floor that depends on the activations (docs/sketches.md)."""
    if kind == "sparse":
        return None
    return math.sqrt((6 + 2 * row_share(kind, k)) / k)


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TraceConfig:
    mode: str = _f("position", "position: per-position pieces of the batch gradient; token: the gradient of "
                               "each token's own loss (see docs/design.md, Definitions)")
    trace_loss: str = _f("scheme", "the loss whose gradient G is traced: the scheme's weighted loss (scheme) or "
                                   "plain mean cross-entropy over response tokens (ce)")
    magnitude: str = _f("exact", "token mode: ||g_t|| exact (batched per-token backward), estimated from "
                                 "sketch_k random-direction JVPs (sketch), or not computed (none)")
    sketch_k: int = _f(64, "token mode, magnitude=sketch: random directions (relative error ~ sqrt(1/(2k)))")
    max_sequences: int = _f(8, "sequences of the given batch that are traced (the first ones)")
    micro_batch_size: int | None = _f(None, "split the traced batch into micro-batches of this many sequences; "
                                            "G is then the gradient of their mean loss, as with gradient "
                                            "accumulation (position mode then runs two passes). None: one pass")
    inline: bool = _f(False, "trace the real training step (position mode, accumulation 1) instead of a re-run; "
                             "use backend.trace.InlineTrace")
    dropout: bool = _f(False, "re-run with the adapter's dropout (train mode) from a recorded RNG state; off: "
                              "eval mode, the traced gradient is deterministic. Token mode needs it off")
    seed: int = _f(0, "seed of the traced pass's dropout and of the sketch directions (plus the step)")
    target_modules: tuple | None = _f(None, "LoRA module names to trace (e.g. ['q_proj', 'down_proj']); "
                                            "None: every LoRA module found")
    module_rows: bool = _f(True, "write token_modules rows; token mode without exact magnitudes then runs one "
                                 "forward-mode pass per LoRA matrix")
    token_positions: str = _f("all", "token mode: trace every non-padding position (all) or only response "
                                     "tokens (response)")
    grad_chunk: int = _f(32, "token mode, exact magnitudes: per-token cotangents per batched backward")
    jvp_chunk: int = _f(8, "token mode: tangents per vmapped forward-mode pass (sketch directions, modules)")
    stats_chunk: int = _f(1024, "rows per float32 log-softmax chunk for loss, prob and entropy")
    full_check: bool = _f(False, "position mode: check that the pieces sum to G for every LoRA matrix (costs "
                                 "autograd's weight gradients); default: the lowest traced layer")
    distributed: bool = _f(True, "under torch.distributed, make G the global gradient (all-reduced mean)")
    autocast: str | None = _f(None, "run the traced passes under torch.autocast of this dtype (bfloat16, float16), "
                                    "as a mixed-precision training step runs; position mode only")
    sketch_dim: int = _f(0, "position mode: keep a k-dimensional random projection of each position's piece "
                            "(backend.trace.sketch; inner products estimate the pieces' with an error std "
                            "<= sqrt(14/k) ||P|| ||P'||, gaussian kind); 0: off")
    sketch_kind: str = _f("gaussian", "position mode, sketch_dim > 0: the projection (docs/sketches.md): gaussian "
                                      "(rank-one Gaussian rows, each hidden-side factor shared by 4 rows: error std "
                                      "<= sqrt(14/k)), gaussian-full (one hidden-side factor per row: error std <= "
                                      "sqrt(8/k), up to ~15% lower, ~1.8x the cost on small models) or sparse (count "
                                      "sketch of the hidden side: error grows with activations concentrated on few "
                                      "coordinates and does not fall with k)")

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("trace_loss", TRACE_LOSSES), ("magnitude", MAGNITUDES),
                              ("token_positions", TOKEN_POSITIONS), ("sketch_kind", SKETCH_KINDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; choose one of: "
                                 f"{', '.join(allowed)}")
        for name, lo, hi in (("sketch_k", 1, 65536), ("max_sequences", 1, 1 << 20), ("grad_chunk", 1, 65536),
                             ("jvp_chunk", 1, 65536), ("stats_chunk", 1, 1 << 24)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}={v!r} must be an integer in [{lo}, {hi}]")
        if self.micro_batch_size is not None and (isinstance(self.micro_batch_size, bool) or
                                                  not isinstance(self.micro_batch_size, int) or
                                                  self.micro_batch_size < 1):
            raise ValueError(f"micro_batch_size={self.micro_batch_size!r} must be None or an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) and t
                                                               for t in self.target_modules):
                raise ValueError(f"target_modules must be None or a list of module names, "
                                 f"got {self.target_modules!r}")
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules must not be empty (None traces every LoRA module)")
        if self.mode == "token" and self.dropout:
            raise ValueError("dropout=True is only allowed in position mode: token mode runs several passes "
                             "(gradient, JVPs, per-token backward) that must all see the same network")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={self.autocast!r} is not allowed; choose None or one of: "
                             f"{', '.join(AUTOCAST_DTYPES)}")
        if self.autocast is not None and self.mode != "position":
            raise ValueError("autocast is only supported in position mode (token mode's forward-mode passes are "
                             "not replayed under autocast): trace in position mode, or train in float32")
        sd = self.sketch_dim
        if isinstance(sd, bool) or not isinstance(sd, int) or not 0 <= sd <= 65536:
            raise ValueError(f"sketch_dim={self.sketch_dim!r} must be an integer in [0, 65536] (0: no sketches)")
        if self.sketch_dim and self.mode != "position":
            raise ValueError("sketch_dim > 0 is only supported in position mode (sketches are projected from the "
                             "pieces' factors); trace in position mode or set sketch_dim=0")
        if self.inline and self.mode != "position":
            raise ValueError("inline=True needs mode='position' (token mode needs passes of its own)")
        if self.inline and self.micro_batch_size is not None:
            raise ValueError("inline=True traces the real step as one backward: leave micro_batch_size=None")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TraceConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown trace config field(s): {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_train_config(cls, tc: Any, **overrides: Any) -> "TraceConfig":
        """The trace config a TrainConfig asks for (its ``trace_*`` fields), with ``overrides`` on top.
        ``trace_magnitude="auto"`` gives "exact" here: ``plan_cost`` chooses once the model and a batch are known."""
        magnitude = "exact" if tc.trace_magnitude == AUTO else tc.trace_magnitude
        d = dict(mode=tc.trace_mode, trace_loss=tc.trace_loss, magnitude=magnitude,
                 sketch_k=tc.trace_sketch_k, max_sequences=tc.trace_sequences, inline=tc.trace_inline,
                 seed=tc.seed, sketch_dim=tc.trace_sketch_dim,
                 sketch_kind=tc.trace_sketch_kind)
        d.update(overrides)
        return cls(**d)


# ---- what a traced step costs, said before the first one ------------------------------------------------------

AUTO = "auto"              # TrainConfig.trace_magnitude: plan_cost picks exact or sketch (and k) within COST_BUDGET
COST_BUDGET = 10.0         # a traced step should cost at most this many plain training steps
MIN_SKETCH_K = 16          # auto never sketches with fewer directions (norm error ~ sqrt(1/32) = 18%)


@dataclass(frozen=True)
class StepShape:
    """What a traced step's cost depends on besides the trace config."""
    n_sites: int              # LoRA matrices traced (2 per adapted module)
    batch_sequences: int      # B: sequences of the step on this rank (every micro-batch)
    traced_sequences: int     # S: the first ones get rows (min(max_sequences, B))
    positions: float          # n: recorded positions per traced sequence (mean)
    seq_len: int              # T: padded length
    n_params: int = 0         # the model's parameters, for the FLOP figure only


def sketch_error(k: int) -> float:
    """Relative error of a sketched norm from k Gaussian directions: sqrt(1/(2k)) (chi-square with k degrees)."""
    return math.sqrt(1.0 / (2 * k))


def trace_cost(cfg: TraceConfig, shape: StepShape) -> float:
    """Expected cost of a traced step as a multiple of a plain training step (the traced step includes it).

    Unit U: one forward pass over one sequence of the step (about 2 * n_params * T FLOPs). A backward costs two
    forwards; so does each vmapped forward-mode tangent (JVP) beside the shared primal (measured with
    bench/trace_cost.py: 1.8-1.9 U per tangent on CPU, the tangent's own products plus vmap's). With B sequences in the
    step, S of them traced, n recorded positions per traced sequence, M LoRA matrices, k sketch directions,
    j = jvp_chunk tangents per vmapped pass and c = grad_chunk cotangents per batched backward:

        plain step                  P = 3B
        position mode (re-run)      3B            (x2 with micro-batches: two passes); inline: 0.1 P (pieces)
        token mode                  3B            G, a full forward + backward of the step
                                  + 2S            dot: one JVP along G
                                  + S (2k + ceil(k/j))                    magnitude="sketch"
                                  + S (2M + ceil(M/j))                    module rows, magnitude != "exact"
                                  + S (ceil(n/c) + 2n)                    magnitude="exact": a backward per
                                                                          position over (at most) the sequence
        ratio = (P + trace) / P

    Exact magnitudes grow with the sequence length (n backward passes per traced sequence), module rows without
    them with the model's depth (M passes): those are the terms ``plan_cost`` keeps within ``COST_BUDGET``. Token
    mode also runs its own attention (``tokviz_jvp``: +0.1-0.2x a plain step at T = 1024, docs/token_attention.md),
    which this leaves out.
    """
    B, S = max(1, shape.batch_sequences), max(1, min(shape.traced_sequences, shape.batch_sequences))
    plain = 3.0 * B
    if cfg.mode == "position":
        trace = 0.1 * plain if cfg.inline else 3.0 * B * (2 if cfg.micro_batch_size else 1)
        return (plain + trace) / plain
    j, M, n = cfg.jvp_chunk, shape.n_sites, shape.positions
    trace = 3.0 * B + 2.0 * S
    if cfg.magnitude == "sketch":
        trace += S * (2.0 * cfg.sketch_k + math.ceil(cfg.sketch_k / j))
    if cfg.module_rows and cfg.magnitude != "exact":
        trace += S * (2.0 * M + math.ceil(M / j))
    if cfg.magnitude == "exact":
        trace += S * (math.ceil(n / cfg.grad_chunk) + 2.0 * n)
    return (plain + trace) / plain


def plan_cost(cfg: TraceConfig, shape: StepShape, auto: bool,
              budget: float = COST_BUDGET) -> tuple[TraceConfig, float, str]:
    """(the config to trace with, its ``trace_cost``, a sentence saying what it costs and why it was chosen).

    ``auto`` (token mode's ``trace_magnitude="auto"``): exact magnitudes if they fit ``budget``; else sketched
    ones with ``cfg.sketch_k`` directions, halved down to ``MIN_SKETCH_K`` until they fit; else, as a last
    resort, without per-module rows (a pass per LoRA matrix). Without ``auto`` the config is kept as asked.
    With the train defaults (4 of 16 sequences traced) the cheapest of these costs ~5x whatever the model; when most
    of a step's sequences are traced even it can exceed the budget, and the sentence says so.
    """
    if auto and cfg.mode == "token":
        ks = [cfg.sketch_k]
        while ks[-1] // 2 >= MIN_SKETCH_K:
            ks.append(ks[-1] // 2)
        tries = [replace(cfg, magnitude="exact", module_rows=True)]
        tries += [replace(cfg, magnitude="sketch", sketch_k=k, module_rows=True) for k in ks]
        tries += [replace(cfg, magnitude="sketch", sketch_k=k, module_rows=False) for k in ks]
        cfg = next((c for c in tries if trace_cost(c, shape) <= budget), tries[-1])
    ratio = trace_cost(cfg, shape)
    return cfg, ratio, describe_cost(cfg, shape, ratio, auto, budget)


def describe_cost(cfg: TraceConfig, shape: StepShape, ratio: float, auto: bool, budget: float) -> str:
    """One sentence: the trace settings, their error bound where sketched, and the expected cost."""
    S = min(shape.traced_sequences, shape.batch_sequences)
    what = f"{cfg.mode} mode, {S} of {shape.batch_sequences} sequences traced"
    if cfg.mode == "token":
        if cfg.magnitude == "sketch":
            what += (f", magnitudes sketched from k={cfg.sketch_k} directions (relative error of ||g_t|| about "
                     f"sqrt(1/(2k)) = {sketch_error(cfg.sketch_k):.0%}; dots stay exact)")
        else:
            what += f", magnitudes {cfg.magnitude}"
        if cfg.magnitude != "exact":
            what += (f", per-module rows from {shape.n_sites} forward-mode passes" if cfg.module_rows
                     else ", no per-module rows")
        if auto:
            what += (f" (chosen by --trace-magnitude auto to stay within ~{budget:g}x; --trace-magnitude exact "
                     "asks for exact ones)" if cfg.magnitude != "exact" else " (--trace-magnitude auto)")
    flops = ""
    if shape.n_params:
        per_u = 2.0 * shape.n_params * shape.seq_len
        flops = f", about {ratio * 3 * shape.batch_sequences * per_u / 1e12:.3g} TFLOP"
    over = ""
    if ratio > budget:
        over = (f"; above the ~{budget:g}x target: tracing fewer of the step's sequences (--trace-sequences) "
                "or, in token mode, --trace-magnitude none lowers it")
    return (f"expected cost of a traced step: ~{ratio:.1f}x a plain training step{flops} ({what}; "
            f"{shape.positions:.0f} recorded positions per traced sequence, {shape.n_sites} LoRA matrices; "
            f"estimate of backend.trace.config.trace_cost){over}")
