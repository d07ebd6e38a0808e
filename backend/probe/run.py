"""The ``probe`` job (backend.jobs.probe has the config and tables): sample, judge, bucket, pick, differentiate.

    from backend.jobs.probe import ProbeConfig
    from backend.probe.run import probe
    run_dir = probe(ProbeConfig(adapter="demo-sft-position", num_prompts=16, num_samples=4))

Per model (the base; then the base with the adapter merged, "trained"): for each prompt of this shard, one
``generate`` call samples ``num_samples`` rollouts at once (seeded by (seed, model, prompt): which shard runs
a prompt does not change its rollouts); each rollout is judged with the task's checker; each generated token
gets H = entropy of softmax(z / temperature) in float32 from the sampling logits. Unsharded, the global
entropy buckets are cut and the picked positions differentiated (one forward per rollout,
backend.probe.grads). A shard cannot know the global buckets, so it differentiates every generated position
and ``probe-merge`` keeps the picked ones.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from backend.jobs.probe import ProbeConfig, parse_shard, shard_prompts
from backend.lm.data import prompt_ids, record_prompt, render_prompt
from backend.lm.models import load_model_and_tokenizer
from backend.lm.tasks import Example, check_held_out, get_task
from backend.probe.grads import Site, resolve_site, row_gradients
from backend.probe.output import write_probe
from backend.probe.select import MODEL_CODES, rebucket
from backend.store import paths
from backend.store.rundir import RunDir


def resolve_adapter(adapter: str) -> Path:
    """The adapter directory of a train run given by its directory or run id (or an adapter directory)."""
    p = Path(adapter).expanduser()
    candidates = [p, p / "adapter"] if p.exists() else [paths.runs_dir() / adapter / "adapter"]
    for c in candidates:
        if (c / "adapter_config.json").is_file():
            return c
    raise FileNotFoundError(f"adapter {adapter!r}: no adapter_config.json in {', '.join(map(str, candidates))}; "
                            "give a train run's directory or run id (under the runs root), or an adapter directory")


def adapter_run_config(adapter_dir: Path) -> dict:
    """The config of the train run an adapter directory belongs to (``<run>/adapter``), {} for a bare adapter."""
    cfg_file = adapter_dir.parent / "config.json"
    if adapter_dir.name != "adapter" or not cfg_file.is_file():
        return {}
    from backend.store.rundir import read_config
    return read_config(cfg_file)


def _model_key(name: str) -> str:
    """A model name compared by what it loads: an embedded name or a local path as its resolved folder."""
    from backend.lm.models import NAMED_MODELS
    if name in NAMED_MODELS:
        return str(Path(NAMED_MODELS[name]).resolve())
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def check_adapter_run(cfg: ProbeConfig, run_cfg: dict) -> None:
    """Refuse probing a train run's adapter on another base model (peft would load it with missing keys and a
    warning only), or on more "held-out" prompts than the run kept (the rest are its training prompts)."""
    if not run_cfg:
        return
    trained_on = run_cfg.get("model", "default")
    if _model_key(trained_on) != _model_key(cfg.model):
        raise ValueError(f"adapter {cfg.adapter!r} was trained on model {trained_on!r}, not {cfg.model!r}: pass "
                         f"--model {trained_on}")
    check_held_out(cfg.num_prompts, run_cfg, cfg.task, cfg.data_seed, cfg.task_params, "num_prompts")


def load(cfg: ProbeConfig, which: str) -> tuple[Any, Any]:
    """The model to probe ("base", or "trained": the adapter merged into the base weights, so its W is the
    effective weight W0 + BA and d log p / dW is the same as in the adapted model), frozen, in eval mode."""
    model, tok = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                          trust_remote_code=cfg.trust_remote_code)
    if which == "trained":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(resolve_adapter(cfg.adapter))).merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    return model, tok


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H = -sum p log p, p = softmax(logits / temperature), in float32, over the last dim."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def sample(model: Any, tok: Any, cfg: ProbeConfig, which: str, prompt_idx: int, ex: Example
           ) -> tuple[list[int], list[dict], list[dict]]:
    """Sample the rollouts of one prompt: (prompt ids, rollout records, token records)."""
    task = get_task(cfg.task)
    pids = prompt_ids(tok, record_prompt(ex), cfg.chat_template)
    dev = next(model.parameters()).device
    input_ids = torch.tensor([pids] * cfg.num_samples, device=dev)                # (S, P)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((cfg.seed * 1_000_003 + prompt_idx) * 2 + MODEL_CODES[which])
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                             temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
    gen = out.sequences[:, len(pids):].tolist()                                    # (S, new)
    H = entropy(torch.stack(out.logits, dim=1), cfg.temperature).cpu().numpy()    # (S, new) float32
    rollouts, tokens = [], []
    for s, row in enumerate(gen):
        n = row.index(eos) + 1 if eos in row else len(row)                        # EOS is a sampled token too
        row = row[:n]
        text = tok.decode([t for t in row if t != eos], skip_special_tokens=True)
        rollouts.append({"model": which, "prompt_idx": prompt_idx, "sample_idx": s,
                         "prompt": render_prompt(tok, record_prompt(ex), cfg.chat_template), "text": text,
                         "answer": ex.answer, "extracted": task.extract_answer(text),
                         "correct": task.is_correct(text, ex.answer), "n_tokens": n,
                         "mean_entropy": float(H[s, :n].mean()), "ids": pids + row})
        tokens += [{"model": which, "prompt_idx": prompt_idx, "sample_idx": s, "position": j, "token_id": t,
                    "token": tok.decode([t]), "entropy": float(H[s, j])} for j, t in enumerate(row)]
    return pids, rollouts, tokens


def differentiate(model: Any, site: Site, rollouts: list[dict], tokens: pd.DataFrame, want: np.ndarray,
                  cfg: ProbeConfig, rd: RunDir, done: int, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectors of the tokens where ``want``: (vectors (M, d), log p (M,), src_idx per token (-1: none))."""
    src = np.full(len(tokens), -1, dtype=np.int64)
    vecs, logps = [], []
    groups = tokens.groupby(["prompt_idx", "sample_idx"], sort=False).indices
    m = 0
    for r in rollouts:
        idx = groups[(r["prompt_idx"], r["sample_idx"])]
        idx = idx[want[idx]]
        if not len(idx):
            continue
        P = len(r["ids"]) - r["n_tokens"]
        positions = torch.as_tensor(P - 1 + tokens["position"].to_numpy()[idx])   # predicting generated tokens
        v, lp = row_gradients(model, site, torch.tensor(r["ids"]), positions, cfg.temperature, cfg.grad_chunk)
        vecs.append(v.numpy())
        logps.append(lp.numpy())
        src[idx] = np.arange(m, m + len(idx))
        m += len(idx)
        done += 1
        rd.event("progress", stage=f"gradients ({r['model']})", step=done, total=total)
    d = site.row_dim
    return (np.concatenate(vecs) if vecs else np.zeros((0, d), np.float32),
            np.concatenate(logps) if logps else np.zeros(0, np.float32), src)


