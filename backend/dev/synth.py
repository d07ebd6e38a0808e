"""Synthetic trace runs of realistic shape, for tests and benchmarks (no model, no torch).

    from backend.dev.synth import SynthConfig, make_run
    run_path = make_run(SynthConfig(n_layers=2, n_samples=3, traced_steps=(10, 20)), root=tmp_path)

    python -m backend.dev.synth --out /tmp/runs --layers 28 --samples 8 --steps 10   # a 10M-row trace

The numbers obey the design's definitions exactly, so analyses can be checked against them: per-module
pieces get an alignment alpha_{t,m} and a magnitude ||P_{t,m}||; the batch gradient's module norms are
||G_m|| = sum_t alpha_{t,m} ||P_{t,m}|| (so that sum_t <P_{t,m}, G_m> = ||G_m||^2), and the token rows are
derived from the module rows: dot_t = sum_m dot_{t,m}, magnitude_t = sqrt(sum_m ||P_{t,m}||^2),
alignment_t = dot_t / (magnitude_t ||G||), share_t = dot_t / ||G||^2 (shares sum to 1 per step).

Planted structure: alignment decays with response position and over training, is autocorrelated along
the sequence (AR(1)), differs by token category and module; magnitudes are heavy-tailed (lognormal) and
larger for lora_B than lora_A and in later layers.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from backend.lm.categories import categorize
from backend.store import schema
from backend.store.rundir import RunDir

if TYPE_CHECKING:
    import pandas as pd

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = ("lora_A", "lora_B")

# (text, weight in prompts, weight in responses); "<|im_end|>" closes every response
VOCAB: tuple[tuple[str, float, float], ...] = (
    (" the", 6, 3), (" of", 4, 2), (" is", 3, 2), (" a", 4, 2), (" number", 2, 1), (" total", 2, 1),
    (" how", 2, 0.2), (" many", 2, 0.2), (" apples", 2, 0.5), (" has", 2, 0.5), (" we", 0.5, 3),
    (" get", 0.5, 2), (" Step", 0, 2), (" Therefore", 0, 1), (" So", 0, 1), (" ####", 0, 0.5),
    ("ing", 1, 1), ("ed", 1, 1), ("s", 1, 1), (" 3", 1.5, 2), (" 12", 1.5, 2), ("7", 1, 2), (" 45", 1, 2),
    ("0", 0.5, 1.5), (" +", 0.5, 2), (" -", 0.3, 1.5), (" =", 0.3, 3), (" *", 0.2, 1), (" /", 0.2, 1),
    (" \\frac", 0, 0.5), ("{", 0, 0.5), ("}", 0, 0.5), ("$", 0.2, 0.5), (".", 2, 2), (",", 2, 1.5),
    (":", 0.5, 1), ("?", 1, 0.1), ("\n", 1, 2), ("\n\n", 0.5, 1), (" Answer", 0, 0.3), ("×", 0, 0.2),
)
END_TOKEN = "<|im_end|>"
# planted mean offset of alignment by category (numbers and operators carry the signal, fillers oppose)
CATEGORY_BIAS = {"number": 0.06, "operator": 0.03, "step_marker": -0.04, "word": 0.0, "subword": -0.01,
                 "punctuation": -0.05, "whitespace": -0.06, "latex": 0.02, "special": -0.02, "other": 0.0}
CATEGORY_LOSS = {"number": 1.6, "operator": 0.6, "step_marker": 0.4, "word": 1.0, "subword": 0.3,
                 "punctuation": 0.5, "whitespace": 0.3, "latex": 0.8, "special": 0.2, "other": 1.0}
MODULE_BIAS = {"q_proj": 0.0, "k_proj": -0.03, "v_proj": 0.01, "o_proj": 0.0, "gate_proj": 0.0,
               "up_proj": 0.01, "down_proj": 0.04}
MODULE_SCALE = {"q_proj": 0.6, "k_proj": 0.5, "v_proj": 1.0, "o_proj": 1.0, "gate_proj": 1.4, "up_proj": 1.4,
                "down_proj": 1.6}


@dataclass(frozen=True)
class SynthConfig:
    n_layers: int = field(default=28, metadata={"help": "transformer layers with LoRA adapters"})
    modules: tuple[str, ...] = field(default=MODULES, metadata={"help": "adapted module names per layer"})
    traced_steps: tuple[int, ...] = field(default=(10, 50, 100, 150, 200, 250, 300, 350, 400, 450),
                                          metadata={"help": "optimizer steps at which the trace was taken"})
    max_step: int = field(default=500, metadata={"help": "optimizer steps of the training run"})
    n_samples: int = field(default=8, metadata={"help": "traced samples per step (the same ones each step)"})
    prompt_len: tuple[int, int] = field(default=(40, 120), metadata={"help": "prompt length range [lo, hi]"})
    response_len: tuple[int, int] = field(default=(150, 400), metadata={"help": "response length range"})
    world_size: int = field(default=1, metadata={"help": "DDP ranks: samples split round-robin over ranks"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    finished: bool = field(default=True, metadata={"help": "write manifest.json (False: a run still going)"})
    scheme: str = field(default="sft", metadata={"help": "scheme name recorded in the config"})
    mode: str = field(default="position", metadata={"help": "trace mode written to tokens.mode: position or token"})

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not self.modules:
            raise ValueError("modules must name at least one module")
        if not self.traced_steps or list(self.traced_steps) != sorted(set(self.traced_steps)):
            raise ValueError(f"traced_steps must be increasing and non-empty, got {self.traced_steps}")
        if self.traced_steps[0] < 1 or self.traced_steps[-1] > self.max_step:
            raise ValueError(f"traced_steps must lie in [1, max_step={self.max_step}], got {self.traced_steps}")
        if self.n_samples < 1 or self.world_size < 1:
            raise ValueError(f"n_samples and world_size must be >= 1, got {self.n_samples}, {self.world_size}")
        if self.mode not in ("position", "token"):
            raise ValueError(f"mode must be 'position' or 'token', got {self.mode!r}")
        for name in ("prompt_len", "response_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")

    @property
    def rows_per_token(self) -> int:
        return self.n_layers * len(self.modules) * len(PARTS)

    @classmethod
    def tiny(cls, **overrides: object) -> "SynthConfig":
        """A run of a few hundred tokens over 2 layers: tests in milliseconds."""
        base = dict(n_layers=2, traced_steps=(5, 10, 20), max_step=20, n_samples=4, prompt_len=(5, 10),
                    response_len=(20, 40))
        return cls(**{**base, **overrides})  # type: ignore[arg-type]


def read_shards(run_path: Path, table: str) -> "pd.DataFrame":
    """All Parquet shards of one table of a run, read with pyarrow alone (an index-free reference for
    tests). ``table``: a table of the train kind (backend.jobs.train)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from backend.jobs import registry
    glob = {t.name: t.glob for t in registry.get("train").tables}[table]
    files = sorted(p for p in Path(run_path).glob(glob) if not p.name.startswith("."))
    if not files:
        raise ValueError(f"{run_path} has no {table} shards ({glob})")
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


