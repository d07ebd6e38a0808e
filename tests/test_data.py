"""Data: record loading and its errors, encoding (masking, EOS, chat rendering, truncation), collate."""
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from backend.lm.data import (
    IGNORE_INDEX,
    TaskDataset,
    TruncationWarning,
    collate,
    encode,
    encode_examples,
    has_chat_template,
    load_examples,
    render_prompt,
)
from backend.lm.tasks import get_task
from backend.store import paths


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(paths.DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def modadd_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(paths.MODADD_MODEL_DIR)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- encoding

def test_encode_masks_prompt_and_labels_response_with_eos(tok):
    prompt, response = "Tom has 3 apples. How many apples does Tom have now?", "Step 1: 3 + 0 = 3\n#### 3"
    item = encode(tok, prompt, response, max_len=256)
    rendered = "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"   # by hand
    p_ids, r_ids = _ids(tok, rendered), _ids(tok, response) + [tok.eos_token_id]
    assert tok.eos_token == "<|im_end|>"
    assert item["input_ids"] == p_ids + r_ids
    assert item["labels"] == [IGNORE_INDEX] * len(p_ids) + r_ids
    assert item["labels"][-1] == tok.eos_token_id


def test_plain_prompt_when_chat_is_off_or_no_template(tok, modadd_tok):
    item = encode(tok, "2 + 2 =", " 4", max_len=64, chat=False)
    assert item["input_ids"][:len(_ids(tok, "2 + 2 ="))] == _ids(tok, "2 + 2 =")
    assert render_prompt(modadd_tok, "2 + 2 =") == "2 + 2 ="       # the modadd tokenizer has no template
    item = encode(modadd_tok, "2 + 2 =", " 4", max_len=16)
    four, eos = _ids(modadd_tok, "4")[0], modadd_tok.eos_token_id
    assert item["input_ids"][4:] == [four, eos] and item["labels"] == [IGNORE_INDEX] * 4 + [four, eos]


def test_messages_render_all_but_last_with_the_template(tok, tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 3 apples."},
        {"role": "assistant", "content": "#### 3"}], "answer": 3}])
    [rec] = load_examples(path)
    assert rec["response"] == "#### 3" and rec["answer"] == "3" and len(rec["messages"]) == 2
    item = TaskDataset.from_examples(tok, [rec], max_len=128)[0]
    rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTom has 3 apples.<|im_end|>\n"
                "<|im_start|>assistant\n")
    n = len(_ids(tok, rendered))
    assert item["input_ids"][:n] == _ids(tok, rendered)
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert item["labels"][n:] == _ids(tok, "#### 3") + [tok.eos_token_id]
    assert item["sample_idx"] == 0


def test_truncation_keeps_a_response_token_or_raises(tok):
    full = encode(tok, "Tom has 3 apples.", "#### 3", max_len=256)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    with pytest.warns(TruncationWarning, match=r"1 of 1 example\(s\) were cut to max_len=\d+"):
        cut = encode(tok, "Tom has 3 apples.", "#### 3", max_len=n_prompt + 1)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 1]
    assert cut["labels"][-1] != IGNORE_INDEX
    with pytest.raises(ValueError, match="max_len"):
        encode(tok, "Tom has 3 apples.", "#### 3", max_len=n_prompt)


