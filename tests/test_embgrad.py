"""Embedding token gradients (backend.grads.embgrad, backend.analysis.embgrad_metrics, the train option).

n_v from the hook at the embedding output is checked against the row norms of E.grad from autograd on an
unfrozen, untied embedding (one batch, and two micro-batches accumulated); the same numbers come out when the
embedding is frozen; the metrics against values worked out by hand; a short real modadd run end to end.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from backend.analysis import embgrad_metrics as em
from backend.grads.embgrad import EmbeddingGradHook


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      attn_implementation="eager")
    return Qwen2ForCausalLM(cfg).double().eval()


BATCHES = [torch.tensor([[3, 7, 3, 11, 5, 3], [4, 7, 10, 12, 4, 1]]), torch.tensor([[9, 3, 3, 2, 2, 8]])]


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits                                             # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("n_micro", [1, 2])
def test_hook_norms_match_embedding_grad(n_micro):
    batches = BATCHES[:n_micro]
    ref_model = tiny_qwen2()
    for b in batches:              # reference: E.grad of the unfrozen embedding, micro-batch losses / n_micro
        (loss_of(ref_model, b) / n_micro).backward()
    ref = ref_model.model.embed_tokens.weight.grad.norm(dim=-1).numpy()             # (V,)

    for frozen in (False, True):
        model = tiny_qwen2()
        if frozen:
            for p in model.parameters():
                p.requires_grad_(False)
            model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)   # something trainable, as LoRA
        hook = EmbeddingGradHook(model)
        hook.armed = True
        for b in batches:
            (loss_of(model, b) / n_micro).backward()
        hook.close()
        n = hook.sums.norms(hook.vocab_size)
        np.testing.assert_allclose(n, ref, rtol=1e-9, atol=1e-15)
        seen = sorted({int(i) for b in batches for i in b.flatten()})
        assert hook.sums.ids.tolist() == seen
        assert hook.sums.counts.tolist() == [int(sum((b == i).sum() for b in batches)) for i in seen]
        assert n[[v for v in range(30) if v not in seen]].max() == 0
        if frozen:
            assert model.model.embed_tokens.weight.grad is None


def test_hook_disarmed_and_no_grad_record_nothing():
    model = tiny_qwen2()
    hook = EmbeddingGradHook(model)
    loss_of(model, BATCHES[0]).backward()              # not armed
    hook.armed = True
    with torch.no_grad():
        loss_of(model, BATCHES[0])                      # generation-like pass
    hook.close()
    assert hook.sums.ids is None


def test_metrics_by_hand():
    n = [0.0, 0.0, 3.0, 4.0, 0.02]
    assert em.gradient_sparsity(n) == pytest.approx(3 / 5)              # 0, 0, 0.02 < 0.04
    # sorted 0, 0, 0.02, 3, 4: 2 (3*0.02 + 4*3 + 5*4) / (5 * 7.02) - 6/5
    assert em.step_metrics(n)["gradient_gini"] == pytest.approx(2 * 32.06 / 35.1 - 1.2)
    assert em.tokens_for_energy(n, 0.5) == 1                           # 16 of 25.0004
    assert em.tokens_for_energy(n, 0.9) == 2                           # 25 of 25.0004
    assert em.tokens_for_energy(n, 1.0) == 3
    assert em.concentration_ratio(n) == pytest.approx(1 / 3)          # 3 tokens with gradient
    assert em.tokens_for_energy([1, 1, 1, 1], 0.5) == 2               # an exact tie is reached
    nums = [1, 2, 3, 4, 5, 6, 7]       # groups {0,3,6}: 4, {1,4}: 3.5, {2,5}: 4.5
    np.testing.assert_allclose(em.stride_groups(nums, 3), [4.0, 3.5, 4.5])
    assert em.stride_group_variance(nums, 3) == pytest.approx(0.5 / 3)
    assert em.stride_group_max_ratio(nums, 3) == pytest.approx(4.5 / 3.5)
    assert em.stride_group_max_ratio([0, 1, 0, 1], 2) == math.inf
    zero = em.step_metrics([0.0, 0.0])
    assert zero["gradient_sparsity"] == 1.0 and math.isnan(zero["gradient_gini"])
    with pytest.raises(ValueError, match="stride 9 must be in 1..7"):
        em.stride_groups(nums, 9)
    with pytest.raises(ValueError, match="non-negative"):
        em.gradient_sparsity([1.0, -1.0])


def test_config_checks():
    from backend.jobs.train import TrainConfig
    with pytest.raises(ValueError, match="needs embgrad_every"):
        TrainConfig(task="modadd", embgrad_stride=7)
    with pytest.raises(ValueError, match="modadd"):
        TrainConfig(task="arith", embgrad_every=5, embgrad_stride=7)
    assert TrainConfig(task="arith", embgrad_every=5).embgrad_every == 5


def test_train_records_embgrad(tmp_path):
    """A short real modadd run: shards at the recorded steps, metrics, the manifest, ingest, the panel's reads."""
    from backend import index
    from backend.analysis import embgrad
    from backend.jobs.train import TrainConfig
    from backend.lm.trainer import train
    cfg = TrainConfig(model="tiny-modadd", task="modadd", n_train=64, n_eval=0, steps=4, batch_size=8,
                      embgrad_every=2, embgrad_stride=7, checkpoint_every=0, runs_root=str(tmp_path), run_id="eg")
    path = train(cfg, progress=False)
    steps = pd.read_parquet(path / "embgrad_steps")
    assert steps["step"].tolist() == [2, 4] and (steps["stride"] == 7).all()
    toks = pd.read_parquet(path / "embgrad")
    assert set(toks["step"]) == {2, 4} and (toks["norm"] > 0).all()
    assert "=" in set(toks["token"]) and (toks.groupby("step")["count"].sum() >= 8 * 5).all()
    for s, g in toks.groupby("step"):       # the stored metrics are those of the stored norms (+ zeros)
        n = np.zeros(int(steps["n_vocab"].iloc[0]))
        n[g["token_id"].to_numpy()] = g["norm"].to_numpy()
        row = steps[steps.step == s].iloc[0]
        assert row["tokens_for_50pct"] == em.tokens_for_energy(n, 0.5)
        assert row["n_with_grad"] == len(g)
    import json
    assert json.loads((path / "manifest.json").read_text())["embgrad"]["steps"] == 2
    con = index.connect(tmp_path / "idx.duckdb")
    try:
        index.ingest_run(con, path)
        assert embgrad.embgrad_steps("eg", con)["step"].tolist() == [2, 4]
        top = embgrad.top_tokens("eg", 4, k=5, con=con)
        assert len(top) == 5 and top["norm"].is_monotonic_decreasing
        assert embgrad.metrics_figure(embgrad.embgrad_steps("eg", con)).data
        assert embgrad.top_tokens_figure(top, 4).data
        with pytest.raises(ValueError, match="recorded steps: 2, 4"):
            embgrad.top_tokens("eg", 3, con=con)
    finally:
        con.close()


def test_token_texts_decode_each_id_once():
    from backend.grads.embgrad import EmbGradRecorder

    class CountingTok:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def decode(self, ids: list[int]) -> str:
            self.calls.append(ids)
            return f"<{ids[0]}>"

    tok = CountingTok()
    rec = EmbGradRecorder(0, 0, torch.nn.Linear(1, 1), tok, None, True, None)   # every=0: no hook, no writes
    assert rec.token_texts(np.array([5, 3, 5])) == ["<5>", "<3>", "<5>"]
    assert rec.token_texts(np.array([3, 9])) == ["<3>", "<9>"]
    assert tok.calls == [[5], [3], [9]]          # one decode per distinct id over the run
