"""trace_batch: trace one batch (a re-run that never changes training), and InlineTrace for the real step.

    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode="position"), tokenizer, step=20)
    res.tokens["dot"], res.modules["alignment"], res.checks["share_sum"]

    tr = InlineTrace(model, TraceConfig(mode="position", inline=True), step=20)
    with tr:                                              # hooks attached, RNG state recorded
        out = forward_loss(model, batch, scheme, params)
        out.total.backward()                              # the real step's backward (accumulation 1)
    res = tr.result(batch, out, scheme, params, tokenizer)

A re-run leaves training untouched: it runs inside ``torch.random.fork_rng`` (dropout, sketch directions), uses
``torch.autograd.grad`` (no ``.grad`` is written), and restores every module's train/eval flag and the attention
implementation. ``batch`` is the whole step: the loss of its ``n`` sequences in K micro-batches on W ranks is L =
(1/W) sum_r (1/K) sum_k L_{r,k}, each L_{r,k} the scheme loss of one micro-batch (its weights and normaliser N from
that micro-batch, as training computes them): as DDP with gradient accumulation averages, so G is the gradient
training applies. ``max_sequences`` only limits which sequences get rows (the first ones);
``checks["traced_share"]`` is their share of ||G||^2 (what their ``share`` column sums to, in position mode), and
``res.grad`` holds G by parameter name, to compare with the ``.grad`` the optimizer then applies. Token mode runs
the model with ``tokviz_jvp`` attention (``backend.trace.attention_jvp``: SDPA forward, a blockwise hand-written
forward-mode rule, memory linear in T; fused SDPA kernels have none), or eager where that does not apply;
``checks["attn_implementation_used"]`` says which kernel a trace ran with, ``checks["attn_implementation_model"]``
the model's own.
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from backend.lm.loss import LossOutput, forward_loss, summed, unwrap
from backend.lm.schemes import Scheme, get_scheme
from backend.trace.attention_jvp import token_attention
from backend.trace.batch import TracedBatch, build_columns
from backend.trace.config import TraceConfig
from backend.trace.hooks import PositionHooks, attached
from backend.trace.influence import EvalGradient, eval_gradient, step_values
from backend.trace.influence import columns as influence_columns
from backend.trace.position import check_indices, run_position
from backend.trace.sites import LoraSite, discover_lora_modules
from backend.trace.sketch import Sketcher, rows_of
from backend.trace.token import run_token


@dataclass
class TraceResult:
    """One traced step: TOKENS / TOKEN_MODULES columns (all but run_id, step, rank), checks, and the state
    ``trace_store.save_step_state`` keeps so ``verify`` can recompute it."""
    mode: str
    tokens: dict[str, np.ndarray]
    modules: dict[str, np.ndarray]
    checks: dict[str, Any]
    state: dict[str, Any] = field(repr=False)
    grad: dict[str, torch.Tensor] | None = field(default=None, repr=False)   # G by parameter name (global)
    # with an eval batch (backend.trace.influence): {"tokens": INFLUENCE columns, "modules": INFLUENCE_MODULES
    # columns, "step": the step's values (g_dot_eval, eval_grad_norm, eval_cosine, eval_loss, ...)}
    influence: dict[str, Any] | None = field(default=None, repr=False)
    sketch: np.ndarray | None = field(default=None, repr=False)   # (rows, k) float32 per tokens row (sketch_dim)


def world() -> tuple[int, int]:
    """(world_size, rank) of torch.distributed, (1, 0) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["rng_cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in rng:
        torch.cuda.set_rng_state(rng["rng_cuda"], device)


def attn_implementation(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


def set_training(flags: list[tuple[torch.nn.Module, bool]]) -> None:
    """Set each module's ``training`` flag directly: ``Module.train`` recurses and goes through
    ``Module.__setattr__``, which costs milliseconds per call on a model of a few hundred modules."""
    for m, t in flags:
        m.__dict__["training"] = t


@contextmanager
def traced_network(model: torch.nn.Module, train: bool, attn: str | None, seed: int | None,
                   device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The network of a re-run: forked RNG (seeded with ``seed`` unless None), train/eval mode, attention
    kernel; all restored on exit. Yields the RNG state every pass starts from."""
    mods = _modules(model)
    flags = [(m, m.training) for m in mods]
    before = attn_implementation(model)
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        rng = capture_rng(device)
        try:
            set_training([(m, train) for m in mods])
            if attn is not None and attn != before:
                model.set_attn_implementation(attn)
            yield rng
        finally:
            if attn is not None and attn != before and before is not None:
                model.set_attn_implementation(before)
            set_training(flags)


_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, list]]" = weakref.WeakKeyDictionary()


def _modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """All submodules, cached per model and its set of peft adapters (adding one adds modules)."""
    key = tuple(getattr(model, "peft_config", {}) or {})
    hit = _MODULES.get(model)
    if hit is None or hit[0] != key:
        hit = (key, list(model.modules()))
        _MODULES[model] = hit
    return hit[1]


def resolve_scheme(scheme: Scheme | str, params: dict | None, trace_loss: str) -> tuple[Scheme, dict]:
    """The traced loss: the scheme (with resolved parameters) or plain cross-entropy (sft)."""
    if trace_loss == "ce":
        return get_scheme("sft"), {}
    s = get_scheme(scheme) if isinstance(scheme, str) else scheme
    return s, s.resolve_params(params)


def trace_batch(model: torch.nn.Module, batch: dict, scheme: Scheme | str, scheme_params: dict | None,
                cfg: TraceConfig, tokenizer: Any = None, *, step: int = 0, chunk_sizes: list[int] | None = None,
                sum_normaliser: float | None = None, eval_batch: dict | None = None,
                eval_micro_batch_size: int | None = None) -> TraceResult:
    """Trace the step ``batch`` (every sequence: G, weights, N), writing rows for its first
    ``cfg.max_sequences`` sequences (a re-run: no optimizer step, no ``.grad`` written, RNG and module modes
    restored). ``model``: a peft LoRA model, possibly DDP-wrapped (the re-run uses the inner module; G is
    all-reduced by the tracer). Under torch.distributed every rank must call this at the same steps. ``step`` seeds
    the dropout and sketch directions. ``chunk_sizes``: the step's micro-batches when their sizes differ (else
    ``cfg.micro_batch_size``). ``sum_normaliser``: the micro-batches' losses are summed, each divided by it
    instead of its own N (HF's Trainer with ``num_items_in_batch``; see ``backend.lm.loss.summed``).
    ``eval_batch``: held-out examples (input_ids, attention_mask, labels): the result's ``influence`` holds every
    row's influence on their mean loss (``backend.trace.influence``), G_eval from micro-batches of
    ``eval_micro_batch_size`` rows."""
    if cfg.inline:
        raise ValueError("cfg.inline=True traces the real step: use InlineTrace around its forward/backward")
    t0 = time.perf_counter()
    inner = unwrap(model)
    sites = discover_lora_modules(inner, cfg.target_modules)
    device = sites[0].param.device
    W, rank = world() if cfg.distributed else (1, 0)
    sch, sparams = resolve_scheme(scheme, scheme_params, cfg.trace_loss)
    tb = TracedBatch.from_batch(batch, cfg.max_sequences, cfg.micro_batch_size, device, chunk_sizes)
    carry = tb.carry_mask(cfg.mode, cfg.token_positions)         # position mode: carry_mask("position")
    record = tb.record_mask(cfg.mode, cfg.token_positions, carry=carry)
    before_attn = attn_implementation(inner)
    # token mode: blockwise attention with a forward-mode rule (memory linear in T), eager where it does not apply
    attn = token_attention(inner) if cfg.mode == "token" else None
    sketch_seed = cfg.seed + step
    dropout_seed = (cfg.seed + step) * 1009 + rank

    K = len(tb.chunk_sizes)
    amp = (torch.autocast(device.type, dtype=getattr(torch, cfg.autocast)) if cfg.autocast is not None
           else nullcontext())

    def loss_fn(chunk: dict) -> LossOutput:
        with amp:
            out = forward_loss(inner, chunk, sch, sparams)
        return summed(out, sum_normaliser, K) if sum_normaliser is not None else out

    # without dropout no pass draws a random number (the sketch has its own generator): no seeding needed
    with traced_network(inner, train=cfg.dropout, attn=attn, seed=dropout_seed if cfg.dropout else None,
                        device=device) as rng:
        used_attn = attn_implementation(inner) if attn is not None else before_attn   # traced_network set it
        ev = None
        if eval_batch is not None:
            ev = _eval_gradient(inner, sites, eval_batch, eval_micro_batch_size, amp, cfg.dropout)
        extra = ev.G if ev is not None else None
        if cfg.mode == "position":
            out = run_position(inner, tb, sites, loss_fn, cfg, W, lambda: restore_rng(rng, device), extra)
            site_dot = out["site_dot"][:, :, :-1]                                     # (M, n, T-1)
            site_mag = out["site_sq"][:, :, :-1].sqrt()
            dot, magnitude, estimated = site_dot.sum(0), out["site_sq"][:, :, :-1].sum(0).sqrt(), False
        else:
            out = run_token(inner, tb, sites, loss_fn, cfg, W, record, sketch_seed, extra)
            dot, magnitude, site_dot, site_mag = out["dot"], out["magnitude"], out["site_dot"], out["site_mag"]
            estimated = {"exact": False, "sketch": True, "none": None}[cfg.magnitude]
    g_sq = out["g_sq"]
    g_norm = float(g_sq.sum().sqrt())
    checks = dict(out["checks"])
    if cfg.mode == "position":
        checks.update(position_shares(dot, record, carry, g_sq, out["proc_dot"], W))
    elif out["traced_loss_dot"] is not None:
        checks["traced_share"] = _rank_sum(out["traced_loss_dot"], W) / W / float(g_sq.double().sum())
    else:
        checks["traced_share"] = None
    stats = out["stats"]
    tokens, modules = build_columns(cfg.mode, tb, record, stats, dot, magnitude, estimated, g_norm,
                                    site_dot if cfg.module_rows else None,
                                    site_mag if cfg.module_rows else None,
                                    g_sq.sqrt(), sites, tokenizer)
    checks.update(attn_implementation_used=used_attn, attn_implementation_model=before_attn,
                  grad_norm=g_norm, loss=float(stats["total"]), n_sequences=tb.n, traced_sequences=tb.n_traced,
                  n_rows=len(tokens["dot"]), n_module_rows=len(modules["dot"]), world_size=W, rank=rank,
                  seconds=time.perf_counter() - t0)
    infl = None
    if ev is not None:
        if cfg.mode == "position":
            influence = out["site_infl"][:, :, :-1]
            tok_infl = influence.sum(0)
            carry_sum = _rank_sum(tok_infl.double()[carry].sum(), W)
            ref = float(out["proc_infl"])
        else:
            influence, tok_infl = out["site_infl"], out["influence"]
            carry_sum = ref = None
            if out["traced_loss_dot"] is not None and tb.n_traced == tb.n:    # every loss term traced
                w = (stats["weight"].double() * tb.response().double()) / out["normaliser"][:, None]
                carry_sum, ref = _rank_sum((w * tok_infl.double()).sum() / len(tb.chunk_sizes), W), None
        infl = _influence(tb, record, tok_infl, magnitude, influence if cfg.module_rows else None,
                          site_mag if cfg.module_rows else None, ev, out["G"], sites, carry_sum, ref)
        checks.update(infl["step"])
    state = _state(tb, stats["weight"], rng, cfg, sch, sparams, sites, step, W, rank,
                   network="train" if cfg.dropout else "eval", attn=used_attn, sketch_seed=sketch_seed,
                   inline=False, checks=checks)
    state["meta"]["sum_normaliser"] = sum_normaliser
    if eval_batch is not None:
        state["tensors"].update({f"eval_{k}": eval_batch[k].cpu() for k in ("input_ids", "attention_mask", "labels")})
        state["meta"]["eval_micro_batch_size"] = eval_micro_batch_size
    sk = rows_of(out["sketch"], tb.n_traced, tb.input_ids.shape[1], record) if out.get("sketch") is not None else None
    return TraceResult(mode=cfg.mode, tokens=tokens, modules=modules, checks=checks, state=state,
                       grad={s.param_name: g for s, g in zip(sites, out["G"])}, influence=infl, sketch=sk)


def _eval_gradient(inner: torch.nn.Module, sites: list[LoraSite], eval_batch: dict, micro: int | None, amp,
                   dropout: bool) -> EvalGradient:
    """G_eval with the network in eval mode (a re-run with dropout switches it off for this pass only)."""
    flags = [(m, m.training) for m in _modules(inner)] if dropout else []
    try:
        set_training([(m, False) for m, _ in flags])
        with amp:
            return eval_gradient(inner, sites, eval_batch, micro)
    finally:
        set_training(flags)


def _influence(tb: TracedBatch, record: torch.Tensor, tok_infl: torch.Tensor, magnitude: torch.Tensor | None,
               site_infl: torch.Tensor | None, site_mag: torch.Tensor | None, ev: EvalGradient,
               G: list[torch.Tensor], sites: list[LoraSite], carry_sum: float | None, ref: float | None) -> dict:
    """The influence tables' columns and the step's values. ``carry_sum``: the influences that decompose
    <G, G_eval> (every processed position; token mode: w_t / N weighted, every loss term), ``ref`` what they
    sum to (None: <G, G_eval>): ``influence_sum_rel_err`` = their difference over ||G|| ||G_eval||."""
    tokens, modules = influence_columns(tb, record, tok_infl, magnitude, site_infl, site_mag, ev.G, sites)
    vals = step_values(G, ev)
    err = None
    if carry_sum is not None:
        gn = float(torch.stack([g.double().square().sum() for g in G]).sum().sqrt())
        target = vals["g_dot_eval"] if ref is None else ref
        err = abs(carry_sum - target) / max(gn * vals["eval_grad_norm"], 1e-300)
    return {"tokens": tokens, "modules": modules,
            "step": {**vals, "influence_sum_rel_err": err, "influence_rows": len(tokens["influence"])}}


APPLIED_COSINE_MIN = 0.9999      # below: the traced G is not the update the optimizer applied (a warning)


def applied_cosine(model: torch.nn.Module, grad: dict[str, torch.Tensor]) -> float | None:
    """cos(G, the ``.grad`` now accumulated on the same parameters), float64; None when no ``.grad`` is there.
    Gradient clipping scales ``.grad`` and leaves the cosine alone."""
    params = dict(unwrap(model).named_parameters())
    missing = [k for k in grad if k not in params]
    assert not missing, f"traced parameters not in the model: {missing[:3]}"
    if any(params[k].grad is None for k in grad):
        return None
    dot = sum(float((g.double() * params[k].grad.double()).sum()) for k, g in grad.items())
    a = sum(float(g.double().square().sum()) for g in grad.values()) ** 0.5
    b = sum(float(params[k].grad.double().square().sum()) for k in grad) ** 0.5
    return dot / (a * b) if a > 0 and b > 0 else None


def _rank_sum(x: torch.Tensor | float, W: int) -> float:
    """Sum over ranks of a scalar (itself on one process)."""
    t = torch.as_tensor(x, dtype=torch.float64).reshape(1)
    if W > 1:
        dist.all_reduce(t)
    return float(t)


def position_shares(dot: torch.Tensor, record: torch.Tensor, carry: torch.Tensor, g_sq: torch.Tensor,
                    proc_dot: torch.Tensor | float, W: int) -> dict[str, float]:
    """Position mode's built-in checks. ``share_sum``: the dots of every processed position that carries
    gradient, summed over ranks, over <G_proc, G> (1 when the pieces decompose the gradient: see
    ``position.run_position``); ``traced_share``: the written rows' share of ||G||^2 (their ``share`` column
    sums to it; 1 when every sequence is traced); ``unrecorded_abs_share``: |dots| of positions that carry no
    gradient, which must be 0."""
    G2 = float(g_sq.double().sum())
    d = dot.double()
    return {"share_sum": _rank_sum(d[carry].sum(), W) / float(proc_dot),
            "traced_share": _rank_sum(d[record].sum(), W) / G2,
            "unrecorded_abs_share": float(d.abs()[~carry].sum()) / G2}


def _model_dtype(sites: list[LoraSite]) -> str:
    """The dtype of the adapted base weights (a bf16 model's LoRA factors may well be float32)."""
    base = getattr(sites[0].parent, "base_layer", None)
    w = getattr(base, "weight", None)
    return str((w if w is not None else sites[0].param).dtype).replace("torch.", "")


def _state(tb: TracedBatch, weights: torch.Tensor, rng: dict, cfg: TraceConfig, scheme: Scheme, params: dict,
           sites: list[LoraSite], step: int, W: int, rank: int, network: str, attn: str | None,
           sketch_seed: int, inline: bool, checks: dict) -> dict:
    tensors = {"input_ids": tb.input_ids.cpu(), "attention_mask": tb.attention_mask.cpu(),
               "labels": tb.labels.cpu(), "sample_idx": tb.sample_idx.cpu(),
               "weights": weights.detach().float().cpu(), "label_mask": tb.response().cpu(),
               **{k: v.cpu() for k, v in rng.items()}}
    meta = {"step": step, "rank": rank, "world_size": W, "mode": cfg.mode, "trace_config": cfg.to_dict(),
            "scheme": scheme.name, "scheme_normaliser": scheme.normaliser, "scheme_params": params,
            "network": network, "attn_implementation": attn,
            "chunk_sizes": tb.chunk_sizes, "traced_sequences": tb.n_traced, "sketch_seed": sketch_seed,
            "inline": inline,
            "sites": [s.name for s in sites], "dtype": str(sites[0].param.dtype).replace("torch.", ""),
            "model_dtype": _model_dtype(sites),
            "device_type": sites[0].param.device.type, "checks": checks}
    return {"tensors": tensors, "meta": meta}


class InlineTrace:
    """Position-mode trace of the real training step (accumulation 1): hooks around its forward+backward.

    The loss must be backpropagated unscaled (no loss scaler, no division by an accumulation count other than
    1); ``.grad`` must be zero or None on entry. The hooks compute everything during the backward; ``result``
    checks the norm of the accumulated ``.grad`` against the G the hooks used (``step_grad_norm_rel_err``).
    Under DDP, wrap the DDP model's forward/backward: G is the all-reduced mean gradient, as DDP's.
    """

    def __init__(self, model: torch.nn.Module, cfg: TraceConfig, *, step: int = 0, eval_batch: dict | None = None,
                 eval_micro_batch_size: int | None = None):
        if cfg.mode != "position":
            raise ValueError("InlineTrace needs mode='position'")
        if cfg.trace_loss != "scheme":
            raise ValueError("InlineTrace traces the real step's loss: trace_loss must be 'scheme'")
        self.model, self.cfg, self.step = model, cfg, step
        self.inner = unwrap(model)
        self.sites = discover_lora_modules(self.inner, cfg.target_modules)
        self.device = self.sites[0].param.device
        self.W, self.rank = world() if cfg.distributed else (1, 0)
        self._ctx = None
        self.t0 = 0.0
        self.eval_batch, self.eval_micro = eval_batch, eval_micro_batch_size
        self.ev: EvalGradient | None = None

    def __enter__(self) -> "InlineTrace":
        stale = [s.name for s in self.sites if s.param.grad is not None and bool(s.param.grad.any())]
        if stale:
            raise ValueError(f"InlineTrace needs zeroed gradients (accumulation 1); {stale[0]} has a gradient")
        self.t0 = time.perf_counter()
        self.rng = capture_rng(self.device)
        self.attn = attn_implementation(self.inner)
        self.network = "train" if self.inner.training else "eval"
        check = set(check_indices(self.sites, self.cfg.full_check))
        if self.eval_batch is not None:              # G_eval at the step's weights, before its forward
            devices = list(range(torch.cuda.device_count())) if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                self.ev = _eval_gradient(self.inner, self.sites, self.eval_batch, self.eval_micro, nullcontext(),
                                         dropout=True)
        self.hooks = PositionHooks(self.sites, G=None, piece_scale=1.0 / self.W, world_size=self.W, check=check,
                                   extra=self.ev.G if self.ev is not None else None,
                                   sketch=Sketcher(self.sites, self.cfg.sketch_dim, self.cfg.seed, 1.0 / self.W,
                                                  kind=self.cfg.sketch_kind)
                                   if self.cfg.sketch_dim else None)
        self._ctx = attached(self.hooks.forward_hooks(), self.hooks.grad_hooks())
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    def result(self, batch: dict, out: LossOutput, scheme: Scheme | str, scheme_params: dict | None,
               tokenizer: Any = None) -> TraceResult:
        """The trace of the step, after its backward. ``batch``/``out``: what the forward saw and returned."""
        from backend.trace.batch import token_stats
        cfg, sites = self.cfg, self.sites
        sch, sparams = resolve_scheme(scheme, scheme_params, "scheme")
        self.hooks.check_one_call()
        tb = TracedBatch.from_batch(batch, cfg.max_sequences, None, self.device)
        carry = tb.carry_mask("position")
        record = tb.record_mask("position", carry=carry)
        n, T = tb.input_ids.shape
        site_dot, site_sq, g_sq = self.hooks.finish()
        site_dot = site_dot.view(len(sites), n, T)[:, :, :-1]
        site_sq = site_sq.view(len(sites), n, T)[:, :, :-1]
        errs = list(self.hooks.pieces_err.values())
        G = self.hooks.gradient()
        # the step's accumulated .grad (DDP-averaged) against the G the hooks used: catches a scaled loss
        grad_sq = sum(float(s.param.grad.double().square().sum()) for s in sites if s.param.grad is not None)
        g_sq_total = float(g_sq.double().sum())
        grad_err = abs(grad_sq ** 0.5 - g_sq_total ** 0.5) / max(g_sq_total ** 0.5, 1e-300)
        loss, prob, ent = token_stats(out.logits.detach(), tb.input_ids, cfg.stats_chunk)
        stats = {"loss": loss, "prob": prob, "entropy": ent, "weight": out.weights.detach().float(),
                 "total": out.total.detach().float()}
        dot, g_norm = site_dot.sum(0), float(g_sq.sum().sqrt())
        checks = {"micro_batches": 1, "micro_batches_traced": 1, "pieces_checked_modules": len(errs),
                  "pieces_sum_max_rel_err": max(errs), "step_grad_norm_rel_err": grad_err,
                  **position_shares(dot, record, carry, g_sq, g_sq_total, self.W),
                  "attn_implementation_used": self.attn, "attn_implementation_model": self.attn,
                  "grad_norm": g_norm, "loss": float(stats["total"]), "n_sequences": n,
                  "traced_sequences": tb.n_traced, "world_size": self.W, "rank": self.rank}
        tokens, modules = build_columns("position", tb, record, stats, dot, site_sq.sum(0).sqrt(), False, g_norm,
                                        site_dot if cfg.module_rows else None,
                                        site_sq.sqrt() if cfg.module_rows else None,
                                        g_sq.sqrt(), sites, tokenizer)
        infl = None
        if self.ev is not None:
            tok_infl = self.hooks.extra_dot.view(len(sites), n, T)[:, :, :-1]
            carry_sum = _rank_sum(tok_infl.sum(0).double()[carry].sum(), self.W)
            infl = _influence(tb, record, tok_infl.sum(0), site_sq.sum(0).sqrt(),
                              tok_infl if cfg.module_rows else None, site_sq.sqrt() if cfg.module_rows else None,
                              self.ev, G, sites, carry_sum, None)
            checks.update(infl["step"])
        checks.update(n_rows=len(tokens["dot"]), n_module_rows=len(modules["dot"]),
                      seconds=time.perf_counter() - self.t0)
        state = _state(tb, stats["weight"], self.rng, cfg, sch, sparams, sites, self.step, self.W, self.rank,
                       network=self.network, attn=self.attn, sketch_seed=cfg.seed + self.step, inline=True,
                       checks=checks)
        if self.eval_batch is not None:
            state["tensors"].update({f"eval_{k}": self.eval_batch[k].cpu()
                                     for k in ("input_ids", "attention_mask", "labels")})
        sk = rows_of(self.hooks.sketch.result(), n, T, record) if self.hooks.sketch is not None else None
        return TraceResult(mode="position", tokens=tokens, modules=modules, checks=checks, state=state,
                           grad={s.param_name: g for s, g in zip(sites, G)}, influence=infl, sketch=sk)
