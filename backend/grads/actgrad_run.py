"""The ``actgrad`` job: dL/dh_{l,t} for every chosen decoder layer l and every position t of N samples, with one
forward and one backward per batch (``backend.jobs.actgrad`` has the config, the tables and the targets).

    python -m backend actgrad --run data/runs/demo-sft-position --samples 32 --targets "last =|last digit"
    grads = layer_grads(model, batch, layers=[0, 3], loss_fn=ce_sum)      # {layer: (B, T, D) float32}

The loss: ``ce`` = sum of the response tokens' cross-entropy over all samples / their number (so a sample's
gradients do not depend on which batch it is in); ``scheme`` = the run's scheme loss on each batch.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from backend.grads.hooks import LayerGradHooks, decoder_layers
from backend.jobs.actgrad import (
    ACTGRAD,
    ACTGRAD_SAMPLES,
    ACTGRAD_TARGETS,
    ACTGRAD_VECTORS,
    KIND,
    ActgradConfig,
    find_target,
    parse_layers,
    parse_targets,
)
from backend.store.rundir import CONFIG, RunDir, find_run, rows_to_table


def layer_grads(model: torch.nn.Module, batch: dict, layers: list[int],
                loss_fn: Callable[[torch.Tensor, dict], torch.Tensor]) -> dict[int, torch.Tensor]:
    """{layer: dL/dh_l (B, T, D), float32 or wider} for one batch: one forward, one backward.
    ``loss_fn(logits, batch)`` -> scalar. For tests and small batches; ``run`` reduces in the hook instead of
    keeping every layer."""
    out: dict[int, torch.Tensor] = {}

    def keep(i: int, g: torch.Tensor) -> None:
        out[i] = g.detach().to(torch.promote_types(g.dtype, torch.float32))
    with LayerGradHooks(model, layers, keep) as hooks:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hooks.backward(loss_fn(logits, batch))
    return out


def batch_grads(model: torch.nn.Module, batch: dict, layers: list[int], at: list[tuple[int, int]],
                forward: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], torch.Tensor]:
    """What the job keeps of one batch, reduced inside the hooks (one layer's full gradient alive at a time):
    ({layer: ||dL/dh|| (B, T)}, {layer: dL/dh at the (row, position) pairs ``at`` (len(at), D)}, the logits).
    ``forward(model, batch) -> (loss, logits)``. Float32 whatever the model's dtype."""
    norms: dict[int, np.ndarray] = {}
    vecs: dict[int, np.ndarray] = {}

    def on_grad(layer: int, g: torch.Tensor) -> None:
        g = g.detach().float()                                                # (B, T, D)
        norms[layer] = g.norm(dim=-1).cpu().numpy()                           # (B, T)
        if at:
            rows = torch.tensor([b for b, _ in at], device=g.device)
            poss = torch.tensor([p for _, p in at], device=g.device)
            vecs[layer] = g[rows, poss].cpu().numpy()                         # (len(at), D)

    with LayerGradHooks(model, layers, on_grad) as hooks:
        loss, logits = forward(model, batch)
        hooks.backward(loss)
    return norms, vecs, logits.detach()


def ce_forward(n_total: int) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]:
    """forward(model, batch) -> (CE summed over the batch's response tokens / ``n_total``, logits)."""
    ce = ce_sum_over(n_total)

    def f(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return ce(logits, batch), logits
    return f


def ce_sum_over(n_total: int) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    """Plain CE summed over the batch's response tokens, divided by ``n_total`` (all samples' response tokens)."""
    from backend.lm.loss import per_token_ce

    def f(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        loss, mask = per_token_ce(logits, batch["labels"])           # (B, T-1) each
        return (loss * mask).sum() / n_total
    return f


# ---- the job -----------------------------------------------------------------------------------------------

@dataclass
class Source:
    """What the samples and the model come from."""
    model: torch.nn.Module
    tok: object
    examples: list                  # Example objects or records with prompt/response
    chat: bool | str                # data.Format: how the run joined prompts and responses
    run_cfg: dict                   # the train run's config ({} without a run)


def _run_config(run: Path) -> dict:
    f = Path(run) / CONFIG
    if not f.exists():
        raise ValueError(f"run {str(run)!r} has no {CONFIG}: not a run directory")
    rec = json.loads(f.read_text())
    if rec.get("kind") != "train":
        raise ValueError(f"run {str(run)!r} is a {rec.get('kind')!r} run; actgrad reads train runs (their adapter)")
    return rec["config"]


def _load_adapter_tensors(model: torch.nn.Module, file: Path) -> None:
    """Copy a step's saved LoRA tensors (trace/state/step_N/adapter.safetensors, by parameter name) in."""
    from safetensors.torch import load_file
    saved = load_file(str(file))
    params = dict(model.named_parameters())
    unknown = [k for k in saved if k not in params]
    if unknown:
        raise ValueError(f"{file}: tensors {unknown[:3]} do not exist in the model rebuilt from the run's config")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)


def load_source(cfg: ActgradConfig) -> Source:
    from backend.lm import data, tasks
    from backend.lm.models import apply_lora, load_model_and_tokenizer
    run = find_run(cfg.run) if cfg.run else None
    run_cfg = _run_config(run) if run is not None else {}
    name = run_cfg.get("model", "default") if cfg.run else (cfg.model or "default")
    model, tok = load_model_and_tokenizer(name, dtype=cfg.dtype, device=cfg.device,
                                          attn_implementation=cfg.attn_implementation,
                                          trust_remote_code=cfg.trust_remote_code)
    if run is not None:
        if cfg.adapter_step:
            f = run / "trace" / "state" / f"step_{cfg.adapter_step:06d}" / "adapter.safetensors"
            if not f.exists():
                from backend.trace.store import state_steps
                saved = state_steps(run)
                raise ValueError(f"run {cfg.run!r} saved no adapter at step {cfg.adapter_step}; saved steps: "
                                 f"{saved or 'none'} (or 0: the final adapter)")
            model = apply_lora(model, r=run_cfg["lora_r"], alpha=run_cfg["lora_alpha"], dropout=0.0,
                               targets=run_cfg["lora_targets"])
            _load_adapter_tensors(model, f)
        else:
            if not (run / "adapter").is_dir():
                raise ValueError(f"run {cfg.run!r} has no final adapter (adapter/): unfinished? pick a traced "
                                 "step with adapter_step")
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(run / "adapter"))
    elif cfg.adapter:
        from peft import PeftModel
        if not Path(cfg.adapter).is_dir():
            raise ValueError(f"adapter {cfg.adapter!r} is not a directory (a peft save_pretrained folder)")
        model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()                   # no dropout: the gradient of the loss as the model computes it
    for p in model.parameters():
        p.requires_grad_(False)    # the backward goes to activations only (LayerGradHooks)

    chat = data.text_format(run_cfg.get("chat_template", True), run_cfg.get("prompt_template", ""))
    if not cfg.task and run_cfg.get("dataset"):
        examples = data.load_examples(run_cfg["dataset"])[:cfg.samples]
    else:
        task = tasks.get_task(cfg.task or run_cfg.get("task", "arith"))
        params = cfg.task_params or (run_cfg.get("task_params", {}) if task.name == run_cfg.get("task") else {})
        seed = cfg.data_seed if cfg.data_seed >= 0 else int(run_cfg.get("data_seed", 0))
        if cfg.split == "eval":
            tasks.check_held_out(cfg.samples, run_cfg, task.name, seed, params, "samples")
            _, examples = task.generate(seed, 0, cfg.samples, **params)
        else:
            examples, _ = task.generate(seed, cfg.samples, int(run_cfg.get("n_eval", 0)), **params)
    if not examples:
        raise ValueError("no samples to run on")
    return Source(model, tok, list(examples), chat, run_cfg)


