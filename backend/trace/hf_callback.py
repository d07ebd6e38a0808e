"""Trace a Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) run: a ``TrainerCallback`` you drop into your script.

    from backend.trace import TraceConfig
    from backend.trace.hf_callback import TokvizTraceCallback
    cb = TokvizTraceCallback(every=20, config=TraceConfig(mode="position", max_sequences=4))
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collate, callbacks=[cb])
    trainer.train()
    # -> <data root>/runs/<run_id>/trace/{tokens,token_modules,state}/step_000020...; python -m backend verify ...

**What is traced: the step the Trainer applied.** At every ``every``-th optimizer step (1-based) the callback
records every micro-batch of the step as the Trainer hands it to ``compute_loss`` (labels included, before a
``compute_loss_func`` pops them), and traces at ``on_pre_optimizer_step``: the weights have not moved yet and
``.grad`` holds the accumulated (and clipped) gradient. G is the gradient of the step's loss normalised as the
Trainer normalises it: with ``num_items_in_batch`` (the default causal-LM loss) the micro-batches' summed token
losses over the step's label count, otherwise each micro-batch's mean over the number of micro-batches.
``grad_cosine_applied`` = cos(G, ``.grad``) is written with the step's checks; below 0.9999 a ``warning`` event
(and a log line) says the traced loss is not the one trained. The re-run never changes training (forked RNG, no
``.grad`` written, module modes restored).

**Which loss.** ``scheme`` names the per-token weights the traced loss uses: a tokviz scheme name (``sft``, plain
cross-entropy, matches the Trainer's default loss) or a callable ``weights(loss, mask) -> (B, T-1)`` that
reproduces a custom token-weighted ``compute_loss`` (``normaliser="micro_batch"`` when that loss is each
micro-batch's own weighted mean). What the callback cannot reproduce (a ``compute_loss_func``, label smoothing, a
``compute_loss`` override it does not know) it says at ``on_train_begin`` as a ``warning`` event; the cosine then
tells how far off the trace is.

**Mixed precision.** Under ``bf16=True``/``fp16=True`` the traced passes run under ``torch.autocast`` of that dtype
(recorded with the step; ``verify`` replays it with the half-precision tolerance). Position mode only.

**Influence on held-out loss.** ``eval_batch`` (input_ids, attention_mask, labels of a few held-out examples, -100
where no loss is taken) adds, at every traced step, each row's influence on their mean loss
(``backend.trace.influence``; the influence tables next to the trace).

**Sample ids.** A batch key ``id_key`` (default ``sample_idx``, e.g. added by your collator from a dataset column)
is taken out of the inputs before the model sees them and stored as each row's ``sample_idx``; without one, the
traced sequences get run-unique negative numbers (-1, -2, ...), never a number reused across steps.

**Never breaks training.** A step that cannot be traced is skipped with a ``trace_skipped`` event naming why; the
run is closed however training ends: the manifest on ``on_train_end``, an ``error`` event (status failed, every
completed step still readable) when the Trainer's loop leaves by an exception or an interrupt, noticed by a
watcher thread within a second.

The run directory's ``config.json`` records what ``verify`` needs to rebuild the model (base model path, LoRA
rank/alpha/dropout/targets, dtype, attention implementation). Under torchrun every rank traces its own
micro-batches and writes its own shards; G is the all-reduced mean, as DDP's.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback

from backend.lm.loss import unwrap
from backend.lm.schemes import Scheme, custom_scheme, get_scheme
from backend.store.rundir import RunDir
from backend.trace import TraceConfig, trace_batch
from backend.trace import store as trace_store
from backend.trace.batch import merge_batches
from backend.trace.core import APPLIED_COSINE_MIN, TraceResult, applied_cosine, world

log = logging.getLogger("tokviz")
NEEDED = ("input_ids", "attention_mask", "labels")
NORMALISERS = ("trainer", "micro_batch")


class TokvizTraceCallback(TrainerCallback):
    """Writes traced steps of a Trainer run into a tokviz run directory (see the module docstring)."""

    def __init__(self, every: int, config: TraceConfig | None = None, scheme: str | Callable = "sft",
                 scheme_params: dict | None = None, normaliser: str = "trainer", tokenizer: Any = None,
                 batch: dict | None = None, runs_root: str | Path | None = None, name: str = "hf-trainer",
                 run_id: str | None = None, base_model: str | None = None, id_key: str = "sample_idx",
                 eval_batch: dict | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1 (trace every N optimizer steps)")
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser={normaliser!r}: choose trainer (as the Trainer normalises its default "
                             "loss) or micro_batch (each micro-batch's own weighted mean)")
        self.every = every
        self.cfg = config or TraceConfig()
        if self.cfg.inline:
            raise ValueError("the callback traces re-runs: use TraceConfig(inline=False)")
        self.scheme: Scheme = custom_scheme(scheme) if callable(scheme) else get_scheme(scheme)
        self.scheme_params = self.scheme.resolve_params(scheme_params)
        self.normaliser = normaliser
        self.tokenizer, self.batch = tokenizer, batch
        self.runs_root, self.name, self.run_id, self.base_model = runs_root, name, run_id, base_model
        self.id_key = id_key
        if eval_batch is not None:
            from backend.trace.influence import check_eval_batch
            check_eval_batch(eval_batch)                                 # ValueError naming what is wrong
        self.eval_batch = eval_batch
        self.rd: RunDir | None = None
        self.traced: dict[int, dict] = {}
        self.trainer: Trainer | None = None
        self._micro: list[dict] | None = None       # the traced step's micro-batches, while it runs
        self._next_anon = -1
        self._enabled = True
        self._watch: _TrainWatch | None = None

    # ---- Trainer events ----------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tokenizer = self.tokenizer or kwargs.get("processing_class")
        self.trainer, train_frame = _find_trainer()
        _, rank = world()
        run_id = self.run_id
        if run_id is None:
            from backend.lm import dist as bdist
            from backend.store.rundir import new_run_id
            run_id = bdist.broadcast_object(new_run_id("train", self.name))      # one directory for all ranks
        amp = "bfloat16" if getattr(args, "bf16", False) else "float16" if getattr(args, "fp16", False) else None
        notes: list[str] = []
        try:
            self.cfg = dataclasses.replace(self.cfg, autocast=amp)
        except ValueError as e:
            notes.append(f"tracing is off for this run: the Trainer trains under {amp} autocast and {e}")
            self._enabled = False
        notes += self._loss_notes(args)
        root = Path(self.runs_root) if self.runs_root is not None else None
        self.rd = RunDir.create(kind="train", name=self.name, config=self._run_config(model, notes), root=root,
                                run_id=run_id, is_writer=rank == 0)
        for n in notes:
            self._warn(n)
        if self.trainer is not None:
            self._wrap_compute_loss(self.trainer)
            self._watch = _TrainWatch(train_frame, self._ended_abnormally)
        elif self.batch is None:
            self._warn("tracing is off for this run: the callback found no Trainer calling it (it records the "
                       "step's micro-batches from Trainer.compute_loss)")
            self._enabled = False

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        self._micro = [] if (self._enabled and step % self.every == 0) else None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._micro is None:
            return
        step = state.global_step + 1
        micro, self._micro = self._micro, None
        try:
            self._trace_step(model, micro, step, args)
        except Exception as e:      # noqa: BLE001 - the user's training goes on; the reason is recorded
            self.rd.event("trace_skipped", step=step, reason=f"{type(e).__name__}: {e}")
            log.warning("tokviz: step %d not traced: %s: %s", step, type(e).__name__, e)

    def on_step_end(self, args, state, control, **kwargs):
        self._micro = None

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        if self.rd is not None:
            cos = [c["grad_cosine_applied"] for c in self.traced.values() if c.get("grad_cosine_applied") is not None]
            self.rd.finish({"kind": "train", "source": "hf_callback", "traced_steps": sorted(self.traced),
                            "grad_cosine_applied_min": min(cos, default=None),
                            "trace": {str(k): v for k, v in sorted(self.traced.items())}})

    # ---- capture, trace, close --------------------------------------------------------------------------

    def _wrap_compute_loss(self, trainer: Trainer) -> None:
        """Record each micro-batch the Trainer computes a loss on (an instance attribute over the class's
        method: the loss itself is the Trainer's, untouched; ``id_key`` leaves the inputs here)."""
        inner = trainer.compute_loss

        def compute_loss(model, inputs, *a, **kw):
            ids = inputs.pop(self.id_key, None) if isinstance(inputs, dict) else None
            if self._micro is not None and isinstance(inputs, dict):
                self._micro.append({"inputs": {k: inputs[k].detach() for k in NEEDED if inputs.get(k) is not None},
                                    "ids": ids, "num_items": kw.get("num_items_in_batch")})
            return inner(model, inputs, *a, **kw)
        trainer.compute_loss = compute_loss

    def _trace_step(self, model: torch.nn.Module, micro: list[dict], step: int, args) -> None:
        sum_normaliser, chunk_sizes, fixed = None, None, self.batch is not None
        if fixed:
            batch = {k: v for k, v in self.batch.items()}
        else:
            if not micro:
                raise ValueError("no micro-batch reached Trainer.compute_loss during this step")
            lacking = sorted({k for m in micro for k in NEEDED if k not in m["inputs"]})
            if lacking:
                raise ValueError(f"the training batch lacks {lacking}; the collator must give input_ids, "
                                 "attention_mask and labels (-100 where no loss is taken)")
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
            batch = merge_batches([m["inputs"] for m in micro], pad)
            chunk_sizes = [m["inputs"]["input_ids"].shape[0] for m in micro]
            if all(m["ids"] is not None for m in micro):
                batch["sample_idx"] = torch.cat([torch.as_tensor(m["ids"]).reshape(-1).cpu() for m in micro])
            else:
                n = sum(chunk_sizes)
                batch["sample_idx"] = torch.arange(self._next_anon, self._next_anon - n, -1)
                self._next_anon -= n
            sum_normaliser = self._sum_normaliser(micro, args)
        dev = next(p.device for p in model.parameters())
        ev = {k: v.to(dev) for k, v in self.eval_batch.items()} if self.eval_batch is not None else None
        res = trace_batch(model, batch, self.scheme, self.scheme_params, self.cfg, self.tokenizer, step=step,
                          chunk_sizes=chunk_sizes, sum_normaliser=sum_normaliser, eval_batch=ev)
        self._store(model, step, res, fixed)

    def _sum_normaliser(self, micro: list[dict], args) -> float | None:
        """The Trainer's normalisation (its ``training_step``/``compute_loss``): with ``num_items_in_batch``
        and a loss that takes it, each micro-batch's summed loss over that count (times the number of processes
        when averaging tokens across devices); else None (each micro-batch's mean, over the micro-batches)."""
        if self.normaliser != "trainer":
            return None
        t = self.trainer
        n = micro[0]["num_items"]
        scaled = getattr(t, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(t, "model_accepts_loss_kwargs", False)) and n is not None) or \
                getattr(t, "compute_loss_func", None) is not None
        if not scaled or n is None:
            return None
        W, _ = world()
        factor = W if (getattr(args, "average_tokens_across_devices", False) and W > 1) else 1
        return float(n) / factor

    def _store(self, model: torch.nn.Module, step: int, res: TraceResult, fixed: bool) -> None:
        cos = applied_cosine(model, res.grad) if res.grad is not None else None
        res.grad = None
        res.checks["grad_cosine_applied"] = cos
        res.state["meta"]["checks"]["grad_cosine_applied"] = cos
        _, rank = world()
        trace_store.store_step(self.rd, step, model, res, rank)
        self.traced[step] = {k: v for k, v in res.checks.items() if isinstance(v, (int, float, str)) or v is None}
        self.rd.event("trace", step=step, rows=len(res.tokens["dot"]), seconds=round(res.checks["seconds"], 3),
                      traced_share=res.checks.get("traced_share"), grad_cosine_applied=cos)
        if cos is not None and cos < APPLIED_COSINE_MIN:
            why = (" (expected: a fixed batch= is traced, not the step's)" if fixed else
                   " (expected: training runs LoRA dropout, the re-run does not)" if self._lora_dropout(model) else
                   " (is `scheme` the weighting your loss uses, and `normaliser` its normalisation?)")
            self._warn(f"step {step}: cos(traced G, applied gradient) = {cos:.6f} < {APPLIED_COSINE_MIN}: the "
                       f"traced update is not the one the optimizer applied{why}")

    @staticmethod
    def _lora_dropout(model: torch.nn.Module) -> float:
        pcfgs = getattr(unwrap(model), "peft_config", None) or {}
        return max((float(getattr(c, "lora_dropout", 0.0) or 0.0) for c in pcfgs.values()), default=0.0)

    def _loss_notes(self, args) -> list[str]:
        """What the callback cannot reproduce of this Trainer's loss, said before training starts."""
        t, notes = self.trainer, []
        if getattr(args, "label_smoothing_factor", 0) > 0:
            notes.append(f"label_smoothing_factor={args.label_smoothing_factor}: the Trainer trains a smoothed "
                         "loss; the trace follows unsmoothed cross-entropy")
        if t is None:
            return notes
        if getattr(t, "compute_loss_func", None) is not None:
            notes.append("the Trainer's loss is a compute_loss_func the callback cannot see into: the trace "
                         f"follows scheme {self.scheme.name!r}; grad_cosine_applied says whether that matches")
        own = type(t).compute_loss
        if own is not Trainer.compute_loss and type(t).__name__ not in _KNOWN_SUBCLASSES:
            notes.append(f"{type(t).__name__} overrides compute_loss: the trace follows scheme "
                         f"{self.scheme.name!r} normalised as '{self.normaliser}'; grad_cosine_applied says "
                         "whether that matches")
        return notes

    def _warn(self, message: str) -> None:
        self.rd.event("warning", message=message)
        log.warning("tokviz: %s", message)

    def _ended_abnormally(self) -> None:
        """The watcher saw Trainer.train leave without on_train_end: close the run as failed."""
        self._close()
        if self.rd is not None and not (self.rd.path / "manifest.json").exists():
            self.rd.fail(RuntimeError(f"training stopped without finishing (an exception or an interrupt in the "
                                      f"Trainer's loop); traced steps {sorted(self.traced) or 'none'} are complete"))

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.trainer is not None and "compute_loss" in vars(self.trainer):
            del self.trainer.compute_loss                # the class's method again

    def _run_config(self, model: torch.nn.Module, notes: list[str]) -> dict:
        inner = unwrap(model)
        pcfgs = getattr(inner, "peft_config", None)
        if not pcfgs:
            raise ValueError("TokvizTraceCallback needs a peft LoRA model (get_peft_model) to trace")
        adapter = (getattr(inner, "active_adapters", None) or ["default"])[0]
        pc = pcfgs[adapter]
        targets = pc.target_modules
        base = self.base_model or pc.base_model_name_or_path or getattr(inner.config, "_name_or_path", "")
        dtype = str(next(inner.parameters()).dtype).replace("torch.", "")
        return {"model": base, "lora_r": pc.r, "lora_alpha": float(pc.lora_alpha),
                "lora_dropout": float(pc.lora_dropout),
                "lora_targets": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
                "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype),
                "attn_implementation": getattr(inner.config, "_attn_implementation", None) or "auto",
                "scheme": self.scheme.name, "scheme_params": self.scheme_params, "normaliser": self.normaliser,
                "source": "hf_callback", "trainer": type(self.trainer).__name__ if self.trainer else None,
                "trace": self.cfg.to_dict(), "trace_every": self.every, "loss_notes": notes,
                "sample_ids": f"batch key {self.id_key!r} when given, else run-unique negative numbers"}


