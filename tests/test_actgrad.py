"""Activation gradients (backend.grads, backend.jobs.actgrad, backend.analysis.actgrad).

The hooks' dL/dh_l is checked against torch.autograd.grad through a hand-made forward of the same Qwen2 whose
layer inputs are leaves (float64, padded batch, with and without a LoRA adapter); the target grammar on edge
cases; a small real job end to end (a target absent from every sample is listed as skipped); its analyses.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from backend.grads.actgrad_run import ce_sum_over, layer_grads
from backend.grads.hooks import decoder_layers
from backend.jobs.actgrad import ActgradConfig, Target, find_target, parse_layers, parse_targets


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return Qwen2ForCausalLM(cfg).double().eval()


def padded_batch() -> dict:
    ids = torch.tensor([[3, 7, 9, 11, 5, 8, 2], [4, 6, 10, 12, 0, 0, 0]])
    attn = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 9, 11, 5, 8, 2], [-100, -100, 10, 12, -100, -100, -100]])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def ce64(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the response tokens, in the logits' dtype (float64 here)."""
    tgt = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                           ignore_index=-100, reduction="sum")
    return ce / (tgt != -100).sum()


def reference_grads(causal_lm, batch: dict) -> list[torch.Tensor]:
    """dL/dh_l by hand: every layer's input is a leaf; torch.autograd.grad walks back one layer at a time."""
    from transformers.masking_utils import create_causal_mask
    core = causal_lm.model
    emb = core.embed_tokens(batch["input_ids"])
    pos = torch.arange(emb.shape[1]).unsqueeze(0)
    mask = create_causal_mask(config=core.config, inputs_embeds=emb, attention_mask=batch["attention_mask"],
                              cache=None, position_ids=pos)
    pe = core.rotary_emb(emb, pos)
    leaves, outs, h = [], [], emb
    for layer in core.layers:
        x = h.detach().requires_grad_(True)
        leaves.append(x)
        h = layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        outs.append(h)
    loss = ce64(causal_lm.lm_head(core.norm(h)), batch)                              # logits (B, T, V)
    grads = [None] * len(outs)
    g = torch.autograd.grad(loss, outs[-1])[0]
    for i in range(len(outs) - 1, -1, -1):
        grads[i] = g
        if i > 0:     # the gradient at layer i's input is the gradient at layer i-1's output
            g = torch.autograd.grad(outs[i], leaves[i], grad_outputs=g)[0]
    return grads


@pytest.mark.parametrize("lora", [False, True])
def test_layer_grads_match_autograd_through_leaves(lora):
    model = tiny_qwen2()
    batch = padded_batch()
    if lora:
        from backend.lm.models import apply_lora
        model = apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
        with torch.no_grad():      # peft starts lora_B at 0: make the adapter change the function
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model = model.double().eval()
    n_resp = int((batch["labels"][:, 1:] != -100).sum())
    ours = layer_grads(model, batch, [0, 1, 2], ce64)
    base = model.get_base_model() if lora else model
    ref = reference_grads(base, batch)
    for i in range(3):
        assert ours[i].shape == (2, 7, 32)
        assert torch.allclose(ours[i], ref[i], rtol=1e-9, atol=1e-14), f"layer {i}"
        assert ref[i].abs().max() > 0
    # the job's loss (backend.lm.loss's float32 cross-entropy): the same up to float32 rounding
    job = layer_grads(model, batch, [0, 2], ce_sum_over(n_resp))
    for i in (0, 2):
        assert torch.allclose(job[i], ref[i], rtol=1e-5, atol=1e-7), f"layer {i}"
    # padding after the real tokens carries no gradient (nothing real attends to it)
    assert ours[0][1, 4:].abs().max() == 0
    # no parameter got a .grad: the backward went to activations only
    assert all(p.grad is None for p in model.parameters())


def test_decoder_layers_found_or_named():
    assert len(decoder_layers(tiny_qwen2())) == 3

    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"no `layers` list.*blocks \(1\)"):
        decoder_layers(NoLayers())


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,-1", 4) == [0, 3]
    with pytest.raises(ValueError, match=r"layers \[4\] do not exist.*valid indices 0\.\.3"):
        parse_layers("0,4", 4)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_layers("first", 4)


