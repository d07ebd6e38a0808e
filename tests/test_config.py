"""TrainConfig validation: every bad value names the field and what is allowed; CLI and YAML build the same."""
import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from backend.jobs import registry
from backend.jobs.config import add_config_args, config_from_args, parse_list, parse_mapping
from backend.jobs.train import TrainConfig
from backend.store.rundir import queue_config


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
    # a flag is a bool: the string "false" is truthy, and turned reverse KL on
    ({"scheme": "asft", "scheme_params": {"reverse_kl": "false"}}, "reverse_kl must be true or false, got 'false'"),
    ({"scheme": "asft", "scheme_params": {"reverse_kl": 0}}, "reverse_kl must be true or false, got 0"),
    # refused before a run folder exists (they failed after the model had loaded)
    ({"trace_inline": True, "trace_mode": "token"}, "trace_inline needs trace_mode 'position'"),
    ({"task": "modadd", "task_params": {"q": 5}}, r"unknown parameter\(s\) \['q'\] for task 'modadd'"),
    ({"task": "modadd", "task_params": {"p": 1}}, "p must be in 2..1000, got 1"),
    ({"model": "/no/such/model"}, "model: path '/no/such/model' does not exist"),
    # a user dataset has no answer checker: these did nothing, silently
    ({"dataset": __file__, "eval_before": True}, "eval_before and eval_k need held-out items of a task"),
    ({"dataset": __file__, "eval_k": 4}, "eval_before and eval_k need held-out items of a task"),
])
def test_invalid_values_name_field_and_range(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kwargs)


def test_scheme_defaults_are_filled_in():
    assert TrainConfig(scheme="antiop").scheme_params == {"clip_mult": 3.0}
    # a float parameter given as an int is stored as a float: the same run, the same comparison settings hash
    from backend.jobs.compare_schemes import settings_hash
    two, two_f = TrainConfig(scheme="antiop", scheme_params={"clip_mult": 2}), TrainConfig(
        scheme="antiop", scheme_params={"clip_mult": 2.0})
    assert type(two.scheme_params["clip_mult"]) is float and settings_hash(two) == settings_hash(two_f)
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


@pytest.mark.parametrize("text,want", [
    ("{keep_ratio: 0.5}", {"keep_ratio": 0.5}),                       # YAML flow, as in a config file and --help
    ('{"keep_ratio": 0.5}', {"keep_ratio": 0.5}),                     # JSON
    ("keep_ratio=0.5", {"keep_ratio": 0.5}),
    ("{antiop: {clip_mult: 2}}", {"antiop": {"clip_mult": 2}}),
    ("", {}),
])
def test_mapping_flags_take_yaml_flow_json_and_key_value(text, want):
    assert parse_mapping(text) == want


@pytest.mark.parametrize("text,msg", [("{keep_ratio: [0.5}", "not a mapping such as"),
                                      ("keep_ratio", "expected key=value, got 'keep_ratio'"),
                                      ("keep_ratio={0.3", "not a value for 'keep_ratio'")])
def test_a_malformed_mapping_flag_says_what_is_allowed(text, msg):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(msg)):
        parse_mapping(text)
    with pytest.raises(SystemExit):                                   # argparse: a usage error, not a traceback
        _parse(["--scheme-params", text])


def test_list_flags_take_commas_or_a_yaml_flow_list():
    assert parse_list("q_proj, v_proj") == parse_list("[q_proj, v_proj]") == parse_list('["q_proj","v_proj"]') \
        == ["q_proj", "v_proj"]
    with pytest.raises(argparse.ArgumentTypeError, match="not a list such as"):
        parse_list("[q_proj, v_proj")
    assert _parse(["--lora-targets", "[q_proj, v_proj]"]).lora_targets == ["q_proj", "v_proj"]


def test_every_mapping_example_in_the_help_strings_parses():
    """The help strings' examples (`e.g. {p: 97}`) are what a user types: each must parse."""
    examples = []
    for spec in registry.kinds().values():
        for f in fields(spec.config):
            help_text = (f.metadata or {}).get("help", "")
            examples += [m for m in re.findall(r"e\.g\. (\{.*?\}+)", help_text)]
    assert len(examples) >= 4, examples
    for ex in examples:
        assert isinstance(parse_mapping(ex), dict), ex


def test_exponent_floats_load_as_numbers_from_files_flags_and_queued_configs(tmp_path):
    """'lr: 1e-5' in a config file, 'keep_ratio=5e-1' in a flag, and a queued job's config.json load as written:
    json.dumps writes every float below 1e-4 as '1e-05' and an emoji as an escaped surrogate pair, which PyYAML
    (YAML 1.1) read as a string and as two lone halves; the config then refused 'lr: expected float, got '1e-05'',
    so a job queued with such a rate never started."""
    y = tmp_path / "run.yaml"
    y.write_text("lr: 1e-5\nscheme: topk\nscheme_params: {keep_ratio: 5E-1}\n")
    cfg = TrainConfig.from_yaml(y)
    assert (cfg.lr, cfg.scheme_params) == (1e-5, {"keep_ratio": 0.5})
    assert parse_mapping("keep_ratio=5e-1") == parse_mapping('{"keep_ratio": 5e-1}') == {"keep_ratio": 0.5}
    # and text outside the BMP: json.dumps escapes it as a surrogate pair, which PyYAML read as two lone halves
    small = {"lr": 2e-5, "weight_decay": 1e-6, "temperature": 5e-5, "name": "run \U0001F680",
             "prompt_template": "\U0001F642 {prompt}\n{response}"}
    for kind, spec in registry.kinds().items():                      # every kind, through the queue's writer
        names = {f.name for f in fields(spec.config)}
        queued = spec.config(run_id=f"q-{kind}", **{k: v for k, v in small.items() if k in names})
        queue_config(tmp_path / queued.run_id, kind, queued)
        assert spec.config.from_file(tmp_path / queued.run_id / "config.json") == queued, kind


