"""Each setting is declared once (pipelines/tasks/settings.py); the command line, LabelConfig, the
endpoint's request models, the fingerprint and the engine's per-sequence parameters follow it."""

import dataclasses

import pytest
from pydantic import ValidationError

from bloom.engine import GenerationParams
from pipelines.config import LabelConfig
from pipelines.tasks import TASKS, settings
from pipelines.tasks.settings import SETTINGS, SettingError
from tests.jobs.test_label_corpus import load_script


def flag_help(script, flag: str) -> str:
    (action,) = [a for a in script.parser()._actions if flag in a.option_strings]
    return action.help


def test_a_changed_declaration_reaches_the_cli_the_requests_and_the_fingerprint(monkeypatch):
    script = load_script()
    before = LabelConfig(task="generate").fingerprint("m")
    assert "(default: 32)" in flag_help(script, "--max-new-tokens")
    monkeypatch.setitem(SETTINGS, "max_new_tokens", dataclasses.replace(SETTINGS["max_new_tokens"], default=7, le=50))

    # the command line: its help and its default
    assert "(default: 7)" in flag_help(script, "--max-new-tokens")
    assert script.parse_args(["--task", "generate"])[0].max_new_tokens == 7
    # LabelConfig and so the fingerprint
    assert LabelConfig(task="generate").max_new_tokens == 7
    assert LabelConfig(task="generate").fingerprint("m") != before
    with pytest.raises(ValueError, match="max_new_tokens must be less than or equal to 50"):
        LabelConfig(task="generate", max_new_tokens=51)
    # the endpoint: the REST body, and the one check every request's settings go through (named as sent)
    body = {"inputs": "x", "parameters": {"max_new_tokens": 51}}
    with pytest.raises(ValidationError, match="less than or equal to 50"):
        TASKS["generate"].request_model().model_validate(body)
    with pytest.raises(SettingError, match="max_tokens must be less than or equal to 50") as e:
        settings.check({"max_new_tokens": 51}, alias={"max_new_tokens": "max_tokens"})
    assert e.value.param == "max_new_tokens"
    settings.check({"max_new_tokens": 50})


def test_a_request_cap_is_checked_with_the_bounds_and_named_as_sent():
    with pytest.raises(SettingError, match="max_tokens 100 is over the limit of 64"):
        settings.check({"max_new_tokens": 100}, caps={"max_new_tokens": 64}, alias={"max_new_tokens": "max_tokens"})
    with pytest.raises(SettingError, match="max_new_tokens must be greater than or equal to 0"):
        settings.check({"max_new_tokens": -1}, caps={"max_new_tokens": 64})


def test_one_default_for_max_new_tokens_everywhere():
    """32 for the job, the config file, the REST endpoint and the fingerprint; the engine gets it given."""
    assert LabelConfig().max_new_tokens == SETTINGS["max_new_tokens"].default == 32
    assert TASKS["generate"].generation_params(LabelConfig(), "x").max_new_tokens == 32


def test_the_engines_parameters_come_from_the_declarations():
    fields = {f.name for f in dataclasses.fields(GenerationParams)}
    declared = {s.engine for s in SETTINGS.values() if s.engine}
    assert declared <= fields
    # What no setting gives: the model's eos, what only an OpenAI request asks (logprobs), and the output
    # constraint, which one of several settings gives (json_schema, regex, choice, ...: the generate
    # task's `constraint_of`).
    assert fields - declared == {"eos_token_id", "logprobs", "prompt_logprobs", "constraint"}
    c = LabelConfig(task="generate", max_new_tokens=5, do_sample=True, top_k=3, stop=["x"], min_tokens=2,
                    logit_bias={"7": 1})
    params = TASKS["generate"].generation_params(c, "a prompt")
    assert (params.max_new_tokens, params.do_sample, params.top_k, params.stop_strings, params.min_tokens,
            params.logit_bias) == (5, True, 3, ("x",), 2, {7: 1.0})


def test_every_declaration_is_complete():
    roles = {"output", "request", "resource", "identity"}
    for name, s in SETTINGS.items():
        assert s.name == name and s.role in roles and s.help, name
        assert s.tasks is None or set(s.tasks) <= set(TASKS), name
    assert LabelConfig.RESOURCE_FIELDS == {n for n, s in SETTINGS.items() if s.role == "resource"}
    for name, task in TASKS.items():  # a request may set exactly its task's request settings
        assert set(task.Params.model_fields) == {n for n, s in SETTINGS.items()
                                                 if s.role == "request" and s.reads(name)}


def test_a_bool_flag_says_the_value_other_than_the_default():
    script = load_script()
    assert script.parse_args(["--task", "generate"])[0].prefix_cache is True
    assert script.parse_args(["--task", "generate", "--no-prefix-cache"])[0].prefix_cache is False
    assert script.parse_args(["--task", "embed", "--normalize"])[0].normalize is True