TEXTS = ["<s>", "f", "(", "1", "2", ",", " 3", ")", " =", " 7", ",", "9"]
RESP = [False] * 9 + [True] * 3


@pytest.mark.parametrize("spec, pos", [
    ("first ,", 5), ("last ,", 10), ("last digit before )", 6), ("first digit after )", 9), ("last digit", 11),
    ("first response", 9), ("index:12", None), ("index:-1", 11), ("index:0", 0), ("first =", 8),
])
def test_find_target(spec, pos):
    (t,) = parse_targets(spec)
    got, why = find_target(t, TEXTS, RESP)
    assert got == pos
    assert (why == "") == (pos is not None)


def test_targets_absent_say_why():
    (t,) = parse_targets("last digit before ]")
    assert find_target(t, TEXTS, RESP) == (None, "no token ']' to look before")
    (t,) = parse_targets("first +")
    assert find_target(t, TEXTS, RESP) == (None, "no '+' token")
    (t,) = parse_targets("first digit before (")          # anchor present, nothing before it matches
    assert find_target(t, TEXTS, RESP) == (None, "no 'digit' token before the first '('")
    assert find_target(Target("index:-13", index=-13), TEXTS, RESP)[0] is None


@pytest.mark.parametrize("bad", ["middle ,", "first", "index:x", "first a b", "first before )", "", "first ,|first ,"])
def test_bad_targets_are_errors(bad):
    with pytest.raises(ValueError, match="targets"):
        parse_targets(bad)


def test_config_checks():
    assert ActgradConfig().model == ""            # the embedded default model, no adapter
    with pytest.raises(ValueError, match="not both"):
        ActgradConfig(run="x", model="default")
    with pytest.raises(ValueError, match="targets"):
        ActgradConfig(model="default", targets="middle x")
    with pytest.raises(ValueError, match="layers"):
        ActgradConfig(model="default", layers="a,b")


