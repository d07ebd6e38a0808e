"""Tracing inside the training loop: ``--trace-every N`` calls a TrainTracer at every N-th step.

    tracer = TrainTracer(cfg, rd, info, tokenizer, scheme)
    tracer.rerun(model, micro_batches, step)            # default: a re-run, training is untouched
    with tracer.inline(model, step) as t:              # --trace-inline: the real step (accumulation 1)
        out = forward_loss(...); out.total.backward()
        t.out = out
    tracer.summary()                                   # -> manifest["trace"]

The traced batch is the step's first ``trace_sequences`` sequences; with gradient accumulation they keep their
micro-batches, so G is the gradient of the mean micro-batch loss, as in training. Each traced step writes its
shards and its state (adapter + batch, for ``python -m backend verify``) before the optimizer moves on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from backend.jobs.train import TrainConfig
from backend.lm.dist import DistInfo
from backend.lm.loss import IGNORE
from backend.lm.schemes import Scheme
from backend.store.rundir import RunDir
from backend.trace import InlineTrace, TraceConfig, trace_batch
from backend.trace import store as trace_store


def merge_batches(batches: list[dict], pad_id: int) -> dict:
    """Concatenate right-padded micro-batches along the batch dimension, padding to the longest."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    out: dict[str, list] = {k: [] for k in batches[0]}
    for b in batches:
        for k, v in b.items():
            if k in fill and v.shape[1] < T:
                v = torch.nn.functional.pad(v, (0, T - v.shape[1]), value=fill[k])
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


class TrainTracer:
    def __init__(self, cfg: TrainConfig, rd: RunDir, info: DistInfo, tokenizer: Any, scheme: Scheme):
        self.cfg, self.rd, self.info, self.tok, self.scheme = cfg, rd, info, tokenizer, scheme
        micro = cfg.batch_size if cfg.grad_accum > 1 else None
        self.tcfg = TraceConfig.from_train_config(cfg, micro_batch_size=None if cfg.trace_inline else micro)
        self.steps: list[int] = []
        self.checks: list[dict] = []

    def _store(self, model: torch.nn.Module, step: int, res) -> None:
        trace_store.store_step(self.rd, step, model, res, rank=self.info.rank)
        self.steps.append(step)
        self.checks.append({"step": step, **{k: v for k, v in res.checks.items()
                                             if isinstance(v, (int, float, str, bool)) or v is None}})
        self.rd.event("trace", step=step, rows=res.checks.get("n_rows"), seconds=res.checks.get("seconds"),
                      share_sum=res.checks.get("share_sum"))

    def rerun(self, model: torch.nn.Module, batches: list[dict], step: int) -> None:
        batch = merge_batches(batches, self.tok.pad_token_id) if len(batches) > 1 else batches[0]
        res = trace_batch(model, batch, self.scheme, self.cfg.scheme_params, self.tcfg, self.tok, step=step)
        self._store(model, step, res)

    @contextmanager
    def inline(self, model: torch.nn.Module, step: int, batch: dict):
        """Trace the real step: the caller runs forward+backward inside and sets ``.out`` on the yielded box."""
        tr = InlineTrace(model, self.tcfg, step=step)
        box = _Box()
        with tr:
            yield box
        assert box.out is not None, "set .out to the step's LossOutput inside the inline block"
        self._store(model, step, tr.result(batch, box.out, self.scheme, self.cfg.scheme_params, self.tok))

    def summary(self) -> dict:
        """For the manifest: traced steps, the trace config, and the built-in checks of every step."""
        share = [c["share_sum"] for c in self.checks if c.get("share_sum") is not None]
        return {"steps": self.steps, "mode": self.tcfg.mode, "config": self.tcfg.to_dict(),
                "share_sum_max_abs_err": max((abs(s - 1) for s in share), default=None),
                "checks": self.checks}


class _Box:
    out = None
