"""User data and encoding: load prompt/response files, tokenize with the prompt masked, pad into batches.

    from backend.lm.data import load_examples, encode, collate, TaskDataset
    records = load_examples("my_data.jsonl")          # [{"prompt": ..., "response": ..., "answer": ...}, ...]
    item = encode(tok, "What is 2 + 3?", "#### 5", max_len=256)
    item["input_ids"], item["labels"]                  # prompt labels are -100; response ends with EOS
    ds = TaskDataset.from_task(tok, "arith", seed=0, n_train=512, n_eval=128, max_len=256)
    batch = collate([ds[0], ds[1]], pad_id=tok.pad_token_id)   # input_ids, attention_mask, labels: (B, T)

Encoding rules (what every job trains and traces on):

- The prompt is rendered with the tokenizer's chat template (one user message, ``add_generation_prompt=True``)
  when the tokenizer has one and ``chat=True``; otherwise the plain prompt text is used, preceded by the
  tokenizer's BOS token if it has one. A ``messages`` record renders all but its last message with the chat
  template (it needs one).
- ``chat`` may instead be a prompt template (a job's ``--prompt-template``, ``check_prompt_template``), e.g.
  ``"Question: {prompt}\nAnswer: {response}"``: the prompt is then the template's text up to ``{response}``
  with ``{prompt}`` filled in (after BOS, as a plain prompt), used instead of any chat template. It must end
  with ``{response}``, so the labelled tokens are still exactly the response's (and EOS).
- A ``prompt``/``response`` dataset asked to use the chat template (``chat=True``) on a tokenizer that has none
  is encoded as plain prompt text directly followed by the response, no separator; ``encode_examples`` says so
  once per dataset with a ``PromptFormatWarning`` (``prompt_format_note`` gives the text, for a job's events).
- Prompt and response are tokenized **separately** and their ids concatenated, so the prompt/response
  boundary is exact: no token straddles it, and the prompt ids are the ones generation starts from. (This can
  differ from tokenizing the joined text when a merge would cross the boundary; it is what the model sees at
  inference, so it is the right thing to train on.)
- The response gets the tokenizer's EOS token appended, and EOS is labelled (the model learns to stop).
- Labels are unshifted (HF convention: ``labels[t]`` is the target of position ``t - 1``); prompt tokens get -100.
- ``max_len`` bounds prompt + response (EOS included), and one rule covers both parts: a sequence is cut from
  the right, and an example must keep at least one response token. So a prompt of ``max_len`` tokens or more
  is an error (ValueError naming the example: it would train on nothing), while a response that does not fit
  is cut, losing its end and its EOS. Cutting is never silent: ``encode_examples`` (every dataset a job
  builds) emits one ``TruncationWarning`` per dataset that counts the cut examples, names the first few and
  gives the length the longest needs; ``encode`` of a single example warns for that example.

Record files (``.jsonl``: UTF-8 text, one JSON object a line, blank lines skipped; ``.parquet``: one row a
record) hold either ``prompt`` + ``response`` strings, or ``messages``: a list of ``{"role", "content"}`` whose
last message is from the assistant. An optional ``answer`` string is kept (the exact-match target of evaluation). A file
that is not UTF-8 text (a binary file, another encoding) is a ValueError naming the file and the first bad
line (JSONL) or row and field (Parquet).

This module does not import torch at load time (the web app reads files through it); ``collate`` does.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from backend.lm.tasks import Example, get_task

IGNORE_INDEX = -100
SUFFIXES = (".jsonl", ".parquet")
ROLES = ("system", "user", "assistant", "tool")

Prompt = str | list[dict]          # a prompt text, or the prompt turns of a chat
SHOW_TRUNCATED = 5                 # how many truncated examples a TruncationWarning names


class TruncationWarning(UserWarning):
    """Some examples' responses were cut to fit ``max_len`` (see the module docstring)."""


class PromptFormatWarning(UserWarning):
    """Prompt/response records on a tokenizer without a chat template: joined with no separator."""


# ---------------------------------------------------------------------------------------------- loading

