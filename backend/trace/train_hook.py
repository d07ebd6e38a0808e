"""Tracing inside the training loop: ``--trace-every N`` calls a TrainTracer at every N-th step.

    tracer = TrainTracer(cfg, rd, info, tokenizer, scheme)
    tracer.rerun(model, micro_batches, step)            # default: a re-run, training is untouched
    ...the step's forward/backward...
    tracer.applied(model, step)                         # compare with .grad, then write (before opt.step)
    with tracer.inline(model, step, batch) as t:        # --trace-inline: the real step (accumulation 1)
        out = forward_loss(...); out.total.backward()
        t.out = out
    tracer.summary()                                    # -> manifest["trace"]

The traced batch is the whole step: every micro-batch (each keeps its own scheme weights and normaliser, as in
training), so G is the gradient of the mean micro-batch loss, averaged over ranks: the update training applies.
``trace_sequences`` limits which sequences get rows (the first ones; ``traced_share`` says how much of ||G||^2
they hold). After the step's backward, ``grad_cosine_applied`` = cos(G, the accumulated ``.grad``) is recorded
with the step's checks (a warning event below ``APPLIED_COSINE_MIN``). Each traced step writes its shards and its
state (adapter + batch, for ``python -m backend verify``) before the optimizer moves on. With
``influence_eval`` N, every traced step also records each row's influence on the mean loss of N held-out examples
(``backend.trace.influence``); the examples are encoded once, as the training data is.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import torch

from backend.jobs.train import TrainConfig
from backend.lm.dist import DistInfo, broadcast_object
from backend.lm.schemes import Scheme
from backend.store.rundir import RunDir
from backend.trace import InlineTrace, TraceConfig, trace_batch
from backend.trace import store as trace_store
from backend.trace.batch import merge_batches
from backend.trace.core import APPLIED_COSINE_MIN, TraceResult, applied_cosine


class TrainTracer:
    def __init__(self, cfg: TrainConfig, rd: RunDir, info: DistInfo, tokenizer: Any, scheme: Scheme,
                 eval_examples: list | None = None):
        self.cfg, self.rd, self.info, self.tok, self.scheme = cfg, rd, info, tokenizer, scheme
        self._eval_examples = eval_examples or []
        self._eval_batch: dict | None = None
        micro = cfg.batch_size if cfg.grad_accum > 1 else None
        self.tcfg = TraceConfig.from_train_config(cfg, micro_batch_size=None if cfg.trace_inline else micro)
        self.steps: list[int] = []
        self.checks: list[dict] = []
        self._pending: tuple[int, TraceResult] | None = None
        self._said_attention = False
        self._planned = False           # plan() runs before the first traced step

    def eval_batch(self, device: torch.device) -> dict | None:
        """The held-out batch influence is measured on (None when influence_eval is 0), built on first use."""
        if not self.cfg.influence_eval:
            return None
        if self._eval_batch is None:
            from backend.lm import data
            if self.cfg.influence_file:
                records = data.load_examples(self.cfg.influence_file)
                where = self.cfg.influence_file
            else:
                records, where = self._eval_examples, f"the {self.cfg.task} task's eval split"
            n = self.cfg.influence_eval
            if len(records) < n:
                raise ValueError(f"influence_eval={n} but {where} holds {len(records)} examples; "
                                 f"allowed: 1..{len(records)}")
            fmt = data.text_format(self.cfg.chat_template, self.cfg.prompt_template)
            enc = data.encode_examples(self.tok, list(records[:n]), self.cfg.max_len, chat=fmt)
            batch = data.collate(enc, self.tok.pad_token_id)
            self._eval_batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        return self._eval_batch

    def _device(self, model: torch.nn.Module) -> torch.device:
        return next(p.device for p in model.parameters())

    def _store(self, model: torch.nn.Module, step: int, res: TraceResult) -> None:
        if res.grad is not None:
            cos = applied_cosine(model, res.grad)
            res.checks["grad_cosine_applied"] = cos
            res.state["meta"]["checks"]["grad_cosine_applied"] = cos
            if cos is not None and cos < APPLIED_COSINE_MIN:
                self.rd.event("warning", step=step, message=f"cos(traced G, applied gradient) = {cos:.6f} < "
                              f"{APPLIED_COSINE_MIN}: the traced update is not the one the optimizer applied"
                              + self._why_not_applied())
            res.grad = None
        used, own = res.checks.get("attn_implementation_used"), res.checks.get("attn_implementation_model")
        if used != own and not self._said_attention:
            msg = (f"token mode traces with {used} attention (forward-mode derivatives need it); the model and its "
                   f"training use {own}")
            self.rd.event("note", step=step, message=msg)
            if self.info.is_main:
                print(f"tokviz: {msg}", file=sys.stderr)
            self._said_attention = True
        trace_store.store_step(self.rd, step, model, res, rank=self.info.rank)
        self.steps.append(step)
        self.checks.append({"step": step, **{k: v for k, v in res.checks.items()
                                             if isinstance(v, (int, float, str, bool)) or v is None}})
        self.rd.event("trace", step=step, rows=res.checks.get("n_rows"), seconds=res.checks.get("seconds"),
                      share_sum=res.checks.get("share_sum"), traced_share=res.checks.get("traced_share"),
                      grad_cosine_applied=res.checks.get("grad_cosine_applied"),
                      **({k: res.checks.get(k) for k in ("eval_cosine", "g_dot_eval", "eval_loss")}
                         if res.influence is not None else {}))

    def _why_not_applied(self) -> str:
        if self.tcfg.trace_loss == "ce" and self.cfg.scheme != "sft":
            return f" (expected: the trace follows plain cross-entropy, training the {self.cfg.scheme} loss)"
        if self.cfg.lora_dropout > 0 and not (self.tcfg.dropout or self.tcfg.inline):
            return " (expected: the re-run has no LoRA dropout, training has; --trace-inline traces the real step)"
        return ""

    def plan(self, model: torch.nn.Module, batch: dict) -> str:
        """Before the first traced step: settle ``trace_magnitude="auto"`` (``trace.config.plan_cost``) for the
        whole run, and say what a traced step is expected to cost (stderr and a ``trace_cost`` event)."""
        from backend.lm.loss import unwrap
        from backend.trace.config import AUTO, StepShape, plan_cost
        from backend.trace.sites import discover_lora_modules
        inner = unwrap(model)
        am, labels = batch["attention_mask"], batch["labels"]                 # (B, T)
        S = min(self.tcfg.max_sequences, am.shape[0])
        if self.tcfg.mode == "token" and self.tcfg.token_positions == "response":
            rec = labels[:S, 1:] != -100
        else:                                                                   # every position with a next token
            rec = (am[:S, :-1] * am[:S, 1:]).bool()
        shape = StepShape(n_sites=len(discover_lora_modules(inner, self.tcfg.target_modules)),
                          batch_sequences=int(am.shape[0]), traced_sequences=self.tcfg.max_sequences,
                          positions=float(rec.sum()) / max(1, S), seq_len=int(am.shape[1]),
                          n_params=sum(p.numel() for p in inner.parameters()))
        # rank 0 decides for every rank: the ranks must trace alike, and their batches differ
        self.tcfg, ratio, msg = broadcast_object(plan_cost(self.tcfg, shape, auto=self.cfg.trace_magnitude == AUTO))
        self.rd.event("trace_cost", message=msg, ratio=round(ratio, 2), trace_config=self.tcfg.to_dict())
        if self.info.is_main:
            print(f"tokviz: {msg}", file=sys.stderr)
        self._planned = True
        return msg

    def rerun(self, model: torch.nn.Module, batches: list[dict], step: int) -> None:
        """Trace the step's micro-batches (before its forward/backward); ``applied`` writes it afterwards."""
        assert self._pending is None, "applied() was not called after the previous traced step"
        batch = merge_batches(batches, self.tok.pad_token_id) if len(batches) > 1 else batches[0]
        if not self._planned:
            self.plan(model, batch)
        res = trace_batch(model, batch, self.scheme, self.cfg.scheme_params, self.tcfg, self.tok, step=step,
                          eval_batch=self.eval_batch(self._device(model)),
                          eval_micro_batch_size=self.cfg.batch_size)
        self._pending = (step, res)

    def applied(self, model: torch.nn.Module, step: int) -> None:
        """After the step's backward, before the optimizer: compare G with ``.grad`` and write the step."""
        assert self._pending is not None and self._pending[0] == step, f"no re-run traced step {step}"
        res = self._pending[1]
        self._pending = None
        self._store(model, step, res)

    @contextmanager
    def inline(self, model: torch.nn.Module, step: int, batch: dict):
        """Trace the real step: the caller runs forward+backward inside and sets ``.out`` on the yielded box."""
        if not self._planned:
            self.plan(model, batch)
        tr = InlineTrace(model, self.tcfg, step=step, eval_batch=self.eval_batch(self._device(model)),
                         eval_micro_batch_size=self.cfg.batch_size)
        box = _Box()
        with tr:
            yield box
        assert box.out is not None, "set .out to the step's LossOutput inside the inline block"
        self._store(model, step, tr.result(batch, box.out, self.scheme, self.cfg.scheme_params, self.tok))

    def summary(self) -> dict:
        """For the manifest: traced steps, the trace config, and the built-in checks of every step."""
        share = [c["share_sum"] for c in self.checks if c.get("share_sum") is not None]
        cos = [c["grad_cosine_applied"] for c in self.checks if c.get("grad_cosine_applied") is not None]
        return {"steps": self.steps, "mode": self.tcfg.mode, "config": self.tcfg.to_dict(),
                "influence_eval": self.cfg.influence_eval, "influence_file": self.cfg.influence_file or None,
                "share_sum_max_abs_err": max((abs(s - 1) for s in share), default=None),
                "grad_cosine_applied_min": min(cos, default=None),
                "checks": self.checks}


class _Box:
    out = None
