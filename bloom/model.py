"""BLOOM in plain PyTorch, read top-down: ALiBi → attention → MLP → block → BloomModel → task heads.

Numerically this follows transformers' `modeling_bloom.py` (the reference); every place where BLOOM
differs from a textbook GPT is commented once, where it happens.
Shapes: B batch, T new tokens, S all tokens seen (cache + new), H heads, D head_dim, C hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .config import BloomConfig
from .generation import GenerationMixin, KVCache
from .loading import load_pretrained, save_pretrained
from .packing import PackedLinear, pack_for_cpu
from .quant import quantize_int8

# ----------------------------------------------------------------------------- ALiBi and masks


def alibi_slopes(n_head: int) -> torch.Tensor:
    """(H,) fp32. Geometric slopes 2^(-8i/n); for a head count that is not a power of two, the
    slopes of the nearest lower power of two are followed by every other slope of the next one."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_head:
        extra_base = 2.0 ** (-8.0 / (2 * closest))
        slopes += [extra_base ** (2 * i + 1) for i in range(n_head - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_bias(attention_mask: torch.Tensor, n_new: int, n_head: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi plus the causal and padding mask, added to the attention scores of every layer.

    attention_mask: (B, S) of 1 for real tokens, 0 for padding, covering cache and new tokens.
    Returns (B, H, T, S) in `dtype`, T = n_new.
    """
    B, S = attention_mask.shape
    mask = attention_mask.to(torch.int64)
    # BLOOM's ALiBi positions count only real tokens (cumulative sum of the mask), so a left-padded
    # row gets the same biases as the same text unpadded. Bias is slope * key position; the reference
    # drops the "- query position" term, which softmax cancels.
    positions = ((mask.cumsum(-1) - 1) * mask).to(torch.float32)  # (B, S)
    slopes = alibi_slopes(n_head).to(attention_mask.device)
    # The reference rounds ALiBi to the model dtype before adding it to the scores; so do we.
    alibi = (slopes[None, :, None] * positions[:, None, :]).to(dtype)  # (B, H, S)
    # New token t sits at absolute index S - T + t and may see keys up to that index.
    q_index = torch.arange(S - n_new, S, device=attention_mask.device)
    k_index = torch.arange(S, device=attention_mask.device)
    visible = (k_index[None, :] <= q_index[:, None])[None] & mask.bool()[:, None, :]  # (B, T, S)
    bias = alibi[:, :, None, :].expand(B, n_head, n_new, S).clone()
    return bias.masked_fill_(~visible[:, None], torch.finfo(dtype).min)


def _tp_linear(x: torch.Tensor, linear: nn.Linear, tp: int) -> torch.Tensor:
    """`pretraining_tp` with `slow_but_exact`: sum the row-parallel slices one by one as Megatron's
    ranks did, to reproduce its rounding. Like the reference, this path adds no bias."""
    W = linear.weight
    step = W.shape[1] // tp
    out = torch.zeros(*x.shape[:-1], W.shape[0], dtype=x.dtype, device=x.device)
    for i in range(tp):
        out = out + F.linear(x[..., i * step : (i + 1) * step], W[:, i * step : (i + 1) * step])
    return out


# ----------------------------------------------------------------------------- fused epilogues
# Where the matmul is fast (AMX bf16) the passes over the activations after each product cost as much as
# the products: on such a machine a profile of the labeling forward showed GELU at 19% and the residual
# adds at 6%. A packed CPU layer (bloom.packing) lets oneDNN apply them to each output tile while it is
# still in cache, in fp32 before the tile is rounded to the model dtype (so bf16 rounds once where the
# reference rounds twice). Plain layers (GPU, training, float16) keep the separate ops.


def _fused(linear: nn.Module) -> bool:
    # Packed layers are inference-only; with grad enabled their own forward raises, so let it.
    return isinstance(linear, PackedLinear) and not torch.is_grad_enabled()


def _linear_gelu(linear: nn.Module, x: torch.Tensor, lora=None, where=None) -> torch.Tensor:
    """gelu_tanh(linear(x) + the LoRA term of `lora` at `where` (layer, name)), (..., in) -> (..., out).
    BLOOM uses the tanh approximation of GELU."""
    adapted = lora is not None and lora.touches(*where)
    if _fused(linear) and not adapted:
        return torch.ops.mkldnn._linear_pointwise(x, linear.packed_weight, linear.bias, "gelu", [], "tanh")
    y = linear(x)
    return F.gelu(lora.add_(*where, x, y) if adapted else y, approximate="tanh")


def _linear_residual(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor, tp: int, p_drop: float,
                     training: bool, lora=None, where=None) -> torch.Tensor:
    """residual + dropout(linear(x) + the LoRA term of `lora` at `where` (layer, name)), (B, T, C): the
    output projection of attention and of the MLP."""
    adapted = lora is not None and lora.touches(*where)
    if tp > 1:
        y = _tp_linear(x, linear, tp)
    elif _fused(linear):
        y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, linear.packed_weight, linear.bias, "add")
        # The LoRA term after the residual (PEFT adds it before): the fused epilogue is worth the rounding.
        return lora.add_(*where, x, y) if adapted else y
    else:
        y = linear(x)
    if adapted:  # PEFT's order: base output + LoRA term, then the residual
        lora.add_(*where, x, y)
    # In place on the fresh product: one (B, T, C) buffer fewer per layer (a + b == b + a bit for bit).
    return F.dropout(y, p_drop, training).add_(residual)


# ----------------------------------------------------------------------------- the transformer block


SDPA_MIN_KEYS_CPU = 256  # on CPU, attention over this many keys or fewer skips SDPA (see below)


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.layer_idx = layer_idx
        self.tp = config.pretraining_tp if config.slow_but_exact else 1
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, residual, bias, cache=None, head_mask=None, output_attentions=False, packed=None, lora=None):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        qkv = self.query_key_value(x)
        if lora is not None and lora.touches(self.layer_idx, "query_key_value"):
            lora.add_(self.layer_idx, "query_key_value", x, qkv)
        # BLOOM's fused QKV is laid out per head, (H, 3, D), not (3, H, D) as in GPT-2.
        qkv = qkv.view(B, T, H, 3, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # 3 x (B, H, T, D)
        if packed is not None:
            # Sequences of different lengths packed into one row (B = 1, no padding): `packed` stores their
            # keys and values and attends each over its own tokens (bloom.engine.PackedAttention), with
            # this same `attention`.
            y, probs = packed.attend(self.layer_idx, q, k, v, self.scale), None
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, D)
            p_drop = self.attention_dropout if self.training else 0.0
            y, probs = attention(q, k, v, bias, self.scale, p_drop, self.training, head_mask, output_attentions)
        y = y.transpose(1, 2).reshape(B, T, C)
        return _linear_residual(self.dense, y, residual, self.tp, self.hidden_dropout, self.training, lora,
                                (self.layer_idx, "dense")), probs


def attention(q, k, v, bias, scale: float, p_drop: float = 0.0, training: bool = False, head_mask=None,
              output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, T, D) over k, v (B, H, S, D) with the additive ALiBi-and-mask bias (B, H, T, S) →
    (y (B, H, T, D), the probabilities (B, H, T, S) or None where they were not formed)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    # SDPA's CPU kernel is slower than the plain product below for short keys (measured: 5.4 vs
    # 2.8 ms at B=8, H=16, T=S=128 in bf16) and faster for long ones (18 vs 31 ms at S=512).
    explicit = k.device.type == "cpu" and S <= SDPA_MIN_KEYS_CPU
    if not (output_attentions or head_mask is not None or explicit):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop), None
    # bias + scale * q k^T in one baddbmm, as the reference computes it (the bias is the
    # product's input, so no separate scale and add passes; bf16 rounds once). The reshapes
    # copy q (and k, v without a cache) once: the batched product needs (B*H)-major operands.
    scores = torch.baddbmm(bias.reshape(B * H, T, S), q.reshape(B * H, T, D),
                           k.reshape(B * H, S, D).transpose(1, 2), alpha=scale)  # (B*H, T, S)
    # Softmax in fp32 whatever the model dtype, as BLOOM was trained. Torch's softmax kernels
    # compute a bf16/fp16 input in fp32 and round only the result, which equals the reference's
    # softmax(dtype=float32).to(dtype) without its two full-size copies (tested).
    probs = torch.softmax(scores, -1).view(B, H, T, S)
    weights = F.dropout(probs, p_drop, training)
    if head_mask is not None:
        weights = weights * head_mask
    return torch.bmm(weights.view(B * H, T, S), v.reshape(B * H, S, D)).view(B, H, T, D), probs


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.tp = config.pretraining_tp if config.slow_but_exact else 1
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, residual, lora=None):
        h = _linear_gelu(self.dense_h_to_4h, x, lora, (self.layer_idx, "dense_h_to_4h"))  # (B, T, 4C)
        return _linear_residual(self.dense_4h_to_h, h, residual, self.tp, self.hidden_dropout, self.training, lora,
                                (self.layer_idx, "dense_4h_to_h"))


class BloomBlock(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config, layer_idx)
        self.post_ln_residual = config.apply_residual_connection_post_layernorm

    def forward(self, x, bias, cache=None, head_mask=None, output_attentions=False, packed=None, lora=None):
        h = self.input_layernorm(x)
        # `apply_residual_connection_post_layernorm`: the residual branch starts after the LayerNorm.
        x, probs = self.self_attention(
            h, h if self.post_ln_residual else x, bias, cache, head_mask, output_attentions, packed, lora
        )
        h = self.post_attention_layernorm(x)
        return self.mlp(h, h if self.post_ln_residual else x, lora), probs


# ----------------------------------------------------------------------------- outputs


class ModelOutput:
    """Dataclass base with the reference's access styles: `out.logits`, `out["logits"]` and
    `out[0]` (fields that are None are skipped, as in transformers)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(CausalLMOutputWithPast):
    pass


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------- the models


class BloomPreTrainedModel(nn.Module):
    """Common to all BLOOM classes: config, weight init, loading and saving."""

    base_model_prefix = "transformer"
    _no_split_modules = ["BloomBlock"]  # accelerate never splits a block across devices
    _head_names: tuple[str, ...] = ()  # weights that may be absent from a checkpoint (initialised, with a warning)

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "BloomPreTrainedModel":
        """Load a checkpoint directory in the Hugging Face layout (see `bloom.loading.load_pretrained` for
        dtype, device, device_map, max_memory, offload_folder and config overrides)."""
        return load_pretrained(cls, directory, **kwargs)

    def save_pretrained(self, directory, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors weights in the Hugging Face layout (`bloom.loading.save_pretrained`)."""
        save_pretrained(self, directory, max_shard_size)

    def pack_for_cpu(self) -> int:
        """Inference-only oneDNN-packed Linear weights on CPU; returns how many (`bloom.packing.pack_for_cpu`)."""
        return pack_for_cpu(self)

    def quantize_int8(self, lm_head: bool = True) -> int:
        """Weight-only int8 Linear weights (bfloat16 models); returns how many (`bloom.quant.quantize_int8`)."""
        return quantize_int8(self, lm_head)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The reference's initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def post_init(self) -> None:
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _return_dict(self, return_dict):
        return self.config.return_dict if return_dict is None else return_dict


class BloomModel(BloomPreTrainedModel):
    """The bare transformer: embeddings → blocks → final LayerNorm, returning hidden states (B, T, C)."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # BLOOM normalises the embeddings before the first block (for bf16 training stability).
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList([BloomBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: KVCache | None = None,
        packed=None,
        lora=None,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, S) over cache + new tokens,
        1 = real token (left or right padding both work); past_key_values a `KVCache` to extend
        (`cache=` is accepted as the name transformers >= 5 uses). head_mask (H,) or (L, H), 1 keeps a head.
        Returns last_hidden_state (B, T, C), the cache when use_cache, and per-layer
        hidden_states / attentions when asked.

        packed: several sequences' new tokens packed into one row (B = 1, no padding), for an object that
        holds their keys and values itself and attends each row over its own tokens, with its own masks and
        ALiBi positions: `packed.attend(layer, q, k, v, scale)` → (1, H, T, D) (the engine's
        `bloom.engine.PackedAttention`). No attention_mask, cache, head_mask or attentions then.

        lora: a `bloom.lora.LoraBatch` naming each row's LoRA adapter (or each packed token's, with packed=),
        none for the base model (`AdapterBank.batch`): rows with different adapters share the forward."""
        cfg = self.config
        past_key_values = past_key_values if past_key_values is not None else cache
        if packed is not None:
            if past_key_values is not None or attention_mask is not None or head_mask is not None or output_attentions:
                raise ValueError("packed= attends each packed sequence itself: pass no past_key_values, "
                                 "attention_mask, head_mask or output_attentions with it")
            use_cache = False
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.word_embeddings(input_ids)
        B, T, _ = inputs_embeds.shape
        if packed is not None and B != 1:
            raise ValueError(f"packed= takes one row of packed tokens, got a batch of {B}")
        if lora is not None:
            lora.check(B, T)
        # Any object with KVCache's surface (length, update, advance) serves as the cache.
        if past_key_values is not None and not callable(getattr(past_key_values, "update", None)):
            raise TypeError(
                f"past_key_values must be a bloom.KVCache, got {type(past_key_values).__name__} "
                "(it is the second positional argument: pass attention_mask by keyword)"
            )
        if use_cache and past_key_values is None:
            past_key_values = KVCache(cfg.n_layer)
        past = past_key_values.length if past_key_values is not None else 0
        if attention_mask is None and packed is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=inputs_embeds.device)
        elif packed is None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask must cover the cached and the new tokens: expected shape {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        x = self.word_embeddings_layernorm(inputs_embeds)
        # (B, H, T, S), shared by all layers
        bias = None if packed is not None else attention_bias(attention_mask.to(x.device), T, cfg.n_head, x.dtype)
        head_mask = _expand_head_mask(head_mask, cfg.n_layer, x)

        all_hidden, all_attn = [], []
        for i, block in enumerate(self.h):
            if output_hidden_states:
                all_hidden.append(x)
            x, probs = block(x, bias, past_key_values, head_mask[i], output_attentions, packed, lora)
            if output_attentions:
                all_attn.append(probs)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden.append(x)
        if past_key_values is not None:
            past_key_values.advance(T)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if self._return_dict(return_dict) else out.to_tuple()


def _expand_head_mask(head_mask, n_layer, x):
    """(H,) or (L, H) → per layer (1, H, 1, 1) multipliers of the attention probabilities, or Nones."""
    if head_mask is None:
        return [None] * n_layer
    head_mask = head_mask.to(device=x.device, dtype=x.dtype)
    if head_mask.dim() == 1:
        head_mask = head_mask.expand(n_layer, -1)
    return [m[None, :, None, None] for m in head_mask]


class _BloomWithHead(BloomPreTrainedModel):
    """A `transformer` (BloomModel) plus a small head module over its hidden states."""

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.transformer = BloomModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def _body(self, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states, **kw):
        return self.transformer(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kw,
        )

    def _finish(self, out: ModelOutput, return_dict):
        return out if self._return_dict(return_dict) else out.to_tuple()


class BloomForCausalLM(GenerationMixin, _BloomWithHead):
    """BLOOM with its language-model head: logits (B, T, vocab), the shifted LM loss when labels are given."""

    _head_names = ("lm_head",)

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def tie_weights(self) -> None:
        # BLOOM's output projection is the input embedding matrix (tie_word_embeddings).
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep: int = 0,
        cache=None,
        lora=None,
    ) -> CausalLMOutputWithPast | tuple:
        """As BloomModel (lora= included), plus labels (B, T) with -100 ignored (shifted inside, as the
        reference) and logits_to_keep: compute logits for only the last n positions (0 = all)."""
        body = self._body(
            input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states,
            past_key_values=past_key_values, cache=cache,
            head_mask=head_mask, use_cache=use_cache, lora=lora,
        )
        h = body.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            # Position t predicts token t+1.
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        out = CausalLMOutputWithPast(loss, logits, body.past_key_values, body.hidden_states, body.attentions)
        return self._finish(out, return_dict)


class BloomForSequenceClassification(_BloomWithHead):
    """Classifies a sequence from the hidden state of its last real token: logits (B, num_labels)."""

    _head_names = ("score",)

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        lora=None,
    ) -> SequenceClassifierOutputWithPast | tuple:
        """labels: (B,) class ids, (B, num_labels) multi-hot floats, or (B,) / (B, n) regression targets,
        the loss chosen by config.problem_type (inferred as the reference does when unset)."""
        # Labeling never continues from a classifier's cache: none is kept unless asked for (the reference
        # keeps one by default, wasting memory on every forward).
        body = self._body(
            input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states,
            past_key_values=past_key_values, cache=cache,
            head_mask=head_mask, use_cache=False if use_cache is None else use_cache, lora=lora,
        )
        logits = self.score(body.last_hidden_state)  # (B, T, num_labels)
        B, T = logits.shape[:2]
        last = self._last_token(input_ids, attention_mask, B, T, logits.device)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = None if labels is None else self._loss(pooled, labels.to(pooled.device))
        out = SequenceClassifierOutputWithPast(loss, pooled, body.past_key_values, body.hidden_states, body.attentions)
        return self._finish(out, return_dict)

    def _last_token(self, input_ids, attention_mask, B, T, device) -> torch.Tensor:
        """Index of the rightmost real token per row, (B,): from the attention mask when given (exact for
        left and right padding, and for inputs_embeds), else from pad_token_id as the reference does."""
        index = torch.arange(T, device=device)
        if attention_mask is not None:
            real = attention_mask[:, -T:].to(device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        elif B == 1 or input_ids is None:
            return torch.full((B,), T - 1, device=device)
        else:
            raise ValueError("a batch of more than one row needs an attention_mask or config.pad_token_id")
        return (index * real).argmax(-1)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.problem_type is None:
            if cfg.num_labels == 1:
                cfg.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                cfg.problem_type = "single_label_classification"
            else:
                cfg.problem_type = "multi_label_classification"
        if cfg.problem_type == "regression":
            if cfg.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if cfg.problem_type == "single_label_classification":
            return F.cross_entropy(logits, labels)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BloomForTokenClassification(_BloomWithHead):
    """Per-token labels (NER): logits (B, T, num_labels); labels (B, T) with -100 ignored."""

    _head_names = ("classifier",)

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        lora=None,
    ) -> TokenClassifierOutput | tuple:
        body = self._body(
            input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states,
            past_key_values=past_key_values, cache=cache,
            head_mask=head_mask, use_cache=False if use_cache is None else use_cache, lora=lora,
        )
        logits = self.classifier(self.dropout(body.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1))
        out = TokenClassifierOutput(loss, logits, body.hidden_states, body.attentions)
        return self._finish(out, return_dict)


class BloomForQuestionAnswering(_BloomWithHead):
    """Extractive QA: start_logits and end_logits (B, T) over the tokens of question + context."""

    _head_names = ("qa_outputs",)

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        head_mask=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        lora=None,
    ) -> QuestionAnsweringModelOutput | tuple:
        """start_positions / end_positions (B,): token indices of the answer span; positions outside
        the sequence are ignored by the loss, as in the reference."""
        body = self._body(
            input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states,
            head_mask=head_mask, use_cache=False, lora=lora,
        )
        start, end = self.qa_outputs(body.last_hidden_state).unbind(-1)  # (B, T) each
        start, end = start.contiguous(), end.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start.shape[1]
            losses = [
                F.cross_entropy(logits, pos.reshape(-1).to(logits.device).clamp(0, T), ignore_index=T)
                for logits, pos in ((start, start_positions), (end, end_positions))
            ]
            loss = (losses[0] + losses[1]) / 2
        out = QuestionAnsweringModelOutput(loss, start, end, body.hidden_states, body.attentions)
        return self._finish(out, return_dict)