def load_examples(path: str | Path) -> list[dict]:
    """Read and validate a ``.jsonl`` or ``.parquet`` file of records.

    Returns one dict per record with ``response`` (str), ``answer`` (str, "" if the record has none) and either
    ``prompt`` (str) or, for chat records, ``messages`` (the prompt turns: all but the final assistant message)
    plus ``prompt`` (the content of the last prompt turn, for display). Raises ValueError naming the file, the
    1-based line (JSONL) or row (Parquet) and the bad field for any malformed record.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; allowed: {', '.join(SUFFIXES)}")
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    if not p.is_file():
        raise ValueError(f"{p}: not a file")
    if p.suffix.lower() == ".jsonl":
        raw = list(_read_jsonl(p))
        where = "line"
    else:
        raw = list(enumerate(_read_parquet(p), start=1))
        where = "row"
    if not raw:
        raise ValueError(f"{p}: the file holds no records")
    return [_validate(rec, f"{p}: {where} {n}") for n, rec in raw]


def _read_jsonl(p: Path) -> Iterable[tuple[int, Any]]:
    # read bytes and decode each line ourselves: a decode error then names the line, not a buffer offset
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")      # a leading BOM is allowed
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}: line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 "of the line); a .jsonl file must be UTF-8 text, one JSON object a line") from None
            nul = line.find("\x00")
            if nul >= 0:
                raise ValueError(f"{p}: line {n}: binary data (a NUL byte at column {nul + 1}); "
                                 "a .jsonl file must be UTF-8 text, one JSON object a line")
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {n}: invalid JSON ({e.msg} at column {e.colno})") from None


def _read_parquet(p: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{p}: not a readable Parquet file ({e})") from None
    try:
        return table.to_pylist()
    except UnicodeDecodeError as e:        # Parquet does not check that string columns hold UTF-8
        raise ValueError(_bad_utf8_cell(p, table) or f"{p}: holds text that is not UTF-8 ({e})") from None


def _bad_utf8_cell(p: Path, table: Any) -> str | None:
    """Where the first string that is not UTF-8 sits in ``table``: 'FILE: row N: field NAME ...'."""
    for name in table.column_names:
        col = table.column(name)
        for i in range(len(col)):
            try:
                col[i].as_py()
            except UnicodeDecodeError as e:
                return (f"{p}: row {i + 1}: field {name!r} is not UTF-8 text ({e.reason} at byte {e.start + 1}); "
                        "string columns must hold UTF-8")
    return None


def _validate(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    answer = rec.get("answer")
    if answer is None:
        answer = ""
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    elif not isinstance(answer, str):
        raise ValueError(f"{where}: field 'answer' must be a string or number, got {type(answer).__name__}")
    if rec.get("messages") is not None:
        return _validate_messages(rec["messages"], where) | {"answer": answer}
    for field in ("prompt", "response"):
        if rec.get(field) is None:
            raise ValueError(f"{where}: missing field {field!r} (a record needs 'prompt' and 'response', "
                             "or 'messages')")
        if not isinstance(rec[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(rec[field]).__name__}")
    if not rec["response"].strip():
        raise ValueError(f"{where}: field 'response' is empty")
    return {"prompt": rec["prompt"], "response": rec["response"], "answer": answer}


def _validate_messages(messages: Any, where: str) -> dict:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: field 'messages' must be a list of at least 2 messages "
                         "(prompt turns, then the assistant's response)")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: field 'messages[{i}].role' is {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: field 'messages[{i}].content' must be a string, "
                             f"got {type(content).__name__}")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "assistant":
        raise ValueError(f"{where}: field 'messages[{len(clean) - 1}].role' must be 'assistant' (the last "
                         f"message is the response), got {clean[-1]['role']!r}")
    if not clean[-1]["content"].strip():
        raise ValueError(f"{where}: field 'messages[{len(clean) - 1}].content' (the response) is empty")
    return {"messages": clean[:-1], "prompt": clean[-2]["content"], "response": clean[-1]["content"]}


# ---------------------------------------------------------------------------------------------- encoding

def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# How prompt and response are joined: True (the chat template when the tokenizer has one, else plain), False
# (plain), or a prompt template "...{prompt}...{response}" (check_prompt_template).
Format = bool | str
PROMPT, RESPONSE = "{prompt}", "{response}"


def check_prompt_template(template: str) -> str:
    """``template`` if it is a valid prompt template, else ValueError saying what is wrong.

    Valid: holds ``{prompt}`` once and ``{response}`` once, in that order, and ends with ``{response}`` (the
    labelled tokens are exactly the response's; text after it would be trained on as if it were response).
    Other text, braces included, is kept literally.
    """
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a string, got {type(template).__name__}")
    example = "e.g. '{prompt}\\n{response}' or 'Question: {prompt}\\nAnswer: {response}'"
    for ph in (PROMPT, RESPONSE):
        if template.count(ph) != 1:
            raise ValueError(f"prompt_template {template!r} must contain {ph} exactly once (it has "
                             f"{template.count(ph)}); {example}")
    if template.index(PROMPT) > template.index(RESPONSE):
        raise ValueError(f"prompt_template {template!r}: {PROMPT} must come before {RESPONSE}; {example}")
    if not template.endswith(RESPONSE):
        raise ValueError(f"prompt_template {template!r} must end with {RESPONSE} (text after the response would "
                         f"be trained on as response; the EOS token is appended anyway); {example}")
    return template


def text_format(chat_template: bool, prompt_template: str = "") -> Format:
    """The ``chat`` argument of the encoders for a job's ``chat_template`` and ``prompt_template`` settings.
    In a prompt template the two-character sequences ``\\n`` and ``\\t`` mean newline and tab (what a shell
    flag can carry)."""
    if not prompt_template:
        return bool(chat_template)
    return check_prompt_template(prompt_template.replace("\\n", "\n").replace("\\t", "\t"))


def render_prompt(tokenizer: Any, prompt: Prompt, chat: Format = True) -> str:
    """The prompt text the model sees: chat-templated (generation prompt added), from a prompt template, or
    plain; see module doc."""
    if isinstance(prompt, list):
        if not has_chat_template(tokenizer):
            raise ValueError("a 'messages' record needs a tokenizer with a chat template; this tokenizer has "
                             "none (use 'prompt' + 'response' records instead)")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if isinstance(chat, str):
        head = check_prompt_template(chat)[:-len(RESPONSE)]
        return head.replace(PROMPT, prompt)             # replace, not format: braces in the prompt stay as they are
    if chat and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def prompt_format_note(tokenizer: Any, chat: Format, examples: Sequence[Example | dict]) -> str | None:
    """What a job should say once about how prompts were joined to responses, or None when nothing is silent:
    prompt/response records asked to use the chat template (``chat=True``) on a tokenizer that has none."""
    if chat is not True or has_chat_template(tokenizer):
        return None
    first = next((ex for ex in examples if isinstance(record_prompt(ex), str)), None)
    if first is None:
        return None
    bos = getattr(tokenizer, "bos_token", None)
    shown = (f"{bos or ''}{record_prompt(first)}{_record_response(first)}")[:120]
    return (f"the tokenizer has no chat template: each prompt is used as plain text"
            f"{' after its BOS token ' + repr(bos) if bos else ''}, directly followed by the response with no "
            f"separator (e.g. {shown!r}); pass --prompt-template '{{prompt}}\\n{{response}}' (or your own) to "
            "choose how they are joined, or --no-chat-template to use plain text without this note")


def prompt_ids(tokenizer: Any, prompt: Prompt, chat: Format = True) -> list[int]:
    """Token ids of the rendered prompt, exactly as training sees them and as generation starts from."""
    templated = isinstance(prompt, list) or (chat is True and has_chat_template(tokenizer))
    ids = list(tokenizer(render_prompt(tokenizer, prompt, chat), add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not templated and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids       # a chat template writes its own BOS text; a plain prompt gets it here
    return ids


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """Token ids of the response followed by EOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before encoding")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]


def encode(tokenizer: Any, prompt: Prompt, response: str, max_len: int, chat: Format = True) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one example: prompt labels -100, response (with EOS) labelled.

    ``prompt`` is a text or a list of chat messages (the prompt turns). A response that does not fit in
    ``max_len`` is cut from the right with a ``TruncationWarning``; ValueError when the prompt leaves no room
    for even one response token (module docstring).
    """
    item, full_len = _encode(tokenizer, prompt, response, max_len, chat)
    if full_len > max_len:
        _warn_truncated([0], [full_len], 1, max_len)
    return item


def _encode(tokenizer: Any, prompt: Prompt, response: str, max_len: int, chat: Format) -> tuple[dict, int]:
    """``encode`` without the warning: (the item, the length prompt + response + EOS had before cutting)."""
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
    p_ids = prompt_ids(tokenizer, prompt, chat)
    r_ids = response_ids(tokenizer, response)
    if len(p_ids) >= max_len:
        raise ValueError(f"the prompt is {len(p_ids)} tokens long, which leaves no room for the response "
                         f"within max_len={max_len}; raise max_len or shorten the prompt")
    input_ids = (p_ids + r_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_len]
    assert len(input_ids) == len(labels), "input_ids and labels must align"
    return {"input_ids": input_ids, "labels": labels}, len(p_ids) + len(r_ids)


def _warn_truncated(idx: list[int], full_lens: list[int], n_total: int, max_len: int) -> None:
    shown = ", ".join(str(i) for i in idx[:SHOW_TRUNCATED]) + (", ..." if len(idx) > SHOW_TRUNCATED else "")
    warnings.warn(f"{len(idx)} of {n_total} example(s) were cut to max_len={max_len} tokens, losing the end of "
                  f"their response and its EOS (example(s) {shown}); the longest needs {max(full_lens)} tokens: "
                  "raise max_len to keep them whole", TruncationWarning, stacklevel=3)


def record_prompt(record: Example | dict) -> Prompt:
    """The prompt of an Example or a loaded record: its chat turns if it has them, else its prompt text."""
    if isinstance(record, Example):
        return record.prompt
    return record["messages"] if record.get("messages") is not None else record["prompt"]


def _record_response(record: Example | dict) -> str:
    return record.response if isinstance(record, Example) else record["response"]


def encode_record(tokenizer: Any, record: Example | dict, max_len: int, chat: Format = True) -> dict[str, list[int]]:
    """``encode`` for an Example or a record from ``load_examples``."""
    return encode(tokenizer, record_prompt(record), _record_response(record), max_len, chat)


def encode_examples(tokenizer: Any, examples: Sequence[Example | dict], max_len: int,
                    chat: Format = True) -> list[dict]:
    """Encode every example, keeping its position in ``examples`` as ``sample_idx``. Responses cut to fit
    ``max_len`` give one ``TruncationWarning`` for the whole list, counting them; a prompt with no room left
    is a ValueError naming the example. Prompt/response records on a tokenizer without the chat template they
    asked for give one ``PromptFormatWarning`` (``prompt_format_note``)."""
    note = prompt_format_note(tokenizer, chat, examples)
    if note:
        warnings.warn(note, PromptFormatWarning, stacklevel=2)
    out = []
    cut_idx, cut_lens = [], []
    for i, ex in enumerate(examples):
        try:
            item, full_len = _encode(tokenizer, record_prompt(ex), _record_response(ex), max_len, chat)
        except ValueError as e:
            raise ValueError(f"example {i}: {e}") from None
        if full_len > max_len:
            cut_idx.append(i)
            cut_lens.append(full_len)
        out.append(item | {"sample_idx": i})
    if cut_idx:
        _warn_truncated(cut_idx, cut_lens, len(out), max_len)
    return out


def collate(encoded: Sequence[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad encoded items into tensors ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Padding labels are -100. Items that carry ``sample_idx`` give a ``sample_idx`` tensor (B,) too.
    """
    import torch

    if not encoded:
        raise ValueError("collate needs at least one item")
    if pad_id is None:
        raise ValueError("pad_id is None; the tokenizer needs a pad token (or pass its EOS id)")
    T = max(len(e["input_ids"]) for e in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(encoded):
        n = len(e["input_ids"])
        assert len(e["labels"]) == n, f"item {b}: labels and input_ids differ in length"
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all("sample_idx" in e for e in encoded):
        batch["sample_idx"] = torch.tensor([e["sample_idx"] for e in encoded], dtype=torch.long)  # (B,)
    return batch


# ---------------------------------------------------------------------------------------------- datasets

@dataclass
class TaskDataset:
    """Encoded items of one split (a map-style dataset: ``len``, ``ds[i]``; works with a torch DataLoader).

    ``examples[i]`` is the source of ``items[i]``, whose ``sample_idx`` is ``i``.
    """
    examples: list[Example | dict]
    items: list[dict]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @classmethod
    def from_examples(cls, tokenizer: Any, examples: Sequence[Example | dict], max_len: int,
                      chat: Format = True) -> "TaskDataset":
        return cls(list(examples), encode_examples(tokenizer, examples, max_len, chat))

    @classmethod
    def from_task(cls, tokenizer: Any, task: str, seed: int, n_train: int, n_eval: int, max_len: int,
                  split: str = "train", chat: Format = True, **params: Any) -> "TaskDataset":
        """The ``split`` ("train" or "eval") of ``get_task(task).generate(seed, n_train, n_eval, **params)``."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        train, eval_ = get_task(task).generate(seed, n_train, n_eval, **params)
        return cls.from_examples(tokenizer, train if split == "train" else eval_, max_len, chat)

    @classmethod
    def from_file(cls, tokenizer: Any, path: str | Path, max_len: int, chat: Format = True) -> "TaskDataset":
        return cls.from_examples(tokenizer, load_examples(path), max_len, chat)
