"""Per-token gradient tracing of LoRA fine-tuning (docs/design.md, "Definitions": modes ``position`` and ``token``).

    from backend.trace import TraceConfig, trace_batch
    from backend.trace import store as trace_store
    res = trace_batch(model, batch, scheme, scheme_params, TraceConfig(mode="position"), tokenizer, step=step)
    trace_store.save_step_state(rundir, step, model, res)      # before the optimizer changes the weights
    trace_store.write_step(rundir, step, res)                  # trace/tokens, trace/token_modules shards

Files: ``config`` (TraceConfig), ``sites`` (LoRA matrices by module name), ``hooks`` (position-mode hooks and
their context manager), ``position`` / ``token`` (the two modes), ``batch`` (recorded positions, per-token
statistics, columns), ``core`` (trace_batch, InlineTrace).
"""
from backend.trace.config import TraceConfig
from backend.trace.core import InlineTrace, TraceResult, trace_batch
from backend.trace.sites import LoraSite, discover_lora_modules, lora_parameters

__all__ = ["TraceConfig", "TraceResult", "InlineTrace", "trace_batch", "LoraSite", "discover_lora_modules",
           "lora_parameters"]
