"""The tasks, each in one file: generate, classify, ner (with its spans), qa, embed; and the declaration of
every setting (`settings`).

A task says what it reads (input columns), which model it needs (class and head), what it writes (output
fields with fixed Arrow types), and how it labels prepared inputs, given a `Runtime` (model, tokenizer,
device, engine) and the effective settings. Which settings it reads, and which a request may set, come
from `settings.SETTINGS`. The replica, the job and the endpoint read these objects and never branch on
a task's name.
"""

from .base import COMMON_FIELDS, Runtime, Task, Templated, template_fields
from .classify import LABEL_SCORE, Classify
from .embed import Embed
from .generate import BYTE_OF, Generate, TokenTexts, timings, token_text
from .ner import ENTITY, Ner
from .qa import Qa

TASKS: dict[str, Task] = {t.name: t for t in (Generate(), Classify(), Ner(), Qa(), Embed())}

__all__ = ["BYTE_OF", "COMMON_FIELDS", "ENTITY", "LABEL_SCORE", "TASKS", "Classify", "Embed", "Generate", "Ner", "Qa",
           "Runtime", "Task", "Templated", "TokenTexts", "template_fields", "timings", "token_text"]
