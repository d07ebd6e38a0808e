"""Prompt/response records on a tokenizer without a chat template: the one-time note, and --prompt-template
(validated; the labelled tokens are still exactly the response and EOS)."""
import warnings

import pytest
from transformers import AutoTokenizer

from backend.jobs.train import TrainConfig
from backend.lm.data import (
    IGNORE_INDEX,
    PromptFormatWarning,
    check_prompt_template,
    encode,
    encode_examples,
    prompt_format_note,
    text_format,
)
from backend.store import paths

RECORDS = [{"prompt": "What is 2 + 3?", "response": "#### 5", "answer": "5"},
           {"prompt": "What is 7 + 1?", "response": "#### 8", "answer": "8"}]


@pytest.fixture(scope="module")
def plain_tok():
    """The embedded byte-level BPE tokenizer with its chat template removed (as a base model's may have none)."""
    tok = AutoTokenizer.from_pretrained(paths.DEFAULT_MODEL_DIR)
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("bad, why", [
    ("{prompt} {answer}", "{response} exactly once"),
    ("Answer: {response}", "{prompt} exactly once"),
    ("{prompt}{prompt}\n{response}", "{prompt} exactly once"),
    ("{response} after {prompt}", "must come before"),
    ("{prompt}\n{response}\n", "must end with {response}"),
])
def test_a_bad_prompt_template_says_what_is_wrong(bad, why):
    with pytest.raises(ValueError, match=why.replace("{", r"\{").replace("}", r"\}")):
        check_prompt_template(bad)
    with pytest.raises(ValueError, match="prompt_template"):
        TrainConfig(prompt_template=bad)


def test_shell_escapes_in_the_template_are_read_as_newline_and_tab():
    assert text_format(True, r"Q: {prompt}\nA:\t{response}") == "Q: {prompt}\nA:\t{response}"
    assert text_format(False, "") is False and text_format(True) is True


def test_the_template_masks_exactly_the_response(plain_tok):
    fmt = text_format(True, r"Question: {prompt}\nAnswer: {response}")
    item = encode(plain_tok, "What is {2} + 3?", "#### 5", max_len=64, chat=fmt)
    ids, labels = item["input_ids"], item["labels"]
    n_prompt = sum(lab == IGNORE_INDEX for lab in labels)
    assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt])           # the prompt is a prefix
    resp = [lab for lab in labels if lab != IGNORE_INDEX]
    assert resp[-1] == plain_tok.eos_token_id
    assert plain_tok.decode(resp[:-1]) == "#### 5"                          # the masked tokens are the response
    # the braces of the prompt are kept literally (the template is filled by replacement, not str.format)
    assert plain_tok.decode(ids[:n_prompt]).endswith("Question: What is {2} + 3?\nAnswer: ")


def test_no_chat_template_is_said_once_per_dataset(plain_tok):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = encode_examples(plain_tok, RECORDS, max_len=64, chat=True)
    notes = [w for w in caught if issubclass(w.category, PromptFormatWarning)]
    assert len(notes) == 1
    msg = str(notes[0].message)
    assert "no chat template" in msg and "--prompt-template" in msg and "What is 2 + 3?#### 5" in msg
    # what it says is what was used: prompt text directly followed by the response
    assert plain_tok.decode(out[0]["input_ids"][:-1]).endswith("What is 2 + 3?#### 5")
    assert prompt_format_note(plain_tok, True, RECORDS) == msg


@pytest.mark.parametrize("chat", [False, "{prompt}\n{response}"])
def test_nothing_to_say_when_the_user_chose(plain_tok, chat):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptFormatWarning)
        encode_examples(plain_tok, RECORDS, max_len=64, chat=chat)
    assert prompt_format_note(plain_tok, chat, RECORDS) is None


def test_a_chat_template_needs_no_note():
    tok = AutoTokenizer.from_pretrained(paths.DEFAULT_MODEL_DIR)
    assert prompt_format_note(tok, True, RECORDS) is None
