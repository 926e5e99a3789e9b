"""Chat templates render as transformers' apply_chat_template renders them, on the same tokenizer_config."""

import json
import shutil

import pytest

import bloom
from bloom.tiny import make_tiny_checkpoint
from pipelines.serve.chat import ChatTemplateError, checkpoint_chat_template, render_chat

# A role-tagged template with the special tokens, loop controls, raise_exception and whitespace control.
TAGGED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
          "{% if m['role'] == 'system' and loop.first %}{{ m['content'] | trim }}\n{% continue %}{% endif %}\n"
          "<|{{ m['role'] }}|>\n  {{ m['content'] | trim }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# One that reads names, tojson (unescaped non-ASCII and HTML characters) and a namespace.
JSONISH = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
           "{{ ns.n }} {{ m | tojson }}{% if m.name is defined %} ({{ m.name }}){% endif %}\n{% endfor %}"
           "{% if add_generation_prompt %}{{ eos_token }}A:{% endif %}")
MESSAGES = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Où est <Lima>?", "name": "ada"},
            {"role": "assistant", "content": "In Peru."}, {"role": "user", "content": "And Obi?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "gen", bloom.BloomForCausalLM)


def with_template(tiny, tmp_path, template):
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny, directory)
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    return directory


@pytest.mark.parametrize("template", [TAGGED, JSONISH], ids=["tagged", "tojson"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(tiny, tmp_path, template, generation_prompt):
    import transformers

    directory = with_template(tiny, tmp_path, template)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    want = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    ours = bloom.BloomTokenizerFast.from_pretrained(directory)
    got = render_chat(checkpoint_chat_template(directory), MESSAGES, ours.special_tokens_map, generation_prompt)
    assert got == want
    # The prompt's tokens too: apply_chat_template(tokenize=True) encodes without adding special tokens.
    ids = reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(got) == list(ids)


def test_a_checkpoint_without_a_template_has_none_and_a_named_default_is_found(tiny, tmp_path):
    assert checkpoint_chat_template(tiny) is None
    named = with_template(tiny, tmp_path, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "d"}])
    assert checkpoint_chat_template(named) == "d"


def test_the_templates_own_refusal_and_bad_jinja_are_one_clear_error():
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        render_chat(TAGGED, [{"role": "tool", "content": "x"}], {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", MESSAGES, {})
    with pytest.raises(ChatTemplateError):  # the sandbox: no way out to Python internals
        render_chat("{{ messages.__class__.__mro__ }}", MESSAGES, {})
