"""TrainConfig validation: every bad value names the field and what is allowed; CLI and YAML build the same."""
import argparse

import pytest

from backend.jobs.config import add_config_args, config_from_args
from backend.jobs.train import TrainConfig


@pytest.mark.parametrize("kwargs,msg", [
    ({"steps": 0}, r"steps=0 is outside the allowed range \[1, inf\)"),
    ({"lr": 0.0}, r"lr=0.0 is outside the allowed range \(0, inf\)"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0 is outside the allowed range \[0.0, 1.0\)"),
    ({"lora_r": 0}, "lora_r=0 is outside"),
    ({"scheme": "bogus"}, "unknown scheme 'bogus'; available: sft"),
    ({"scheme": "topk", "scheme_params": {"keep_ratio": 1.2}}, r"keep_ratio=1.2 is outside the allowed range \(0.0, 1.0\]"),
    ({"task": "nope"}, "nope"),
    ({"trace_mode": "layer"}, "trace_mode='layer' is not allowed; choose one of: position, token"),
    ({"lr_schedule": "step"}, "choose one of: cosine, linear, constant"),
    ({"dataset": "/no/such/file.jsonl"}, "dataset: file '/no/such/file.jsonl' does not exist"),
    ({"trace_inline": True, "grad_accum": 2}, "trace_inline needs grad_accum = 1"),
    ({"steps": "10"}, "steps: expected int"),
    ({"lora_targets": []}, "lora_targets must be a non-empty list"),
])
def test_invalid_values_name_field_and_range(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kwargs)


def test_scheme_defaults_are_filled_in():
    assert TrainConfig(scheme="antiop").scheme_params == {"clip_mult": 3.0}
    assert TrainConfig(scheme="topk", scheme_params={"keep_ratio": 0.5}).scheme_params == {"keep_ratio": 0.5}


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="unknown config field\\(s\\): stepz"):
        TrainConfig.from_dict({"stepz": 3})


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, TrainConfig)
    return config_from_args(p.parse_args(argv), TrainConfig)


def test_cli_yaml_and_dataclass_agree(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("scheme: topk\nscheme_params: {keep_ratio: 0.5}\nsteps: 30\nlr: 1\nlora_targets: [q_proj, v_proj]\n")
    from_yaml = TrainConfig.from_yaml(y)
    from_cli = _parse(["--scheme", "topk", "--scheme-params", "keep_ratio=0.5", "--steps", "30", "--lr", "1",
                       "--lora-targets", "q_proj,v_proj"])
    direct = TrainConfig(scheme="topk", scheme_params={"keep_ratio": 0.5}, steps=30, lr=1.0,
                         lora_targets=["q_proj", "v_proj"])
    assert from_yaml == from_cli == direct
    assert isinstance(from_yaml.lr, float)


def test_cli_overrides_file(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("steps: 30\nscheme: dft\n")
    cfg = _parse(["--config", str(y), "--steps", "5", "--no-chat-template"])
    assert (cfg.steps, cfg.scheme, cfg.chat_template) == (5, "dft", False)


def test_bad_yaml(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("steps: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TrainConfig.from_yaml(y)
    y.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        TrainConfig.from_yaml(y)
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
