"""Per-vocabulary-token embedding gradients during training: n_v = ||dL/dE_v|| at chosen steps, from the
gradient flowing into the embedding OUTPUT, scattered to token ids (docs/design.md, "Embedding token gradients").

    rec = EmbGradRecorder.create(cfg, model, tok, rd, info)     # in the trainer, before the loop
    rec.begin(step)          # before the step's micro-batches: arms the hook when step % embgrad_every == 0
    ...forward, backward...  # the hook sums dL/d(emb output) over the positions of each id (index_add)
    rec.finish(manifest)     # after the loop: writes the last step, adds a summary to the manifest

For E the embedding matrix and x the ids, the output row at (b, t) is E[x_{b,t}], so dL/dE_v = sum over the
positions holding v of dL/d(out_{b,t}). The hook needs no gradient on E: it works when the embeddings are
frozen under LoRA (the output is then made to require grad, which extends the backward through the first
layer's input path down to it: one extra hook, not a second backward). Under gradient accumulation the sums
run over all of the step's micro-batches (each backward is of loss / grad_accum, as the step's gradient is).
Under torchrun each rank sees its own micro-batches; rank 0's are recorded.

Writes ``embgrad/step_NNNNNN.parquet`` (tokens with n_v > 0) and ``embgrad_steps/step_NNNNNN.parquet`` (the
step's metrics, backend.analysis.embgrad_metrics) as each recorded step ends.
"""
from __future__ import annotations

import numpy as np
import torch

from backend.analysis import embgrad_metrics
from backend.grads.hooks import input_embedding
from backend.store import schema
from backend.store.rundir import RunDir, rows_to_table


class TokenGradSums:
    """sum_{(b,t): x_{b,t} = v} g_{b,t} for the ids seen, accumulated over backward passes (float32 at least)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None          # (U,) distinct ids seen, ascending
        self.sums: torch.Tensor | None = None         # (U, D) gradient sums, float32 (or wider)
        self.counts: torch.Tensor | None = None       # (U,) occurrences

    def add(self, ids: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """ids (B, T), grad (B, T, D) = dL/d(embedding output); ``mask`` (B, T) keeps real tokens only."""
        grad = grad.reshape(-1, grad.shape[-1])                                            # (N, D)
        ids, grad = ids.reshape(-1), grad.to(torch.promote_types(grad.dtype, torch.float32))  # bf16 -> float32
        if mask is not None:
            keep = mask.reshape(-1).bool()
            ids, grad = ids[keep], grad[keep]
        if self.ids is not None:        # merge with what earlier micro-batches left
            ids = torch.cat([self.ids, ids])
            grad = torch.cat([self.sums, grad])
            weights = torch.cat([self.counts, torch.ones(len(ids) - len(self.ids), dtype=torch.long,
                                                         device=ids.device)])
        else:
            weights = torch.ones(len(ids), dtype=torch.long, device=ids.device)
        uniq, inv = torch.unique(ids, return_inverse=True)                                 # (U,), (N,)
        self.sums = torch.zeros(len(uniq), grad.shape[-1], dtype=grad.dtype, device=grad.device)
        self.sums.index_add_(0, inv, grad)
        self.counts = torch.zeros(len(uniq), dtype=torch.long, device=ids.device).index_add_(0, inv, weights)
        self.ids = uniq

    def norms(self, vocab_size: int) -> np.ndarray:
        """n_v for every vocabulary token (0 where v was not seen), float64 (V,)."""
        n = np.zeros(vocab_size, dtype=np.float64)
        if self.ids is not None:
            n[self.ids.cpu().numpy()] = self.sums.norm(dim=-1).double().cpu().numpy()
        return n


class EmbeddingGradHook:
    """A forward hook on the input embedding that, while ``armed``, makes its output require grad and sums the
    gradient reaching it into ``sums`` per id. Attached from construction until ``close``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.embedding = input_embedding(model)
        self.vocab_size = int(self.embedding.weight.shape[0])
        self.armed = False
        self.sums = TokenGradSums()
        self._handle = self.embedding.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not (self.armed and torch.is_grad_enabled()):
            return output                     # generation, reference passes, steps not recorded
        ids = args[0].detach()                # (B, T)
        if not output.requires_grad:          # frozen embedding: a leaf; make the backward reach it
            output = output.detach().requires_grad_(True)
        output.register_hook(lambda g: self.sums.add(ids, g.detach()))
        return output

    def close(self) -> None:
        self._handle.remove()


