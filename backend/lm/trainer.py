"""LoRA SFT under a token-weighting scheme: ``python -m backend train ...`` -> a run directory.

    python -m backend train --task arith --scheme antiop --steps 200
    python -m backend train --config run.yaml --trace-every 20 --trace-mode position
    torchrun --nproc_per_node 2 -m backend train --task arith --steps 100        # DDP, gloo on CPU
    python -m backend resume RUN_DIR          # continue an interrupted run from its latest checkpoint

The run directory gets config.json, events.jsonl (start, progress with step/loss/lr/tokens per s/ETA, eval,
done or error), train_steps Parquet parts, traced steps (when asked), the final adapter, eval results, and
manifest.json last.

Every ``checkpoint_every`` steps and at traced steps the main process saves, after the optimizer step, all
that the next step depends on (``checkpoint/step_NNNNNN.pt``, the latest one only): the trainable weights, the
optimizer and scheduler state, the sampler's generator and pending order, the RNG states, and the train_steps
rows not yet flushed. ``resume`` restores it and runs the remaining steps, so on CPU a resumed run's losses and
final adapter are bit-identical to an uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from backend.grads.embgrad import EmbGradRecorder
from backend.jobs.train import TrainConfig
from backend.lm import dist as bdist
from backend.lm.data import text_format
from backend.lm.eval_steps import StepEvaluator
from backend.lm.loss import forward_loss, unwrap
from backend.lm.models import apply_lora, load_model_and_tokenizer, resolve_device, resolved_lora_targets
from backend.lm.schemes import get_scheme
from backend.store import schema
from backend.store.rundir import CONFIG, RunDir, atomic_write_bytes, new_run_id, rows_to_table

TRAIN_STEPS_FLUSH = 50      # steps per train_steps Parquet part: a crash loses at most this many rows
PROGRESS_EVERY_S = 2.0      # a progress event at least this often (besides every log_every steps)
CHECKPOINT_DIR = "checkpoint"


@dataclass
class Dataset:
    encoded: list[dict]           # input_ids, labels, sample_idx
    eval_examples: list           # Example objects for exact-match eval ([] if none)
    task: object | None           # the Task (None for user data)
    note: str | None = None       # how prompts were joined when nothing chose it (data.prompt_format_note)


def build_dataset(cfg: TrainConfig, tokenizer) -> Dataset:
    from backend.lm import data, tasks
    fmt = data.text_format(cfg.chat_template, cfg.prompt_template)
    if cfg.dataset:
        records = data.load_examples(cfg.dataset)
        encoded = data.encode_examples(tokenizer, records, cfg.max_len, chat=fmt)
        return Dataset(encoded=encoded, eval_examples=[], task=None,
                       note=data.prompt_format_note(tokenizer, fmt, records))
    task = tasks.get_task(cfg.task)
    train, evals = task.generate(cfg.data_seed, cfg.n_train, cfg.n_eval, **cfg.task_params)
    encoded = data.encode_examples(tokenizer, train, cfg.max_len, chat=fmt)
    return Dataset(encoded=encoded, eval_examples=evals, task=task, note=data.prompt_format_note(tokenizer, fmt, train))


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:              # step: 0-based count of updates done so far
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 1.0
    return f


class BatchSampler:
    """Seeded epochs of shuffled indices; each step takes one global batch, each rank its own slice."""

    def __init__(self, n: int, per_rank: int, info: bdist.DistInfo, seed: int):
        self.n, self.per_rank, self.info = n, per_rank, info
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        need = self.per_rank * self.info.world_size
        while len(self.order) < need:
            self.order += torch.randperm(self.n, generator=self.gen).tolist()
        batch, self.order = self.order[:need], self.order[need:]
        r = self.info.rank
        return batch[r * self.per_rank:(r + 1) * self.per_rank]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_eval(model, tokenizer, cfg: TrainConfig, ds: Dataset, device, rd: RunDir | None = None,
             when: str = "after") -> dict:
    """Evaluate on the held-out examples; with ``rd``, ``evaluating`` events (done/total generations, ETA)."""
    from backend.lm.evaluate import evaluate
    was_training = model.training
    model.eval()
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        spent = time.time() - t0
        rd.event("evaluating", when=when, done=done, total=total,
                 eta_s=round(spent / done * (total - done), 1) if done else None)
    try:
        return evaluate(unwrap(model), tokenizer, ds.task, ds.eval_examples, max_new_tokens=cfg.eval_max_new_tokens,
                        batch_size=cfg.eval_batch_size, k_samples=cfg.eval_k, temperature=cfg.eval_temperature,
                        seed=cfg.seed, chat=text_format(cfg.chat_template, cfg.prompt_template),
                        on_progress=progress if rd is not None else None)
    finally:
        model.train(was_training)


def train(cfg: TrainConfig, progress: bool = True, resume_from: Path | None = None) -> Path:
    """Run one training job; returns the run directory. See the module docstring. ``resume_from``: a
    checkpoint file of this run (``latest_checkpoint``) to continue from, in the run's own directory."""
    device = resolve_device(cfg.device)
    info = bdist.init_from_env(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    seed_everything(cfg.seed)
    name = cfg.name or cfg.scheme
    if resume_from is not None:
        if info.enabled:
            bdist.shutdown()
            raise ValueError("resume continues single-process runs only; run it without torchrun")
        rd = RunDir.reopen(Path(resume_from).parent.parent, resumed_from=str(Path(resume_from).name))
    else:
        run_id = bdist.broadcast_object(cfg.run_id or new_run_id("train", name))     # every rank: rank 0's id
        rd = RunDir.create("train", name, cfg.to_dict(), root=Path(cfg.runs_root) if cfg.runs_root else None,
                           run_id=run_id, is_writer=info.is_main)
    try:
        return _train(cfg, rd, info, device, progress, resume_from)
    except BaseException as e:
        rd.fail(e)      # recorded for the UI; no manifest, so the run shows as failed with what it has
        raise
    finally:
        bdist.shutdown()


def _train(cfg: TrainConfig, rd: RunDir, info: bdist.DistInfo, device: torch.device, progress: bool,
           resume_from: Path | None = None) -> Path:
    from backend.lm.data import collate

    t_load = time.time()
    rd.event("loading", model=str(cfg.model))
    model, tok = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=str(device),
                                          attn_implementation=cfg.attn_implementation,
                                          trust_remote_code=cfg.trust_remote_code)
    model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    model.train()
    ds = build_dataset(cfg, tok)
    if ds.note:
        rd.event("note", message=ds.note)            # the PromptFormatWarning, for the run's events and header
    if cfg.warmup_steps > cfg.steps:
        note = (f"warmup_steps={cfg.warmup_steps} is longer than the run's {cfg.steps} steps: the learning rate "
                f"rises for the whole run and ends at {cfg.steps / cfg.warmup_steps:.0%} of lr={cfg.lr:g}")
        warnings.warn(note, stacklevel=2)
        rd.event("note", message=note)
    scheme = get_scheme(cfg.scheme)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_targets = resolved_lora_targets(model)
    rd.event("loaded", seconds=round(time.time() - t_load, 3), trainable_params=n_trainable,
             lora_targets=lora_targets, train_examples=len(ds.encoded), eval_examples=len(ds.eval_examples),
             world_size=info.world_size)

    eval_before = None
    if cfg.eval_before and ds.eval_examples and info.is_main and resume_from is None:
        eval_before = run_eval(model, tok, cfg, ds, device, rd, when="before")
        rd.event("eval", when="before", accuracy=eval_before["accuracy"], n=eval_before["n"])

    ddp_model = model
    if info.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = BatchSampler(len(ds.encoded), cfg.batch_size * cfg.grad_accum, info, cfg.seed + 1)
    tracer = _make_tracer(cfg, rd, info, tok, scheme, ds)
    embrec = EmbGradRecorder.create(cfg, model, tok, rd, info)      # --embgrad-every; does nothing when 0
    stepeval = StepEvaluator.create(cfg, rd, info, ds)              # --eval-every (#12); does nothing when 0

    rows: dict[str, list] = {f.name: [] for f in schema.TRAIN_STEPS}
    part = 0
    seen_tokens = 0
    first = 1
    loss_avg = float("nan")
    t0 = time.time()
    if resume_from is not None:
        st = load_checkpoint(resume_from, model, opt, sched, sampler, device)
        first, part, seen_tokens, loss_avg = st["step"] + 1, st["part"], st["seen_tokens"], st["loss"]
        rows, eval_before, t0 = st["rows"], st["eval_before"], time.time() - st["elapsed_s"]
        if tracer is not None:
            tracer.steps, tracer.checks = st["trace_steps"], st["trace_checks"]
        for f in (rd.path / "train_steps").glob("part_*.parquet"):      # written after the checkpoint: redone
            if int(f.name.split(".")[0].split("_")[1]) >= part:
                f.unlink()
        rd.event("resumed", step=st["step"], total=cfg.steps)
    last_progress = time.time()
    bar = tqdm(total=cfg.steps, initial=first - 1, desc=f"train {cfg.scheme}",
               disable=not (progress and info.is_main), unit="step")
    for step in range(first, cfg.steps + 1):
        idx = sampler.next()
        micro = [idx[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.grad_accum)]
        batches = [_to(collate([ds.encoded[j] for j in m], tok.pad_token_id), device) for m in micro]
        traced = tracer is not None and step % cfg.trace_every == 0
        if traced and not cfg.trace_inline:
            tracer.rerun(ddp_model, batches, step)
        embrec.begin(step)      # after any trace re-run: only the real micro-batches reach the embedding hook
        loss_sum = ce_sum = 0.0
        n_tok = torch.zeros((), dtype=torch.long)
        for i, b in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = ddp_model.no_sync() if (info.enabled and not sync) else nullcontext()
            inline = tracer.inline(ddp_model, step, b) if (traced and cfg.trace_inline) else nullcontext()
            with ctx, inline as box:
                out = forward_loss(ddp_model, b, scheme, cfg.scheme_params)
                (out.total / cfg.grad_accum).backward()
                if box is not None:
                    box.out = out
            loss_sum += out.total.item()
            ce_sum += out.ce.item()
            n_tok += out.mask.sum().cpu()
        if traced and not cfg.trace_inline:
            tracer.applied(ddp_model, step)              # cos(G, .grad) recorded; step written before opt.step
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr_now = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        bdist.all_reduce_sum(n_tok)
        stats = torch.tensor([loss_sum, ce_sum], dtype=torch.float64)
        bdist.all_reduce_sum(stats)
        loss_avg, ce_avg = (stats / (cfg.grad_accum * info.world_size)).tolist()
        elapsed = time.time() - t0
        seen_tokens += int(n_tok)
        tps = seen_tokens / elapsed if elapsed > 0 else 0.0      # response tokens/s, all ranks, since the start
        for k, v in dict(run_id=rd.run_id, step=step, loss=loss_avg, ce_loss=ce_avg, lr=lr_now,
                         grad_norm=float(grad_norm), tokens=int(n_tok), tokens_per_s=tps, elapsed_s=elapsed).items():
            rows[k].append(v)
        eta = elapsed / step * (cfg.steps - step)
        # every log_every steps, and at any step once PROGRESS_EVERY_S went by without one: slow steps still move
        if step % cfg.log_every == 0 or step in (1, cfg.steps) or time.time() - last_progress >= PROGRESS_EVERY_S:
            last_progress = time.time()
            rd.event("progress", step=step, total=cfg.steps, loss=round(loss_avg, 5), ce_loss=round(ce_avg, 5),
                     lr=lr_now, tokens_per_s=round(tps, 1), eta_s=round(eta, 1), elapsed_s=round(elapsed, 2))
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if info.is_main and (step % TRAIN_STEPS_FLUSH == 0 or step == cfg.steps):
            rd.write_table(f"train_steps/part_{part:06d}.rank0.parquet", rows_to_table(rows, schema.TRAIN_STEPS))
            rows = {k: [] for k in rows}
            part += 1
        # --eval-every (#12): before this step's checkpoint, so a resumed run keeps it; training is left as it was
        stepeval.after_step(step, lambda: run_eval(model, tok, cfg, ds, device, rd, when="during"))
        if info.is_main and (traced or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save_checkpoint(rd, step, model, opt, sched, sampler, device, world_size=info.world_size, part=part,
                            rows=rows, loss=loss_avg, seen_tokens=seen_tokens, elapsed_s=time.time() - t0,
                            eval_before=eval_before,
                            trace_steps=list(tracer.steps) if tracer is not None else [],
                            trace_checks=list(tracer.checks) if tracer is not None else [])
    bar.close()
    train_s = time.time() - t0

    manifest: dict = {"steps": cfg.steps, "train_seconds": round(train_s, 3), "world_size": info.world_size,
                      "final_loss": loss_avg, "trainable_params": n_trainable, "lora_targets": lora_targets}
    digests = bdist.all_gather_object(param_digest(model))
    manifest["rank_param_digests"] = digests
    if len(set(digests)) != 1:      # DDP must keep every replica identical; anything else is a bug
        raise RuntimeError(f"DDP ranks disagree on the trained LoRA weights: {digests}")
    if tracer is not None:
        manifest["trace"] = tracer.summary()
    if info.is_main:
        model.save_pretrained(rd.path / "adapter")
        if ds.eval_examples:
            res = run_eval(model, tok, cfg, ds, device, rd, when="after")
            _write_eval(rd, res)
            manifest["eval"] = {k: v for k, v in res.items() if k != "records"}
            if eval_before is not None:
                manifest["eval_before"] = {k: v for k, v in eval_before.items() if k != "records"}
            rd.event("eval", when="after", accuracy=res["accuracy"], n=res["n"])
        else:
            manifest["eval"] = {"skipped": "user dataset: no answer checker" if cfg.dataset else "n_eval = 0"}
    embrec.finish(manifest)
    stepeval.finish(manifest)                                        # --eval-every (#12)
    rd.finish(manifest)
    bdist.barrier()           # no rank returns before rank 0 has written the manifest
    return rd.path


# ---- checkpoints: resume an interrupted run ----------------------------------------------------------------

def checkpoint_path(run_path: Path, step: int) -> Path:
    return Path(run_path) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def latest_checkpoint(run_path: Path) -> Path | None:
    """The checkpoint of the highest step in a run directory (temp files of a killed writer are ignored)."""
    files = sorted((Path(run_path) / CHECKPOINT_DIR).glob("step_*.pt"))
    return files[-1] if files else None


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def save_checkpoint(rd: RunDir, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, sampler: BatchSampler, device: torch.device,
                    **extra: object) -> Path:
    """Everything step ``step + 1`` depends on, in one file written atomically; older checkpoints are removed
    once it is in place. ``extra``: the loop's counters (part, rows, loss, seen_tokens, elapsed_s, ...)."""
    state = {"step": step, "weights": {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                                       if p.requires_grad},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "sampler": {"generator": sampler.gen.get_state(), "order": list(sampler.order)},
             "rng": _rng_state(device), **extra}
    buf = io.BytesIO()
    torch.save(state, buf)
    out = checkpoint_path(rd.path, step)
    atomic_write_bytes(out, buf.getvalue())
    for old in (rd.path / CHECKPOINT_DIR).glob("step_*.pt"):
        if old != out:
            old.unlink()
    rd.event("checkpoint", step=step)
    return out


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, sampler: BatchSampler, device: torch.device) -> dict:
    """Restore a checkpoint into freshly built training objects (RNG states last); returns its counters."""
    # weights_only=False: the file holds Python RNG states, and it is this run's own file, written by save_checkpoint
    st = torch.load(path, map_location="cpu", weights_only=False)
    if st["world_size"] != sampler.info.world_size:
        raise ValueError(f"{path}: saved by a run of {st['world_size']} processes; resume continues it with "
                         f"{sampler.info.world_size} (the data order and the RNG states belong to that world size)")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(st["weights"]):
        raise ValueError(f"{path}: its trainable parameters do not match the model built from the run's config "
                         f"({len(st['weights'])} saved, {len(trainable)} in the model)")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(st["weights"][n])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    sampler.gen.set_state(st["sampler"]["generator"])
    sampler.order = list(st["sampler"]["order"])
    rng = st["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return st


def resume(run_path: Path, progress: bool = True) -> Path:
    """Continue an interrupted (or failed) ``train`` run from its latest checkpoint, in its own directory,
    with the config it was started with. ValueError if it has no checkpoint or is not a train run."""
    run_path = Path(run_path)
    record = json.loads((run_path / CONFIG).read_text())
    if record.get("kind") != "train":
        raise ValueError(f"{run_path}: resume continues train runs; this run's kind is {record.get('kind')!r}")
    ckpt = latest_checkpoint(run_path)
    if ckpt is None:
        raise ValueError(f"{run_path}: no checkpoint to resume from (expected {CHECKPOINT_DIR}/step_NNNNNN.pt; "
                         "a run saves one every checkpoint_every steps and at traced steps)")
    cfg = TrainConfig.from_dict(record["config"])
    return train(cfg, progress=progress, resume_from=ckpt)


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters' bytes, in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_eval(rd: RunDir, res: dict) -> None:
    cols: dict[str, list] = {f.name: [] for f in schema.EVAL}
    for r in res["records"]:
        for k in cols:
            cols[k].append(rd.run_id if k == "run_id" else r[k])
    rd.write_table("eval/rank0.parquet", rows_to_table(cols, schema.EVAL))


def _make_tracer(cfg: TrainConfig, rd: RunDir, info: bdist.DistInfo, tok, scheme, ds: Dataset):
    if cfg.trace_every <= 0:
        return None
    from backend.trace.train_hook import TrainTracer
    return TrainTracer(cfg, rd, info, tok, scheme, eval_examples=ds.eval_examples)