def probe(cfg: ProbeConfig, progress: bool = True) -> Path:
    """Run the probe job; returns its run directory (module docstring)."""
    t0 = time.perf_counter()
    _, n_shards = parse_shard(cfg.shard)
    task = get_task(cfg.task)
    _, examples = task.generate(cfg.data_seed, 0, cfg.num_prompts, **cfg.task_params)
    mine = shard_prompts(cfg.num_prompts, cfg.shard)
    which_models = ["base"] + (["trained"] if cfg.adapter else [])
    if cfg.adapter:                                       # fail before any work
        check_adapter_run(cfg, adapter_run_config(resolve_adapter(cfg.adapter)))
    model, tok = load(cfg, "base")
    site = resolve_site(model, cfg.layer, cfg.param, cfg.row)      # bad layer/param/row: before the run exists
    rd = RunDir.create(kind="probe", name=cfg.name, config=cfg.to_dict(),
                       root=Path(cfg.runs_root) if cfg.runs_root else None, run_id=cfg.run_id or None)
    try:
        all_tokens, all_rollouts, vec_parts, logp_parts, src_parts, offset = [], [], [], [], [], 0
        n_done, n_total = 0, len(which_models) * len(mine) * cfg.num_samples
        for which in which_models:
            if which != "base":
                model, tok = load(cfg, which)
                site = resolve_site(model, cfg.layer, cfg.param, cfg.row)
            rollouts, toks = [], []
            for k, p in enumerate(mine):
                _, r, t = sample(model, tok, cfg, which, p, examples[p])
                rollouts += r
                toks += t
                rd.event("progress", stage=f"sampling ({which})", step=k + 1, total=len(mine))
            tokens = pd.DataFrame(toks)
            if n_shards == 1:         # the whole probe: global buckets now, gradients of the picks only
                tokens, _ = rebucket(tokens, cfg.n_buckets, cfg.per_bucket, cfg.seed)
                want = tokens["picked"].to_numpy()
            else:                     # a shard: every position (probe-merge picks with the global buckets)
                want = np.ones(len(tokens), dtype=bool)
            v, lp, src = differentiate(model, site, rollouts, tokens, want, cfg, rd, n_done, n_total)
            n_done += len(rollouts)
            src_parts.append(np.where(src >= 0, src + offset, -1))
            offset += len(v)
            vec_parts.append(v)
            logp_parts.append(lp)
            all_tokens.append(tokens)
            all_rollouts += rollouts
        tokens = pd.concat(all_tokens, ignore_index=True).assign(src_idx=np.concatenate(src_parts))
        tokens, bounds = rebucket(tokens.drop(columns=["bucket", "picked"], errors="ignore"),
                                  cfg.n_buckets, cfg.per_bucket, cfg.seed)
        rollouts = pd.DataFrame(all_rollouts).drop(columns="ids")
        seconds = time.perf_counter() - t0
        summary = write_probe(rd, tokens, rollouts, np.concatenate(vec_parts), np.concatenate(logp_parts),
                              bounds, cfg.n_buckets, keep="picked" if n_shards == 1 else "all")
        rd.finish({**summary, "site": site.name, "row": site.row, "layer": site.layer, "grad_path": site.path,
                   "shard": cfg.shard,
                   "buckets": "global" if n_shards == 1 else f"local to shard {cfg.shard} (probe-merge re-buckets)",
                   "seconds": round(seconds, 3)})
    except BaseException as e:
        rd.fail(e)
        raise
    return rd.path
