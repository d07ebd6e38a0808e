"""The embedded tokenizer's chat template: the shipped file is the builder's, it renders the Qwen-style text
written out by hand, and its assistant mask (``{% generation %}``) covers exactly each assistant message's
content and its <|im_end|>: the tokens tokviz's own encoding labels and the ones TRL's SFTTrainer trains, with
``assistant_only_loss`` or completion-only loss (never the '\\n' after <|im_end|>)."""
from __future__ import annotations

import math

import pytest

from backend.dev.demo_model import CHAT_TEMPLATE
from backend.lm.data import IGNORE_INDEX, encode
from backend.store.paths import DEFAULT_MODEL_DIR

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tom has 3 apples. He gets 4 more. How many?"},
        {"role": "assistant", "content": "Step 1: 3 + 4 = 7\n#### 7"},
        {"role": "user", "content": "And twice that?"},
        {"role": "assistant", "content": "Step 1: 7 * 2 = 14\n#### 14"}]
# the same conversation, written out by hand: turns joined by '\n', nothing after the last <|im_end|>
CONV_TEXT = ("<|im_start|>system\nBe brief.<|im_end|>\n"
             "<|im_start|>user\nTom has 3 apples. He gets 4 more. How many?<|im_end|>\n"
             "<|im_start|>assistant\nStep 1: 3 + 4 = 7\n#### 7<|im_end|>\n"
             "<|im_start|>user\nAnd twice that?<|im_end|>\n"
             "<|im_start|>assistant\nStep 1: 7 * 2 = 14\n#### 14<|im_end|>")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive 1s."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_shipped_template_is_the_builders(tok):
    assert (DEFAULT_MODEL_DIR / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert tok.chat_template == CHAT_TEMPLATE


def test_template_renders_the_hand_written_text(tok):
    assert tok.apply_chat_template(CONV, tokenize=False) == CONV_TEXT
    # a prompt with the generation prompt is a prefix of the conversation it starts (what completion-only
    # loss and tokviz's prompt masking rely on)
    prompt = tok.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == CONV_TEXT[:CONV_TEXT.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]


def test_assistant_mask_covers_content_and_im_end_only(tok):
    out = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    runs = _runs(mask)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [m["content"] + "<|im_end|>" for m in CONV if
                                                       m["role"] == "assistant"]
    for a, b in runs:       # the header before a run and the '\n' after it are not trained
        assert tok.decode(ids[a - 3:a]) == "<|im_start|>assistant\n"
    assert tok.decode(ids[runs[0][1]]) == "\n" and runs[-1][1] == len(ids)


def test_assistant_mask_labels_what_tokviz_encoding_labels(tok):
    prompt, response = CONV[1]["content"], CONV[2]["content"]
    mine = encode(tok, prompt, response, max_len=256)
    out = tok.apply_chat_template(CONV[1:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(mine["input_ids"]) == out["input_ids"]
    assert [lab != IGNORE_INDEX for lab in mine["labels"]] == [bool(m) for m in out["assistant_masks"]]


def _trained_text(tok, example: dict) -> list[str]:
    """The label runs of one tokenized SFTTrainer example, decoded."""
    labels = example["labels"]
    runs = _runs([lab != IGNORE_INDEX for lab in labels])
    return [tok.decode(example["input_ids"][a:b]) for a, b in runs]


def test_trl_sft_trains_exactly_the_assistant_tokens(tok, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    assert is_chat_template_stop_token_trained(tok)          # TRL's own check that <|im_end|> is trained

    def trainer(ds: list[dict], **kw) -> SFTTrainer:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"))
        args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                         bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                         disable_tqdm=True, seed=0, **kw)
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(ds), processing_class=tok)

    # completion-only loss (prompt/completion pairs; TRL's default for them) stops at <|im_end|>
    pc = [{"prompt": CONV[:2], "completion": CONV[2:3]}, {"prompt": CONV[:4], "completion": CONV[4:5]}]
    t = trainer(pc)
    assert [_trained_text(tok, ex) for ex in t.train_dataset] == [[CONV[2]["content"] + "<|im_end|>"],
                                                                   [CONV[4]["content"] + "<|im_end|>"]]
    # assistant-only loss on whole conversations: every assistant turn, nothing else; and a step runs
    t = trainer([{"messages": CONV}, {"messages": CONV[1:3]}], assistant_only_loss=True)
    assert _trained_text(tok, t.train_dataset[0]) == [CONV[2]["content"] + "<|im_end|>",
                                                      CONV[4]["content"] + "<|im_end|>"]
    t.train()
    assert t.state.global_step == 1 and math.isfinite(t.state.log_history[-1]["train_loss"])
