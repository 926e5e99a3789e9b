"""Chat templates: a conversation rendered into one prompt, as transformers' `apply_chat_template` does.

A checkpoint's `tokenizer_config.json` may carry `chat_template`, a Jinja template over `messages` (and
`add_generation_prompt`, the tokenizer's special tokens such as `bos_token` and `eos_token`). We render it
in the same sandboxed Jinja environment transformers sets up (trim_blocks, lstrip_blocks, loop controls,
its `tojson`, `raise_exception` and `strftime_now`), so a template gives the same text here as there;
transformers itself is not needed at run time.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A conversation the template refuses (its `raise_exception`) or cannot render."""


def checkpoint_chat_template(model_dir: str | Path) -> str | None:
    """The `chat_template` of the checkpoint's tokenizer_config.json (a string, or the one named
    "default" of a list of {name, template}); None when it has none."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template or None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """A chat template compiled once (templates are untrusted text: sandboxed, immutable environment).
    ChatTemplateError when it is not valid Jinja."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e}") from None


def render_chat(template: str, messages: list[dict], special_tokens: dict[str, str],
                add_generation_prompt: bool = True) -> str:
    """messages ([{"role", "content", ...}]) → the prompt text. special_tokens: {"bos_token": "<s>", ...},
    visible to the template as transformers passes them. ChatTemplateError naming the template's complaint."""
    try:
        return compile_template(template).render(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