def test_job_end_to_end_and_analyses(tmp_path):
    """A small real job on the shipped tiny-modadd model; its tables, the skipped target, ingest, analyses."""
    from backend import index
    from backend.analysis import analyses
    from backend.grads.actgrad_run import run
    from backend.store import paths
    cfg = ActgradConfig(model="tiny-modadd", task="modadd", samples=5, batch_size=2, layers="0,-1",
                        targets="first =|first ,|index:1", runs_root=str(tmp_path / "runs"), run_id="ag")
    path = run(cfg, progress=False)
    norms = pd.read_parquet(path / "actgrad" / "norms.parquet")
    tg = pd.read_parquet(path / "actgrad" / "targets.parquet")
    vec = pd.read_parquet(path / "actgrad" / "vectors.parquet")
    import json
    n_layers = json.loads((paths.MODADD_MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    assert sorted(norms["layer"].unique()) == [0, n_layers - 1]
    assert norms["sample_idx"].nunique() == 5 and (norms["norm"] >= 0).all()
    skipped = tg[tg["status"] == "skipped"]
    assert list(skipped["target"].unique()) == ["first ,"] and len(skipped) == 5      # listed, one per sample
    assert (skipped["reason"] == "no ',' token").all()
    found = tg[tg["status"] == "found"]
    assert len(found) == 10 and (found[found["target"] == "first ="]["token"] == "=").all()
    assert len(vec) == 10 * 2 and all(len(v) == len(vec["vector"].iloc[0]) for v in vec["vector"])
    # the stored vector at a target is the norm's vector: same number from both tables
    row = vec.iloc[0]
    n = norms[(norms.sample_idx == row.sample_idx) & (norms.layer == row.layer) & (norms.position == row.position)]
    assert float(n["norm"].iloc[0]) == pytest.approx(float(row["norm"]), rel=1e-5)

    con = index.connect(tmp_path / "idx.duckdb")
    try:
        index.ingest_run(con, path)
        res = analyses.run_all("ag", con=con)
        assert list(res) == ["actgrad_heatmap", "actgrad_layer_norms", "actgrad_pca"]
        cells = res["actgrad_heatmap"]["cells"]
        assert set(cells["label"]) >= {"=", "+", "X", "XX"} or set(cells["label"]) >= {"=", "+"}
        assert set(res["actgrad_pca"]["points"]["layer"]) == {0, n_layers - 1}
        for name, frames in res.items():
            assert analyses.get(name).figure(frames).data, name
        from backend.analysis.actgrad import heatmap_frames, pca_frames
        one = heatmap_frames(con, "ag", sample=1)["cells"]
        assert len(one) == 2 * norms[norms.sample_idx == 1].position.nunique()
        with pytest.raises(ValueError, match="sample 9 is not in"):
            heatmap_frames(con, "ag", sample=9)
        with pytest.raises(ValueError, match="has no vectors"):
            pca_frames(con, "ag", target="first ,")
    finally:
        con.close()


def test_resolve_run_by_path_or_id(tmp_path, monkeypatch):
    from backend.store.rundir import find_run as resolve_run
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert resolve_run(str(run)) == run                    # a path
    assert resolve_run("runs/r1") == run                   # relative to the data root (the Launch form's root)
    assert resolve_run("r1") == run                        # a run id
    with pytest.raises(ValueError, match="'r2' is not a run directory"):
        resolve_run("r2")


@pytest.mark.slow
def test_scheme_loss_and_a_traced_steps_adapter(tmp_path):
    """From a shipped traced run: the adapter of a traced step, its scheme's loss; a step it did not save is an
    error listing those it did."""
    from backend.grads.actgrad_run import run
    from backend.store import paths
    base = dict(run=str(paths.SHIPPED_DATA / "runs" / "demo-antiop-position"), samples=2, layers="-1", targets="last =", runs_root=str(tmp_path))
    path = run(ActgradConfig(adapter_step=20, loss="scheme", run_id="sch", **base), progress=False)
    import json
    m = json.loads((path / "manifest.json").read_text())
    assert m["loss"] == "scheme" and m["source_run"] == "demo-antiop-position" and m["targets_found"] == 2
    with pytest.raises(ValueError, match=r"no adapter at step 7; saved steps: \[20, 40"):
        run(ActgradConfig(adapter_step=7, run_id="bad", **base), progress=False)


def test_held_out_samples_beyond_the_runs_eval_split_are_refused():
    """The task draws a split's eval examples first, then its training ones: with a run's task, seed and parameters,
    eval example n_eval + 1 is the run's first training example, so asking for it as held out is an error."""
    from backend.lm.tasks import check_held_out, get_task
    run_cfg = {"task": "arith", "data_seed": 3, "task_params": {}, "n_eval": 5, "n_train": 7}
    train, _ = get_task("arith").generate(3, 7, 5)
    _, more = get_task("arith").generate(3, 0, 6)
    assert more[5] == train[0]                                       # the claim the check rests on
    check_held_out(5, run_cfg, "arith", 3, {}, "samples")           # the run's own eval split: fine
    with pytest.raises(ValueError, match=r"samples=6 asks for more held-out examples than the run kept \(5"):
        check_held_out(6, run_cfg, "arith", 3, {}, "samples")
    check_held_out(6, run_cfg, "arith", 4, {}, "samples")           # another seed: other data
    check_held_out(6, run_cfg, "modadd", 3, {}, "samples")          # another task
    check_held_out(6, {**run_cfg, "dataset": "d.jsonl"}, "arith", 3, {}, "samples")
    check_held_out(6, {}, "arith", 3, {}, "samples")                # no run


def test_actgrad_refuses_more_eval_samples_than_the_run_held_out():
    from backend.grads.actgrad_run import load_source
    from backend.store import paths
    run = paths.SHIPPED_DATA / "runs" / "demo-sft-position"       # n_eval 100
    with pytest.raises(ValueError, match=r"samples=101 .* \(100, its n_eval\)"):
        load_source(ActgradConfig(run=str(run), samples=101))
