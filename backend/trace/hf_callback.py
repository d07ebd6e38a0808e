"""Trace a Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) run: a ``TrainerCallback`` you drop into your script.

    from backend.trace.hf_callback import TokvizTraceCallback
    from backend.trace import TraceConfig
    cb = TokvizTraceCallback(every=20, config=TraceConfig(mode="position", max_sequences=4), tokenizer=tok)
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collate, callbacks=[cb])
    trainer.train()
    # -> <data root>/runs/<run_id>/trace/{tokens,token_modules,state}/step_000020...; python -m backend verify ...

At every ``every``-th optimizer step (1-based, the step whose update is being computed) the callback traces a
re-run on that step's first micro-batch, caught by a one-shot forward pre-hook on the model just before the
Trainer's own forward, so the trace sees the weights and the batch of the step it is named after. Or pass
``batch=`` to trace a fixed batch of your choice at every traced step. The re-run never changes training (forked
RNG, no ``.grad`` written, module modes restored); the callback only writes files. The batch must carry
``input_ids``, ``attention_mask`` and ``labels`` (HF convention, -100 = no loss).

The run directory's ``config.json`` records what ``verify`` needs to rebuild the model: the base model path
(``model.peft_config[adapter].base_model_name_or_path``, or ``base_model=``), the LoRA rank, alpha, dropout and
target modules, dtype and attention implementation. Under torchrun every rank traces its own micro-batch and
writes its own shards; G is the all-reduced mean, as DDP's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from backend.lm.loss import unwrap
from backend.store.rundir import RunDir
from backend.trace import TraceConfig, trace_batch
from backend.trace import store as trace_store
from backend.trace.core import world


class TokvizTraceCallback(TrainerCallback):
    """Writes traced steps of a Trainer run into a tokviz run directory (see the module docstring)."""

    def __init__(self, every: int, config: TraceConfig | None = None, scheme: str = "sft",
                 scheme_params: dict | None = None, tokenizer: Any = None, batch: dict | None = None,
                 runs_root: str | Path | None = None, name: str = "hf-trainer", run_id: str | None = None,
                 base_model: str | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1 (trace every N optimizer steps)")
        self.every = every
        self.cfg = config or TraceConfig()
        if self.cfg.inline:
            raise ValueError("the callback traces re-runs: use TraceConfig(inline=False)")
        self.scheme, self.scheme_params = scheme, scheme_params or {}
        self.tokenizer, self.batch = tokenizer, batch
        self.runs_root, self.name, self.run_id, self.base_model = runs_root, name, run_id, base_model
        self.rd: RunDir | None = None
        self.traced: dict[int, dict] = {}
        self._handle = None

    # ---- Trainer events ----------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tokenizer = self.tokenizer or kwargs.get("processing_class")
        _, rank = world()
        run_id = self.run_id
        if run_id is None:
            from backend.lm import dist as bdist
            from backend.store.rundir import new_run_id
            run_id = bdist.broadcast_object(new_run_id("train", self.name))      # one directory for all ranks
        root = Path(self.runs_root) if self.runs_root is not None else None
        self.rd = RunDir.create(kind="train", name=self.name, config=self._run_config(model), root=root,
                                run_id=run_id, is_writer=rank == 0)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        if step % self.every:
            return
        if self.batch is not None:
            self._trace(model, self.batch, step)
            return
        inner = unwrap(model)

        def pre_hook(module, a, kw):
            self._handle.remove()                       # one-shot, and our own re-run must not re-enter it
            self._handle = None
            self._trace(inner, kw, step)
        self._handle = inner.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self._handle is not None:                    # the step ran no forward through the model we hooked
            self._handle.remove()
            self._handle = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.rd is not None:
            self.rd.finish({"kind": "train", "source": "hf_callback", "traced_steps": sorted(self.traced),
                            "trace": {str(k): v for k, v in sorted(self.traced.items())}})

    # ---- helpers ----------------------------------------------------------------------------------------

    def _trace(self, model: torch.nn.Module, inputs: dict, step: int) -> None:
        missing = [k for k in ("input_ids", "attention_mask", "labels") if inputs.get(k) is None]
        if missing:
            raise ValueError(f"TokvizTraceCallback: the training batch lacks {missing}; the collator must give "
                             "input_ids, attention_mask and labels (-100 where no loss is taken)")
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        if inputs.get("sample_idx") is not None:
            batch["sample_idx"] = inputs["sample_idx"]
        res = trace_batch(model, batch, self.scheme, self.scheme_params, self.cfg, self.tokenizer, step=step)
        _, rank = world()
        trace_store.store_step(self.rd, step, model, res, rank)
        self.traced[step] = {k: v for k, v in res.checks.items() if isinstance(v, (int, float, str))}
        self.rd.event("trace", step=step, rows=len(res.tokens["dot"]), seconds=round(res.checks["seconds"], 3))

    def _run_config(self, model: torch.nn.Module) -> dict:
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
                "scheme": self.scheme, "scheme_params": self.scheme_params, "source": "hf_callback",
                "trace": self.cfg.to_dict(), "trace_every": self.every}
