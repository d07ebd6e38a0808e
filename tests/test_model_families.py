"""Any causal LM family a peft user brings (issue #18): a tiny random-init model of each family, built here from
its config and saved with a word-level tokenizer that has no chat template, trained 2 steps traced in both
modes with ``--lora-targets all-linear``, then verified, ingested, and its per-module keys checked unique.

Also, on every run: the one-time notes (how prompts were joined; the trace's expected cost and the settings
auto chose), and ``verify``'s default token sample against ``--all``.
"""
import json

import pytest
import torch

from backend import index
from backend.jobs.train import TrainConfig
from backend.lm.trainer import train
from backend.store.rundir import read_events
from backend.trace import verify
from tests._tiny_lora import VOCAB, tiny_tokenizer

H, LAYERS, HEADS = 32, 2, 4


def _config(family: str):
    """The family's config class from transformers (None when this version lacks it) at hidden 32, 2 layers."""
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=None, eos_token_id=1)
    kinds = {"qwen2": ("Qwen2Config", {}), "llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {}),
             "qwen3": ("Qwen3Config", {"head_dim": H // HEADS}), "gemma": ("GemmaConfig", {"head_dim": H // HEADS}),
             "gpt2": ("GPT2Config", None)}
    name, extra = kinds[family]
    cls = getattr(transformers, name, None)
    if cls is None:
        return None
    if extra is None:           # GPT-2 names its sizes its own way; its Conv1D layers are what all-linear wraps
        return cls(vocab_size=VOCAB, n_positions=128, n_embd=H, n_layer=LAYERS, n_head=HEADS, pad_token_id=0,
                   bos_token_id=None, eos_token_id=1)
    return cls(**common, **extra)


FAMILIES = ["qwen2", "llama", "qwen3", "mistral", "gemma", "gpt2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Prompt/response records in the tiny tokenizer's words (digits, '+', '=')."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"prompt": f"{a} + {b} =", "response": f"{(a + b) % 10} {(a * b) % 10}"}
            for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _model_dir(tmp_path, family: str) -> str:
    from transformers import AutoModelForCausalLM
    cfg = _config(family)
    if cfg is None:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no config class for {family}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path / family
    model.save_pretrained(out)
    tok = tiny_tokenizer()
    assert not tok.chat_template            # the point: a tokenizer without a chat template
    tok.save_pretrained(out)
    return str(out)


def _notes(run) -> list[str]:
    return [e["message"] for e in read_events(run) if e.get("type") == "note"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_traces_verifies_and_ingests(tmp_path, dataset, family, capsys):
    model = _model_dir(tmp_path, family)
    common = dict(model=model, dataset=dataset, n_eval=0, steps=2, batch_size=4, lr=1e-2, trace_every=1,
                  trace_sequences=2, lora_targets=["all-linear"], lora_r=4, max_len=32, log_every=1,
                  runs_root=str(tmp_path / "runs"), checkpoint_every=0)
    con = index.connect(tmp_path / "index.duckdb")
    try:
        for mode in ("position", "token"):
            run = train(TrainConfig(name=f"{family}-{mode}", trace_mode=mode, **common), progress=False)
            notes = _notes(run)
            assert any("no chat template" in n and "--prompt-template" in n for n in notes), notes
            events = read_events(run)
            cost = [i for i, e in enumerate(events) if e["type"] == "trace_cost"]
            first = min(i for i, e in enumerate(events) if e["type"] == "trace")
            assert len(cost) == 1 and cost[0] < first, events                     # said once, before step 1
            assert events[cost[0]]["message"].startswith("expected cost of a traced step")
            assert f"{mode} mode" in events[cost[0]]["message"]
            assert "expected cost of a traced step" in capsys.readouterr().err
            manifest = json.loads((run / "manifest.json").read_text())
            assert manifest["trace"]["steps"] == [1, 2]
            if mode == "token":     # a tiny model fits the budget with exact magnitudes: auto keeps them
                assert manifest["trace"]["config"]["magnitude"] == "exact"
            # verify: every token, then the default sample (it names its tokens)
            assert verify.main([str(run), "--step", "2", "--all"]) == 0, capsys.readouterr().out
            assert "checked every one of the" in capsys.readouterr().out
            assert verify.main([str(run), "--step", "2", "--sample-tokens", "5", "--seed", "3"]) == 0
            out = capsys.readouterr().out
            assert "checked 5 of" in out and "seed 3" in out and "--all" in out, out
            res = index.ingest_run(con, run)                  # refuses duplicate module labels (ingest check)
            dup = con.execute("""SELECT count(*) - count(DISTINCT (step, sample_idx, position, layer, module, part))
                                 FROM token_modules WHERE run_id = ?""", [res.run_id]).fetchone()[0]
            assert dup == 0
            mods = {m for (m,) in con.execute("SELECT DISTINCT module FROM token_modules WHERE run_id = ?",
                                              [res.run_id]).fetchall()}
            if family == "gpt2":    # attn.c_proj and mlp.c_proj: two modules, two labels
                assert {"attn.c_proj", "mlp.c_proj"} <= mods, mods
            assert len(mods) >= 4, mods
    finally:
        con.close()


@pytest.mark.slow
def test_prompt_template_replaces_the_note_and_masks_the_response(tmp_path, dataset):
    from backend.lm.trainer import build_dataset
    model = _model_dir(tmp_path, "llama")
    cfg = TrainConfig(model=model, dataset=dataset, n_eval=0, steps=1, batch_size=4, max_len=32,
                      prompt_template=r"{prompt}\n{response}", runs_root=str(tmp_path / "runs"))
    tok = tiny_tokenizer()
    ds = build_dataset(cfg, tok)
    assert ds.note is None
    item = ds.encoded[0]
    resp = [lab for lab in item["labels"] if lab != -100]
    assert tok.decode(resp[:-1]) == "0 0" and resp[-1] == tok.eos_token_id       # 0 + 0 = -> "0 0", then EOS
    run = train(cfg, progress=False)
    assert not any("no chat template" in n for n in _notes(run))