# Trainer subclasses whose compute_loss is the Trainer's loss plus logging (TRL's SFTTrainer adds metrics)
_KNOWN_SUBCLASSES = frozenset({"SFTTrainer"})


def _find_trainer() -> tuple[Trainer | None, Any]:
    """The Trainer whose ``train`` is on this thread's stack (the callback's caller), and that frame."""
    f = sys._getframe(1)
    while f is not None:
        obj = f.f_locals.get("self")
        if isinstance(obj, Trainer) and f.f_code.co_name == "train":
            return obj, f
        f = f.f_back
    return None, None


class _TrainWatch:
    """A daemon thread that calls ``on_gone`` once ``frame`` (Trainer.train's) has left its thread's stack:
    training ended by an exception or an interrupt, without ``on_train_end`` (which stops the watch first)."""

    def __init__(self, frame: Any, on_gone: Callable[[], None], every: float = 0.5):
        self.frame, self.on_gone, self.every = frame, on_gone, every
        self.thread_id = threading.get_ident()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tokviz train watch", daemon=True)
        self.thread.start()

    def _on_stack(self) -> bool:
        f = sys._current_frames().get(self.thread_id)
        while f is not None:
            if f is self.frame:
                return True
            f = f.f_back
        return False

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            if not self._on_stack():
                self._stop.set()
                self.on_gone()
                return

    def stop(self) -> None:
        self._stop.set()
        self.frame = None
