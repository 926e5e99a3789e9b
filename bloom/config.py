"""BloomConfig: the hyper-parameters of a BLOOM checkpoint, read from and written to `config.json`."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Older BLOOM configs (bloom-176b, the Megatron conversions) spell some keys differently.
_KEY_ALIASES = {"n_embed": "hidden_size", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


@dataclass
class BloomConfig:
    """Same fields, defaults and meaning as transformers' `BloomConfig`.

    Keys of `config.json` that are not fields (Megatron training flags such as `masked_softmax_fusion`)
    are kept in `extra`, unused, and written back by `save_pretrained` so nothing is lost.
    """

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    unk_token_id: int | None = 0
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pretraining_tp: int = 1
    slow_but_exact: bool = False
    tie_word_embeddings: bool = True
    # Task heads.
    num_labels: int | None = None  # derived from id2label when not given; 2 when neither is
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    # Bookkeeping carried through save/load.
    torch_dtype: str | None = None
    architectures: list[str] | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    model_type = "bloom"

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.num_labels is None:
            self.num_labels = len(self.id2label) if self.id2label else 2
        if self.id2label is None or len(self.id2label) != self.num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or set(self.label2id) != set(self.id2label.values()):
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        self.validate()

    # --- aliases the reference exposes through its attribute_map ---
    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "pretraining_tp", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BloomConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise ValueError(
                f"BloomConfig.hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head})"
            )
        if self.slow_but_exact and self.pretraining_tp > 1 and self.hidden_size % self.pretraining_tp:
            raise ValueError(
                f"BloomConfig.hidden_size ({self.hidden_size}) must be divisible by pretraining_tp "
                f"({self.pretraining_tp}) when slow_but_exact is set"
            )
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"BloomConfig.{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"BloomConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"BloomConfig.problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"BloomConfig.{name} ({value}) is outside the vocabulary (size {self.vocab_size})")

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "BloomConfig":
        """Build from a `config.json` dict; old key spellings are accepted, unknown keys kept in `extra`."""
        values = dict(values)
        values.pop("model_type", None)
        # Labels overridden one way replace the file's labels the other way too (a new head's size).
        if "id2label" in overrides or "num_labels" in overrides:
            for key in ("num_labels", "id2label", "label2id"):
                if key not in overrides:
                    values.pop(key, None)
        values.update(overrides)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs, extra = {}, dict(values.pop("extra", {}) or {})
        for key, value in values.items():
            key = _KEY_ALIASES.get(key, key)
            if key == "dtype":  # transformers >= 5 writes `dtype`, older versions `torch_dtype`
                key = "torch_dtype"
            if key in known:
                kwargs[key] = value
            else:
                extra[key] = value
        # A list of eos ids is allowed by the reference; generation takes the first as the default.
        if isinstance(kwargs.get("eos_token_id"), list):
            extra["eos_token_ids"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> "BloomConfig":
        """Read `<directory>/config.json`; keyword overrides win over the file."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {directory!s}: not a BLOOM checkpoint directory")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        if values.get("model_type", "bloom") != "bloom":
            raise ValueError(f"{path} describes a {values['model_type']!r} model, not 'bloom'")
        return cls.from_dict(values, **overrides)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = self.model_type
        if out["architectures"] is None:
            del out["architectures"]
        if out["torch_dtype"] is None:
            del out["torch_dtype"]
        return {**self.extra, **out}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` (readable by transformers' `BloomConfig.from_pretrained`)."""
        os.makedirs(directory, exist_ok=True)
        write_atomic(Path(directory) / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file (unique, synced to disk) and rename, so a reader never sees half a
    file, and concurrent writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