def test_another_kinds_run_config_names_its_kind():
    """A probe run's config.json given to train listed a dozen unknown fields; it now says whose config it is."""
    from backend.store import paths
    probe_cfg = paths.SHIPPED_DATA / "runs" / "demo-probe" / "config.json"
    with pytest.raises(ValueError, match=r"is a 'probe' run's config, not a 'train' one: run it with "
                                         r"`python -m backend probe --config"):
        TrainConfig.from_file(probe_cfg)
    assert TrainConfig.from_file(paths.SHIPPED_DATA / "runs" / "demo-sft-position" / "config.json").steps > 0


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


# ---- run ids: the name of the run directory, so it must never leave the runs folder -------------------------
BAD_RUN_IDS = ["../../x", "..", ".", ".hidden", "a/b", "/tmp/x", "a\\b", "x..y", "a b", "caf\u00e9", "x" * 129,
               "run\n1", "~user", "a:b", "-rf"]
GOOD_RUN_IDS = ["synth-sft", "20260101-000000-train-demo-ab12", "run_1.v2", "A", "x" * 128, "_private"]


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_unsafe_run_ids_are_refused_by_every_way_of_building_a_config(run_id, tmp_path):
    msg = r"run_id .* is not allowed: a run id is letters, digits, '-', '_' and '\.'"
    with pytest.raises(ValueError, match=msg):
        TrainConfig(run_id=run_id)
    with pytest.raises(ValueError, match=msg):
        _parse([f"--run-id={run_id}"])
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"run_id": run_id, "steps": 1}))
    with pytest.raises(ValueError, match=msg):
        TrainConfig.from_yaml(y)


@pytest.mark.parametrize("run_id", GOOD_RUN_IDS + [""])       # "": the job chooses one
def test_safe_run_ids_are_kept(run_id):
    assert TrainConfig(run_id=run_id).run_id == run_id


def test_every_job_kind_checks_its_run_id(monkeypatch):
    # the toy kind (tests/toy_kind.py) declares run_id with a plain option(): the check comes from JobConfig
    monkeypatch.setenv(registry.ENV_KINDS, "tests.toy_kind")
    kinds = registry.kinds()
    assert {"train", "toy"} <= set(kinds)
    for spec in kinds.values():
        assert spec.config(run_id="ok-1").run_id == "ok-1"
        with pytest.raises(ValueError, match="run_id '../../x' is not allowed"):
            spec.config(run_id="../../x")
        with pytest.raises(ValueError, match="run_id '../../x' is not allowed"):
            spec.config.from_dict({"run_id": "../../x"})


def test_runs_root_is_not_confined_by_the_config(tmp_path):
    # the CLI user may write runs anywhere; the web app confines runs_root itself (test_app_api.py)
    assert TrainConfig(runs_root=str(tmp_path / "elsewhere")).runs_root == str(tmp_path / "elsewhere")
    assert _parse(["--runs-root", "/tmp/anywhere"]).runs_root == "/tmp/anywhere"


def test_form_text_and_typed_values_build_the_same_config(tmp_path):
    # the Launch form gives text (textboxes), numbers (gr.Number) and bools; the /launch API gives YAML types
    from tokviz.tabs.launch import config_from_form
    text = config_from_form({"scheme": "topk", "scheme_params": "keep_ratio=0.5", "steps": 30, "lr": "1",
                             "lora_targets": "q_proj, v_proj", "task_params": '{"max_steps": 2}',
                             "chat_template": False})
    typed = config_from_form({"scheme": "topk", "scheme_params": {"keep_ratio": 0.5}, "steps": 30, "lr": 1,
                              "lora_targets": ["q_proj", "v_proj"], "task_params": {"max_steps": 2},
                              "chat_template": False})
    y = tmp_path / "run.yaml"
    y.write_text("scheme: topk\nscheme_params: {keep_ratio: 0.5}\nsteps: 30\nlr: 1\nlora_targets: [q_proj, v_proj]\n"
                 "task_params: {max_steps: 2}\nchat_template: false\n")
    assert text == typed == TrainConfig.from_yaml(y)
    assert typed.lora_targets == ["q_proj", "v_proj"] and typed.task_params == {"max_steps": 2}
    with pytest.raises(ValueError, match="steps: expected int, got True"):
        config_from_form({"steps": True})                     # not 1
    with pytest.raises(ValueError, match=r"lora_targets: expected list, got \{'q_proj': 1\}"):
        config_from_form({"lora_targets": {"q_proj": 1}})     # not its text


def test_a_runs_root_and_an_influence_file_under_home_are_expanded(tmp_path, monkeypatch):
    """runs_root: ~/x wrote config.json under a literal ./~ folder while pyarrow expanded the Parquet paths (one
    run in two places); influence_file ~/x was refused as missing while dataset ~/x was found."""
    from backend.store import paths
    from backend.store.rundir import RunDir
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert paths.runs_dir("~/runs-here") == tmp_path / "runs-here"
    rd = RunDir.create("train", "x", TrainConfig().to_dict(), root=Path("~/runs-here"), run_id="r1")
    assert rd.path == tmp_path / "runs-here" / "r1" and (rd.path / "config.json").is_file()
    assert not (tmp_path / "~").exists()
    (tmp_path / "held.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    assert TrainConfig(trace_every=5, influence_eval=1, influence_file="~/held.jsonl").influence_file == "~/held.jsonl"