@dataclass
class _Samples:
    sample_idx: np.ndarray     # (T,) per token record
    position: np.ndarray       # (T,)
    resp_pos: np.ndarray       # (T,) -1 for prompt rows
    token_id: np.ndarray       # (T,)
    is_response: np.ndarray    # (T,) bool


def _vocab() -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    texts = [v[0] for v in VOCAB] + [END_TOKEN]
    cats = [categorize(t) for t in texts[:-1]] + [categorize(END_TOKEN, is_special=True)]
    wp = np.array([v[1] for v in VOCAB] + [0.0])
    wr = np.array([v[2] for v in VOCAB] + [0.0])
    return texts, cats, wp / wp.sum(), wr / wr.sum()


def _make_samples(cfg: SynthConfig, rng: np.random.Generator) -> _Samples:
    texts, _, wp, wr = _vocab()
    end_id = len(texts) - 1
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("sample_idx", "position", "resp_pos", "token_id",
                                                          "is_response")}
    sample_ids = np.sort(rng.choice(10 * cfg.n_samples + 100, size=cfg.n_samples, replace=False))
    for sid in sample_ids:
        p = int(rng.integers(cfg.prompt_len[0], cfg.prompt_len[1] + 1))
        r = int(rng.integers(cfg.response_len[0], cfg.response_len[1] + 1))
        ids = np.concatenate([rng.choice(len(texts), size=p, p=wp), rng.choice(len(texts), size=r - 1, p=wr),
                              [end_id]])
        n = p + r
        parts["sample_idx"].append(np.full(n, sid, np.int32))
        parts["position"].append(np.arange(n, dtype=np.int32))
        parts["resp_pos"].append(np.concatenate([np.full(p, -1), np.arange(r)]).astype(np.int32))
        parts["token_id"].append(ids.astype(np.int32))
        parts["is_response"].append(np.arange(n) >= p)
    return _Samples(**{k: np.concatenate(v) for k, v in parts.items()})


def _ar1(s: _Samples, rng: np.random.Generator, phi: float, sigma: float) -> np.ndarray:
    """AR(1) noise along each sample's sequence, stationary std ``sigma``, lag-k correlation phi^k."""
    z = rng.standard_normal(len(s.position)) * sigma
    out = np.empty_like(z)
    starts = np.flatnonzero(s.position == 0)
    bounds = list(starts) + [len(z)]
    innov = math.sqrt(1 - phi * phi)
    for a, b in zip(bounds[:-1], bounds[1:]):
        e = z[a:b].copy()
        for t in range(1, b - a):
            e[t] = phi * e[t - 1] + innov * e[t]
        out[a:b] = e
    return out