def test_long_responses_are_cut_with_one_warning_per_dataset(tok):
    examples = [{"prompt": "Tom has 3 apples.", "response": "#### 3"},
                {"prompt": "Tom has 3 apples.", "response": "Step 1: 3 + 4 = 7\nStep 2: 7 + 5 = 12\n#### 12"},
                {"prompt": "Ann has 2 pears.", "response": "Step 1: " + " + ".join("1" * 30) + "\n#### 30"},
                {"prompt": "Ann has 2 pears.", "response": "#### 2"}]
    # the full lengths by hand: the templated prompt, the response, EOS
    by_hand = [_ids(tok, "<|im_start|>user\n" + e["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")
               + _ids(tok, e["response"]) + [tok.eos_token_id] for e in examples]
    full = [len(ids) for ids in by_hand]
    max_len = max(full[0], full[3]) + 2        # room for the short responses, not the two long ones
    cut = [i for i, n in enumerate(full) if n > max_len]
    assert cut == [1, 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = encode_examples(tok, examples, max_len=max_len)
    mine = [w for w in caught if issubclass(w.category, TruncationWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]               # once for the dataset
    assert str(mine[0].message).startswith(f"2 of 4 example(s) were cut to max_len={max_len} tokens")
    assert "example(s) 1, 2)" in str(mine[0].message) and f"the longest needs {max(full)} tokens" in str(mine[0].message)
    assert [it["input_ids"] for it in items] == [ids[:max_len] for ids in by_hand]
    for i in cut:                                                       # cut from the right: EOS is gone
        assert items[i]["labels"][-1] != tok.eos_token_id and items[i]["labels"][-1] != IGNORE_INDEX
    for i in (0, 3):
        assert items[i]["labels"][-1] == tok.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # nothing cut: no warning
        encode_examples(tok, examples, max_len=max(full))


def test_a_prompt_with_no_room_names_the_example(tok):
    examples = [{"prompt": "a", "response": "b"}, {"prompt": "Tom has " + "3 " * 100 + "apples.", "response": "b"}]
    with pytest.raises(ValueError, match=r"example 1: the prompt is \d+ tokens long, which leaves no room"):
        encode_examples(tok, examples, max_len=64)


def test_collate_right_pads(tok):
    items = encode_examples(tok, get_task("arith").generate(0, 3, 0)[0], max_len=256)
    batch = collate(items, pad_id=tok.pad_token_id)
    T = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == it["input_ids"]
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
    assert batch["sample_idx"].tolist() == [0, 1, 2] and batch["input_ids"].dtype == torch.long


def test_task_dataset_keeps_sample_idx(tok):
    ds = TaskDataset.from_task(tok, "arith", seed=0, n_train=5, n_eval=2, max_len=256, split="eval")
    assert len(ds) == 2 and [ds[i]["sample_idx"] for i in range(2)] == [0, 1]
    assert ds.examples == get_task("arith").generate(0, 5, 2)[1]


def test_shipped_tokenizers_load_as_built(tok, modadd_tok):
    assert _ids(tok, "Step 1: 128") == _ids(tok, "Step") + _ids(tok, " ") + _ids(tok, "1") + _ids(tok, ":") + \
        _ids(tok, " ") + [_ids(tok, d)[0] for d in "128"]           # digits one token each, as in Qwen2
    assert len(_ids(tok, "<|im_start|>")) == 1 and tok.pad_token == "<|endoftext|>"
    assert tok.decode(_ids(tok, "Tom has 12 apples.\n#### 12")) == "Tom has 12 apples.\n#### 12"
    assert not has_chat_template(modadd_tok) and modadd_tok.eos_token_id is not None


def test_modadd_numbers_are_single_tokens(modadd_tok):
    for n in range(97):
        assert len(_ids(modadd_tok, str(n))) == 1
        assert _ids(modadd_tok, f" {n}") == _ids(modadd_tok, str(n))
    train, _ = get_task("modadd").generate(0, 50, 0)
    for e in train:
        item = encode(modadd_tok, e.prompt, e.response, max_len=16)
        assert len(item["input_ids"]) == 6 and item["labels"][4] == _ids(modadd_tok, e.answer)[0]


# ---------------------------------------------------------------------------------------------- loading

def test_load_jsonl_and_parquet(tmp_path):
    recs = [{"prompt": "a", "response": "b", "answer": None}, {"prompt": "c", "response": "d", "answer": "7"}]
    j = _write_jsonl(tmp_path / "x.jsonl", recs[:1] + [""] + recs[1:])        # blank lines are skipped
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "x.parquet")
    for path in (j, tmp_path / "x.parquet"):
        out = load_examples(path)
        assert [(r["prompt"], r["response"], r["answer"]) for r in out] == [("a", "b", ""), ("c", "d", "7")]


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "a"', "invalid JSON"),
    ('{"prompt": "a"}', "'response'"),
    ('{"response": "a"}', "'prompt'"),
    ('{"prompt": 3, "response": "a"}', "'prompt' must be a string"),
    ('{"prompt": "a", "response": "  "}', "'response' is empty"),
    ('[1, 2]', "JSON object"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "'messages'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "messages\\[1\\].role"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
     "messages\\[1\\].content"),
    ('{"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "messages\\[0\\].role.*allowed"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl: line 2: .*{field}"):
        load_examples(path)


def test_parquet_errors_name_the_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 2: missing field 'response'"):
        load_examples(tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet"):
        load_examples(tmp_path / "junk.parquet")


@pytest.mark.parametrize("content,where", [
    (b"\x1f\x8b\x08\x00\xde\xad\xbe\xef\x00\x03", "line 1: not UTF-8 text"),       # a gzip file named .jsonl
    ('{"prompt": "caf\u00e9", "response": "b"}\n'.encode("latin-1"), "line 1: not UTF-8 text \\(byte 0xe9 at byte 16"),
    (b'{"prompt": "a", "response": "b"}\n\n{"prompt": "\xff", "response": "b"}\n', "line 3: not UTF-8 text"),
    (b'{"prompt": "a", "response": "b"}\n\x00\x00\x00\n', "line 2: binary data \\(a NUL byte at column 1\\)"),
])
def test_binary_or_non_utf8_jsonl_names_file_and_line(tmp_path, content, where):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"data\.jsonl: {where}"):
        load_examples(path)


def test_utf8_jsonl_with_a_bom_loads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "caf\u00e9", "response": "\u2603"}).encode() + b"\n")
    assert [(r["prompt"], r["response"]) for r in load_examples(path)] == [("caf\u00e9", "\u2603")]


def test_parquet_with_non_utf8_strings_names_row_and_field(tmp_path):
    raw = pa.array([b"ok", b"fine", b"\xff\xfe bad"], pa.binary())
    bad = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())      # a string column holding non-UTF-8 bytes
    pq.write_table(pa.table({"prompt": pa.array(["a", "b", "c"]), "response": bad}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 3: field 'response' is not UTF-8 text"):
        load_examples(tmp_path / "bad.parquet")


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'.*\.jsonl.*\.parquet"):
        load_examples(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: the file holds no records"):
        load_examples(tmp_path / "empty.jsonl")
