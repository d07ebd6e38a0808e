"""The tracer's config: one dataclass, validated on construction.

    cfg = TraceConfig(mode="token", magnitude="sketch", sketch_k=64, max_sequences=4)
    cfg = TraceConfig.from_dict(saved)          # as stored with every traced step
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODES = ("position", "token")
TRACE_LOSSES = ("scheme", "ce")
MAGNITUDES = ("exact", "sketch", "none")
TOKEN_POSITIONS = ("all", "response")
AUTOCAST_DTYPES = ("bfloat16", "float16")


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TraceConfig:
    mode: str = _f("position", "position: per-position pieces of the batch gradient; token: the gradient of "
                               "each token's own loss (see DESIGN.md, Definitions)")
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

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("trace_loss", TRACE_LOSSES), ("magnitude", MAGNITUDES),
                              ("token_positions", TOKEN_POSITIONS)):
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
        """The trace config a TrainConfig asks for (its ``trace_*`` fields), with ``overrides`` on top."""
        d = dict(mode=tc.trace_mode, trace_loss=tc.trace_loss, magnitude=tc.trace_magnitude,
                 sketch_k=tc.trace_sketch_k, max_sequences=tc.trace_sequences, inline=tc.trace_inline,
                 seed=tc.seed)
        d.update(overrides)
        return cls(**d)