def _step_tables(cfg: SynthConfig, step: int, s: _Samples, cats: np.ndarray,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Token and module columns of one traced step (numpy, row order: sample, position[, layer, module, part])."""
    T, L, K = len(s.position), cfg.n_layers, len(cfg.modules)
    M = L * K * len(PARTS)
    frac = step / cfg.max_step
    resp = s.is_response
    # per-token loss, probability, entropy: category-dependent, falling over training
    base_loss = np.array([CATEGORY_LOSS[c] for c in cats])
    loss = base_loss * (1.2 - 0.6 * frac) * rng.gamma(2.0, 0.5, T)
    prob = np.exp(-loss)
    entropy = np.clip(0.7 * loss + rng.gamma(2.0, 0.15, T), 0, None)
    # per-token alignment level: positional decay + drift over training + category bias + AR(1) noise
    level = 0.18 - 0.08 * frac
    decay = 0.35 + 0.65 * np.exp(-np.maximum(s.resp_pos, 0) / 120.0)
    cat_bias = np.array([CATEGORY_BIAS[c] for c in cats])
    base = np.where(resp, level * decay + cat_bias, 0.03) + _ar1(s, rng, phi=0.5, sigma=0.15)
    tokmag = np.exp(rng.normal(math.log(0.02) + 0.35 * (loss - 1.0), 0.9)) * np.where(resp, 1.0, 0.3)
    # module pieces: m = (layer * K + module) * 2 + part
    layer_of = np.repeat(np.arange(L), K * 2)
    module_of = np.tile(np.repeat(np.arange(K), 2), L)
    part_of = np.tile(np.arange(2), L * K)
    w = ((0.5 + layer_of / L) * np.array([MODULE_SCALE.get(m, 1.0) for m in cfg.modules])[module_of]
         * np.where(part_of == 1, 3.0, 1.0))
    wn = w[None, :] * rng.gamma(4.0, 0.25, (T, M))                        # (T, M)
    mag = tokmag[:, None] * np.sqrt(wn / wn.sum(axis=1, keepdims=True))   # (T, M), rows: sum mag^2 = tokmag^2
    bias = np.array([MODULE_BIAS.get(m, 0.0) for m in cfg.modules])[module_of] + rng.normal(0, 0.02, M)
    alpha = np.clip(base[:, None] + bias[None, :] + 0.25 * rng.standard_normal((T, M)), -1.0, 1.0)
    # ||G_m|| = sum_t alpha mag must be positive: lift any module whose sum is too small (rare, tiny runs)
    for _ in range(20):
        gm = (alpha * mag).sum(axis=0)
        floor = 0.05 * (np.abs(alpha) * mag).sum(axis=0)
        low = gm < floor
        if not low.any():
            break
        alpha[:, low] = np.clip(alpha[:, low] + (floor[low] - gm[low]) / mag[:, low].sum(axis=0) + 0.01, -1, 1)
    assert (gm > 0).all(), "synthetic module gradient norms must be positive"
    dot_m = alpha * mag * gm[None, :]                                      # (T, M)
    g2 = float((gm * gm).sum())
    dot = dot_m.sum(axis=1)
    alignment = dot / (tokmag * math.sqrt(g2))
    tokens = dict(step=np.full(T, step, np.int32), loss=loss, prob=prob, entropy=entropy,
                  weight=resp.astype(np.float32), alignment=alignment, dot=dot, share=dot / g2, magnitude=tokmag)
    modules = dict(layer=layer_of, module=module_of, part=part_of, alignment=alpha, dot=dot_m, magnitude=mag)
    return tokens, modules


def _table(columns: dict[str, pa.Array | np.ndarray], s: pa.Schema) -> pa.Table:
    assert set(columns) == set(s.names), f"columns {sorted(columns)} do not match {s.names}"
    arrays = []
    for f in s:
        col = columns[f.name]
        arr = col if isinstance(col, pa.Array) else pa.array(np.asarray(col), type=f.type, from_pandas=False)
        arrays.append(arr.cast(f.type) if arr.type != f.type else arr)
    return pa.Table.from_arrays(arrays, schema=s)


def _strings(values: list[str], idx: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(idx.astype(np.int32)))


def make_run(cfg: SynthConfig, root: Path, run_id: str | None = None, name: str = "synthetic") -> Path:
    """Write a synthetic trace run under ``root`` and return its directory."""
    rng = np.random.default_rng(cfg.seed)
    rd = RunDir.create(kind="train", name=name, root=Path(root), run_id=run_id, config={
        "model": f"synthetic/{cfg.n_layers}L", "task": "synthetic-math", "scheme": cfg.scheme,
        "mode": cfg.mode, "synth": asdict(cfg)})
    texts, cat_of_id, _, _ = _vocab()
    s = _make_samples(cfg, rng)
    cats = np.array(cat_of_id, dtype=object)[s.token_id]
    T, M = len(s.position), cfg.rows_per_token
    rank_of = np.searchsorted(np.unique(s.sample_idx), s.sample_idx) % cfg.world_size
    for step in cfg.traced_steps:
        tok, mod = _step_tables(cfg, step, s, cats, rng)
        for rank in range(cfg.world_size):
            sel = rank_of == rank
            n = int(sel.sum())
            if n == 0:
                continue
            tok_cols = {"run_id": _strings([rd.run_id], np.zeros(n)), "sample_idx": s.sample_idx[sel],
                        "position": s.position[sel], "token_id": s.token_id[sel],
                        "token": _strings(texts, s.token_id[sel]), "category": pa.array(list(cats[sel])),
                        "is_response": s.is_response[sel], "mode": _strings([cfg.mode], np.zeros(n)),
                        "magnitude_estimated": np.zeros(n, bool), "rank": np.full(n, rank, np.int16),
                        **{k: v[sel] for k, v in tok.items()}}
            rd.write_table(f"trace/tokens/step_{step:06d}.rank{rank}.parquet", _table(tok_cols, schema.TOKENS))
            rows = np.repeat(sel, M)
            nm = n * M
            mod_cols = {"run_id": _strings([rd.run_id], np.zeros(nm)), "step": np.full(nm, step, np.int32),
                        "sample_idx": np.repeat(s.sample_idx[sel], M), "position": np.repeat(s.position[sel], M),
                        "layer": np.tile(mod["layer"], n).astype(np.int16),
                        "module": _strings(list(cfg.modules), np.tile(mod["module"], n)),
                        "part": _strings(list(PARTS), np.tile(mod["part"], n)),
                        **{k: mod[k].reshape(-1)[rows] for k in ("alignment", "dot", "magnitude")}}
            rd.write_table(f"trace/token_modules/step_{step:06d}.rank{rank}.parquet",
                           _table(mod_cols, schema.TOKEN_MODULES))
        rd.event("progress", step=step, total=cfg.max_step, tokens=T)
    _write_train_steps(cfg, rd, rng)
    _write_eval(rd, rng)
    if cfg.finished:
        rd.finish({"kind": "trace", "traced_steps": list(cfg.traced_steps), "n_samples": cfg.n_samples,
                   "world_size": cfg.world_size})
    return rd.path


def _write_train_steps(cfg: SynthConfig, rd: RunDir, rng: np.random.Generator) -> None:
    step = np.arange(1, cfg.max_step + 1)
    warm = max(1, cfg.max_step // 20)
    cosine = 0.5 * (1 + np.cos(np.pi * (step - warm) / (cfg.max_step - warm + 1)))
    lr = 2e-4 * np.where(step < warm, step / warm, cosine)
    ce = 0.45 + 1.1 * np.exp(-step / (cfg.max_step / 4)) + rng.normal(0, 0.04, len(step))
    n_tok = rng.integers(2000, 3000, len(step))
    cols = {"run_id": _strings([rd.run_id], np.zeros(len(step))), "step": step, "loss": ce, "ce_loss": ce,
            "lr": lr, "grad_norm": 0.3 + 1.5 * np.exp(-step / (cfg.max_step / 6)) * rng.gamma(4, 0.25, len(step)),
            "tokens": n_tok, "tokens_per_s": n_tok / 0.8, "elapsed_s": np.cumsum(np.full(len(step), 0.8))}
    rd.write_table("train_steps/part_000000.rank0.parquet", _table(cols, schema.TRAIN_STEPS))


def _write_eval(rd: RunDir, rng: np.random.Generator, n: int = 20) -> None:
    answers = rng.integers(0, 100, n)
    correct = rng.random(n) < 0.6
    pred = np.where(correct, answers, answers + 1)
    cols = {"run_id": _strings([rd.run_id], np.zeros(n)), "sample_idx": np.arange(n),
            "sample_k": np.full(n, -1, np.int16), "prediction": pa.array([f"#### {p}" for p in pred]),
            "answer": pa.array([str(a) for a in answers]), "extracted": pa.array([str(p) for p in pred]),
            "correct": correct}
    rd.write_table("eval/rank0.parquet", _table(cols, schema.EVAL))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.dev.synth", description="Write a synthetic trace run.")
    ap.add_argument("--out", type=Path, required=True, help="folder to create the run directory in")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="number of traced steps")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    steps = tuple(int(x) for x in np.linspace(10, 450, args.steps).round())
    cfg = SynthConfig(n_layers=args.layers, n_samples=args.samples, traced_steps=steps,
                      world_size=args.world_size, seed=args.seed)
    print(make_run(cfg, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