def _field(ex: object, key: str) -> str:
    return str(getattr(ex, key, None) if not isinstance(ex, dict) else ex.get(key, "") or "")


def run(cfg: ActgradConfig, progress: bool = True) -> Path:
    """Run one actgrad job; returns the run directory (module docstring)."""
    rd = RunDir.create(KIND, cfg.name or "actgrad", cfg.to_dict(),
                       root=Path(cfg.runs_root) if cfg.runs_root else None, run_id=cfg.run_id or None)
    try:
        return _run(cfg, rd, progress)
    except BaseException as e:
        rd.fail(e)
        raise


def _run(cfg: ActgradConfig, rd: RunDir, progress: bool) -> Path:
    from backend.lm.data import collate, encode_examples
    from backend.lm.loss import forward_loss, per_token_ce
    t0 = time.time()
    src = load_source(cfg)
    model, tok = src.model, src.tok
    n_layers = len(decoder_layers(model))
    layers = parse_layers(cfg.layers, n_layers)
    targets = parse_targets(cfg.targets)
    device = next(model.parameters()).device
    encoded = encode_examples(tok, src.examples, cfg.max_len, chat=src.chat)
    n_resp = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in encoded)
    if cfg.loss == "scheme":
        if not src.run_cfg:
            raise ValueError("loss 'scheme' needs `run` (the scheme and its parameters are the run's)")
        from backend.lm.schemes import get_scheme
        scheme, sparams = get_scheme(src.run_cfg["scheme"]), src.run_cfg.get("scheme_params", {})

        def forward(m: torch.nn.Module, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
            out = forward_loss(m, b, scheme, sparams)
            return out.total, out.logits
    else:
        forward = ce_forward(max(n_resp, 1))
    rd.event("loaded", seconds=round(time.time() - t0, 3), samples=len(encoded), layers=len(layers),
             hidden_size=int(model.config.hidden_size) if hasattr(model, "config") else None)

    cols = {n: [] for n in ACTGRAD.names}
    vec = {n: [] for n in ACTGRAD_VECTORS.names}
    tgt = {n: [] for n in ACTGRAD_TARGETS.names}
    smp = {n: [] for n in ACTGRAD_SAMPLES.names}
    skipped = 0
    bar = tqdm(total=len(encoded), desc="actgrad", disable=not progress, unit="sample")
    for start in range(0, len(encoded), cfg.batch_size):
        items = encoded[start:start + cfg.batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(items, tok.pad_token_id).items()}
        lengths = [len(e["input_ids"]) for e in items]
        texts = [[tok.decode([i]) for i in e["input_ids"]] for e in items]
        resp = [[x != -100 for x in e["labels"]] for e in items]
        # where each target lies in each sample (or why it is absent), before the backward reads them
        found: list[tuple[int, str, int]] = []            # (row in batch, target, position)
        for b, e in enumerate(items):
            for t in targets:
                pos, why = find_target(t, texts[b], resp[b])
                sidx = start + b
                tgt["run_id"].append(rd.run_id), tgt["sample_idx"].append(sidx), tgt["target"].append(t.spec)
                tgt["status"].append("found" if pos is not None else "skipped")
                tgt["position"].append(pos), tgt["token"].append(texts[b][pos] if pos is not None else None)
                tgt["reason"].append(why)
                if pos is None:
                    skipped += 1
                else:
                    found.append((b, t.spec, pos))
        norms, vecs, logits = batch_grads(model, batch, layers, [(b, p) for b, _, p in found], forward)
        for layer, vs in vecs.items():
            for (b, spec, p), v in zip(found, vs):
                vec["run_id"].append(rd.run_id), vec["sample_idx"].append(start + b)
                vec["target"].append(spec), vec["layer"].append(layer), vec["position"].append(p)
                vec["token"].append(texts[b][p]), vec["norm"].append(float(np.linalg.norm(v)))
                vec["vector"].append(v)
        with torch.no_grad():
            tl, tm = per_token_ce(logits, batch["labels"])          # (B, T-1) each
            per_sample = ((tl * tm).sum(1) / tm.sum(1).clamp_min(1)).cpu().numpy()
        for b, e in enumerate(items):
            n = lengths[b]
            for layer in layers:
                cols["run_id"] += [rd.run_id] * n
                cols["sample_idx"] += [start + b] * n
                cols["layer"] += [layer] * n
                cols["position"] += list(range(n))
                cols["token_id"] += list(e["input_ids"])
                cols["token"] += texts[b]
                cols["is_response"] += resp[b]
                cols["norm"] += norms[layer][b, :n].tolist()
            ex = src.examples[start + b]
            prompt = ex.prompt if not isinstance(ex, dict) else json.dumps(ex.get("messages") or ex.get("prompt"))
            smp["run_id"].append(rd.run_id), smp["sample_idx"].append(start + b), smp["prompt"].append(str(prompt))
            smp["response"].append(_field(ex, "response")), smp["answer"].append(_field(ex, "answer"))
            smp["loss"].append(float(per_sample[b])), smp["n_tokens"].append(n)
        bar.update(len(items))
        rd.event("progress", step=min(start + cfg.batch_size, len(encoded)), total=len(encoded))
    bar.close()

    rd.write_table("actgrad/norms.parquet", rows_to_table(cols, ACTGRAD))
    rd.write_table("actgrad/vectors.parquet", rows_to_table(vec, ACTGRAD_VECTORS))
    rd.write_table("actgrad/targets.parquet", rows_to_table(tgt, ACTGRAD_TARGETS))
    rd.write_table("actgrad/samples.parquet", rows_to_table(smp, ACTGRAD_SAMPLES))
    if skipped:
        rd.event("skipped", targets=skipped, note="samples whose target pattern is absent: see actgrad_targets")
    rd.finish({"source_run": find_run(cfg.run).name if cfg.run else None, "samples": len(encoded),
               "layers": layers, "n_layers": n_layers, "targets": [t.spec for t in targets],
               "targets_skipped": skipped, "targets_found": len(tgt["status"]) - skipped, "loss": cfg.loss,
               "response_tokens": n_resp, "seconds": round(time.time() - t0, 3)})
    return rd.path
