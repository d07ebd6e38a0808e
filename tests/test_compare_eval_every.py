"""Accuracy at intermediate checkpoints (``--eval-every N``, backend.lm.eval_steps) in scheme comparisons:
which steps are evaluated, the per-step accuracies a comparison and the Schemes tab compute from eval records
(hand-computed), and (slow) a tiny comparison whose step-2 records equal an independent evaluation of each
child's step-2 checkpoint, with training left bit-identical by the evaluations.

    pytest tests/test_compare_eval_every.py            # fast: a few seconds
    pytest tests/test_compare_eval_every.py -m slow    # the tiny comparison: a minute or two
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from backend.jobs import compare_schemes_run as csr
from backend.jobs.compare_schemes import CompareSchemesConfig, plan
from backend.jobs.train import TrainConfig
from backend.lm import eval_steps
from backend.store import schema
from backend.store.rundir import RunDir, rows_to_table

ROOT = Path(__file__).resolve().parents[1]


def test_eval_every_steps_and_validation():
    ev = eval_steps.StepEvaluator(every=3, steps=9, rd=None)
    assert [s for s in range(1, 10) if ev.due(s)] == [3, 6]                  # 9 is the final eval's
    assert not any(eval_steps.StepEvaluator(every=0, steps=9, rd=None).due(s) for s in range(1, 10))
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=5, n_eval=0)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)
    cfg = CompareSchemesConfig(schemes=["sft", "topk"], seeds=2, eval_every=5)
    assert {c.eval_every for c in plan(cfg)} == {5}                          # passed to every child


def test_demo_children_keep_their_ids():
    """Fields added to train after the demo was made (eval_every, ...) do not change the ids of runs that do
    not set them: running the shipped comparison again reuses its runs."""
    from backend.jobs.compare_schemes import child_config
    cmp_cfg = json.loads((ROOT / "data/runs/demo-schemes/config.json").read_text())["config"]
    cfg = CompareSchemesConfig.from_dict(cmp_cfg)
    kids = json.loads((ROOT / "data/runs/demo-schemes/children.json").read_text())
    assert sorted(c.run_id for c in plan(cfg)) == sorted(Path(k).name for k in kids)
    assert child_config(cfg, "sft", 0).run_id != child_config(CompareSchemesConfig.from_dict(
        {**cmp_cfg, "eval_every": 20}), "sft", 0).run_id                    # but setting it is another run


def _records(items: list[tuple[int, str]], greedy: list[bool], sampled: list[list[bool]]) -> list[dict]:
    out = [{"sample_idx": i, "sample_k": -1, "prediction": "", "answer": a, "extracted": "", "correct": c}
           for (i, a), c in zip(items, greedy)]
    for (i, a), row in zip(items, sampled):
        out += [{"sample_idx": i, "sample_k": k, "prediction": "", "answer": a, "extracted": "", "correct": c}
                for k, c in enumerate(row)]
    return out


def _child(root: Path, run_id: str, items, final, during: dict[int, tuple]) -> Path:
    rd = RunDir.create("train", run_id, {}, root=root, run_id=run_id)
    cols: dict[str, list] = {f.name: [] for f in schema.EVAL}
    for r in _records(items, *final):
        for k in cols:
            cols[k].append(run_id if k == "run_id" else r[k])
    rd.write_table("eval/rank0.parquet", rows_to_table(cols, schema.EVAL))
    for step, (g, s) in during.items():
        eval_steps.write(rd, step, {"records": _records(items, g, s)})
    rd.stop_heartbeat()
    return rd.path


def test_accuracy_by_step_hand_computed(tmp_path):
    """Two schemes x two seeds, 2 items, eval at step 5 and the last step 10. Greedy accuracy of a seed: its
    correct fraction over items; sampled: over items and k = 2 samples; the scheme's value: the mean over seeds.
    sft step 5: greedy (1/2 + 0/2) / 2 = 0.25, sampled (2/4 + 1/4) / 2 = 0.375; step 10: greedy (2/2 + 1/2) / 2
    = 0.75, sampled (3/4 + 4/4) / 2 = 0.875. topk step 5: greedy (0 + 0) / 2 = 0, sampled (0 + 1/4) / 2 = 0.125."""
    items = [(0, "7"), (1, "12")]
    T, F = True, False
    cells = {
        ("sft", 0): _child(tmp_path, "a0", items, ([T, T], [[T, T], [F, T]]), {5: ([T, F], [[T, F], [F, T]])}),
        ("sft", 1): _child(tmp_path, "a1", items, ([T, F], [[T, T], [T, T]]), {5: ([F, F], [[F, F], [F, T]])}),
        ("topk", 0): _child(tmp_path, "b0", items, ([F, F], [[F, F], [F, F]]), {5: ([F, F], [[F, F], [F, F]])}),
        ("topk", 1): _child(tmp_path, "b1", items, ([T, T], [[T, T], [T, T]]), {5: ([F, F], [[T, F], [F, F]])}),
    }
    got = csr.accuracy_by_step(cells, ["sft", "topk"], [0, 1], steps=10)
    assert got["sft"] == [{"step": 5, "greedy": 0.25, "sampled": 0.375, "n_seeds": 2},
                          {"step": 10, "greedy": 0.75, "sampled": 0.875, "n_seeds": 2}]
    assert got["topk"][0] == {"step": 5, "greedy": 0.0, "sampled": 0.125, "n_seeds": 2}
    assert got["topk"][1]["greedy"] == 0.5
    assert eval_steps.summaries(cells[("sft", 0)]) == [{"step": 5, "accuracy": 0.5, "n": 2, "sampled_accuracy": 0.5}]

    other = _child(tmp_path, "c0", [(0, "7"), (1, "13")], ([T, T], [[T, T], [T, T]]), {5: ([T, T], [[T, T], [T, T]])})
    with pytest.raises(ValueError, match="other items"):
        csr.accuracy_by_step({**cells, ("topk", 1): other}, ["sft", "topk"], [0, 1], steps=10)
    late = _child(tmp_path, "d0", items, ([T, T], [[T, T], [T, T]]), {6: ([T, T], [[T, T], [T, T]])})
    with pytest.raises(ValueError, match="evaluated at steps"):
        csr.accuracy_by_step({**cells, ("topk", 1): late}, ["sft", "topk"], [0, 1], steps=10)


def test_accuracy_curve_points_include_the_intermediate_steps(tmp_path):
    """The Schemes tab's accuracy points: before (if evaluated), every --eval-every step and the last, per seed;
    the figure draws one thin line per seed and a bold mean whose values are the means over seeds."""
    from backend import index
    from backend.analysis import schemes
    from backend.jobs.compare_schemes import COMPARE_RUNS
    root = tmp_path / "runs"
    ids = []
    for seed, accs in ((0, (0.2, 0.4, 0.6)), (1, (0.0, 0.2, 0.8))):
        rd = RunDir.create("train", f"k{seed}", {}, root=root, run_id=f"k{seed}")
        rd.finish({"steps": 6, "eval": {"accuracy": accs[2], "sampled_accuracy": accs[2] / 2, "n": 5},
                   "eval_steps": [{"step": 2, "accuracy": accs[0], "sampled_accuracy": None, "n": 5},
                                  {"step": 4, "accuracy": accs[1], "sampled_accuracy": accs[1] / 2, "n": 5}]})
        ids.append(rd.run_id)
    cfg = CompareSchemesConfig(schemes=["sft", "topk"], seeds=2, eval_every=2)
    cmp = RunDir.create("compare-schemes", "c", cfg.to_dict(), root=root, run_id="cmp")
    cmp.write_table("compare/runs.parquet", rows_to_table({
        "run_id": ["cmp", "cmp"], "child_run_id": ids, "scheme": ["sft", "sft"], "seed": [0, 1],
        "status": ["finished"] * 2, "device": ["", ""], "greedy_accuracy": [0.6, 0.8],
        "sampled_accuracy": [0.3, 0.4], "seconds": [1.0, 1.0]}, COMPARE_RUNS))
    cmp.finish({})
    con = index.connect(index.MEMORY)
    try:
        index.ingest_all(con, root)
        pts = schemes.accuracy_points("cmp", con)
    finally:
        con.close()
    assert pts.sort_values(["seed", "step"])[["seed", "step", "greedy"]].values.tolist() == [
        [0, 2, 0.2], [0, 4, 0.4], [0, 6, 0.6], [1, 2, 0.0], [1, 4, 0.2], [1, 6, 0.8]]
    fig = schemes.accuracy_figure(pts)
    thin = [t for t in fig.data if t.line.width == 1]
    bold = [t for t in fig.data if t.line.width == 3]
    assert len(thin) == 2 and len(bold) == 1
    assert list(bold[0].x) == [2, 4, 6] and list(bold[0].y) == pytest.approx([0.1, 0.3, 0.7])


@pytest.mark.slow
def test_tiny_comparison_evaluates_at_the_steps_like_the_checkpoints(tmp_path, monkeypatch):
    """sft and antiop, one seed, 3 steps, --eval-every 2, a checkpoint at step 2 (checkpoint_every 2; the last
    step has none, so it stays). Every child has eval rows at step 2 only (3 is the final eval), equal record
    for record (predictions, correctness) to evaluating its step-2 checkpoint afresh: the base model, LoRA, the
    checkpoint's weights, the trainer's eval on the same items. The comparison's manifest has the per-step
    accuracies. And evaluating in the loop leaves training as it was: sft trained without --eval-every ends
    with the same weights (sha256) and losses."""
    import torch

    from backend.lm import trainer
    from backend.lm.models import apply_lora, load_model_and_tokenizer
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    tiny = dict(steps=3, n_train=16, n_eval=3, eval_k=2, batch_size=4, eval_max_new_tokens=8, eval_batch_size=8,
                warmup_steps=1, checkpoint_every=2, eval_every=2)
    cfg = CompareSchemesConfig(name="ee", schemes=["sft", "antiop"], seeds=1, runs_root=str(tmp_path / "runs"),
                               **tiny)
    path = csr.run(cfg, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["protocol"]["eval_steps"] == [2, 3]
    for child in plan(cfg):
        run = tmp_path / "runs" / child.run_id
        rows = pq.read_table(run / "eval_steps").to_pandas()
        assert sorted(rows["step"].unique()) == [2]
        assert len(rows) == 3 * (1 + 2)                                       # greedy + 2 samples per item
        m = json.loads((run / "manifest.json").read_text())
        assert [e["step"] for e in m["eval_steps"]] == [2]

        model, tok = load_model_and_tokenizer(child.model, dtype=child.dtype, device="cpu")
        model = apply_lora(model, r=child.lora_r, alpha=child.lora_alpha, dropout=child.lora_dropout,
                           targets=child.lora_targets)
        ckpt = torch.load(run / "checkpoint" / "step_000002.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(ckpt["weights"][n])
        ref = trainer.run_eval(model, tok, child, trainer.build_dataset(child, tok), torch.device("cpu"))
        want = pd.DataFrame(ref["records"]).sort_values(["sample_k", "sample_idx"]).reset_index(drop=True)
        got = rows.sort_values(["sample_k", "sample_idx"]).reset_index(drop=True)
        cols = ["sample_idx", "sample_k", "prediction", "answer", "correct"]
        pd.testing.assert_frame_equal(got[cols], want[cols], check_dtype=False)
        by = {r["step"]: r for r in manifest["accuracy_by_step"][child.scheme]}
        assert by[2]["greedy"] == pytest.approx(ref["accuracy"])
        assert by[2]["sampled"] == pytest.approx(ref["sampled_accuracy"])
        assert by[3]["greedy"] == pytest.approx(m["eval"]["accuracy"])

    sft = plan(cfg)[0]
    plain = TrainConfig.from_dict({**sft.to_dict(), "eval_every": 0, "runs_root": str(tmp_path / "plain"),
                                   "run_id": "plain"})
    p = trainer.train(plain, progress=False)
    with_eval = tmp_path / "runs" / sft.run_id
    digests = [json.loads((d / "manifest.json").read_text())["rank_param_digests"] for d in (p, with_eval)]
    assert digests[0] == digests[1]
    losses = [pq.read_table(d / "train_steps").to_pandas().sort_values("step")["loss"].tolist() for d in (p, with_eval)]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_a_resumed_run_keeps_its_intermediate_evals(tmp_path, monkeypatch):
    """Evaluated every step, stopped at step 3 (before its eval), resumed from the step-2 checkpoint: the run
    lists evals at steps 1, 2, 3 (1 and 2 from before the stop), record for record those of an uninterrupted
    run."""
    from backend.lm.trainer import resume, train
    kw = dict(steps=4, n_train=16, n_eval=2, batch_size=4, eval_max_new_tokens=6, log_every=1, checkpoint_every=2,
              eval_every=1)
    whole = train(TrainConfig(**kw, runs_root=str(tmp_path / "whole")), progress=False)
    real_event = RunDir.event

    def event(self, type_, **fields):
        real_event(self, type_, **fields)
        if type_ == "progress" and fields["step"] == 3:
            raise KeyboardInterrupt("stopped at step 3 by the test")
    monkeypatch.setattr(RunDir, "event", event)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**kw, runs_root=str(tmp_path / "runs"), run_id="stopped"), progress=False)
    monkeypatch.setattr(RunDir, "event", real_event)
    run = tmp_path / "runs" / "stopped"
    assert sorted(eval_steps.records(run)["step"].unique()) == [1, 2]
    resume(run, progress=False)
    cols = ["step", "sample_idx", "sample_k", "prediction", "correct"]
    a, b = (eval_steps.records(p)[cols].sort_values(cols[:3]).reset_index(drop=True) for p in (whole, run))
    pd.testing.assert_frame_equal(a, b)
    assert [e["step"] for e in json.loads((run / "manifest.json").read_text())["eval_steps"]] == [1, 2, 3]