class EmbGradRecorder:
    """The trainer's side (module docstring): which steps, the hook, the shards."""

    def __init__(self, every: int, stride: int, model: torch.nn.Module, tok: object, rd: RunDir,
                 is_main: bool, number_ids: list[int] | None) -> None:
        self.every, self.stride, self.tok, self.rd, self.is_main = every, stride, tok, rd, is_main
        self.number_ids = number_ids
        self.texts: dict[int, str] = {}       # token id -> its text: decoded once per run, not at every step
        self.hook = EmbeddingGradHook(model) if every > 0 else None
        self.step: int | None = None          # the armed step
        self.recorded: list[int] = []
        self.last: dict = {}

    @classmethod
    def create(cls, cfg: object, model: torch.nn.Module, tok: object, rd: RunDir, info: object) -> EmbGradRecorder:
        """From a TrainConfig (``embgrad_every``, ``embgrad_stride``; 0 = off): number tokens 0..p-1 are the
        modadd task's (``task_params.p``, default 97), each of which must be one token of the vocabulary."""
        every, stride = int(getattr(cfg, "embgrad_every", 0)), int(getattr(cfg, "embgrad_stride", 0))
        number_ids = None
        if every and stride:
            p = int(cfg.task_params.get("p", 97)) if cfg.task == "modadd" and not cfg.dataset else None
            if p is None:
                raise ValueError("embgrad_stride needs the modadd task (its number tokens 0..p-1)")
            number_ids = number_token_ids(tok, p)
            if not 1 <= stride <= p:
                raise ValueError(f"embgrad_stride {stride} must be in 1..{p} (modadd's p)")
        return cls(every, stride, model, tok, rd, bool(getattr(info, "is_main", True)), number_ids)

    def begin(self, step: int) -> None:
        """Before step ``step``'s micro-batches: write the step recorded before, arm for this one if due."""
        if self.hook is None:
            return
        self._flush()
        self.hook.armed = step % self.every == 0
        self.step = step if self.hook.armed else None

    def _flush(self) -> None:
        if self.hook is None or self.step is None:
            return
        step, sums = self.step, self.hook.sums
        self.hook.armed, self.step, self.hook.sums = False, None, TokenGradSums()
        n = sums.norms(self.hook.vocab_size)                                              # (V,)
        nums = n[self.number_ids] if self.number_ids is not None else None
        m = embgrad_metrics.step_metrics(n, nums, self.stride)
        self.recorded.append(step)
        self.last = {"step": step, **m}
        if not self.is_main:
            return
        ids = sums.ids.cpu().numpy() if sums.ids is not None else np.zeros(0, dtype=np.int64)
        counts = sums.counts.cpu().numpy() if sums.counts is not None else np.zeros(0, dtype=np.int64)
        keep = n[ids] > 0
        ids, counts = ids[keep], counts[keep]
        self.rd.write_table(f"embgrad/step_{step:06d}.parquet", rows_to_table({
            "run_id": [self.rd.run_id] * len(ids), "step": [step] * len(ids), "token_id": ids.astype(np.int32),
            "token": self.token_texts(ids), "count": counts.astype(np.int32),
            "norm": n[ids].astype(np.float32)}, schema.EMBGRAD))
        row = {k: [v] for k, v in m.items()}
        self.rd.write_table(f"embgrad_steps/step_{step:06d}.parquet", rows_to_table(
            {"run_id": [self.rd.run_id], "step": [step], "stride": [self.stride], **row}, schema.EMBGRAD_STEPS))

    def token_texts(self, ids: np.ndarray) -> list[str]:
        """The text of each id (``tok.decode([id])``), cached: a recorded step mostly sees ids seen before, and
        decoding them again took a third of a recorded step's own work (3.3 -> 2.1 ms with the writes, tiny
        model)."""
        for i in ids.tolist():
            if i not in self.texts:
                self.texts[i] = self.tok.decode([i])
        return [self.texts[i] for i in ids.tolist()]

    def finish(self, manifest: dict) -> None:
        """After the loop: write the last recorded step, detach the hook, summarise into ``manifest``."""
        if self.hook is None:
            return
        self._flush()
        self.hook.close()
        manifest["embgrad"] = {"every": self.every, "stride": self.stride, "steps": len(self.recorded),
                               "last": self.last}


def number_token_ids(tok: object, p: int) -> list[int]:
    """The ids of the tokens "0".."p-1"; ValueError when a number is not one token of the vocabulary."""
    vocab = tok.get_vocab()
    missing = [i for i in range(p) if str(i) not in vocab]
    if missing:
        raise ValueError(f"stride metrics need every number 0..{p - 1} as one token; the tokenizer lacks "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (use the tiny-modadd model)")
    return [vocab[str(i)] for i in range(p)]
