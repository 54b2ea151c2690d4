"""The models, all of them, top to bottom: GPT-2's block (`GPT`) and the Llama-style block (`Llama`).

Design choices:
- `build_model(config)` picks the class `config.arch` names; both offer the same methods (forward,
  forward_cached, optimizer_groups, block_matrices, flops_per_token), so nothing else asks which.
- GPT-2's architecture: learned position embeddings, pre-LayerNorm blocks, GELU MLP of width 4x,
  a final LayerNorm, and the output head tied to the token embedding.
- The Llama block (Llama, SmolLM2, TinyLlama): rotary positions applied to queries and keys,
  RMSNorm, a SwiGLU MLP, no biases, grouped-query attention (`n_kv_head` key/value heads, each
  serving n_head / n_kv_head query heads), a tied or untied head, and optionally a per-head RMSNorm
  of queries and keys (QK-norm, as Qwen3 and OLMo 2). Its parameter names are Hugging Face
  `LlamaForCausalLM`'s, and rotary embeddings rotate the two halves of each head as HF does, so its
  weights are HF's as they are.
- Parameter names are Hugging Face GPT-2's (`transformer.h.0.attn.c_attn.weight`, ...), so moving
  weights to or from `GPT2LMHeadModel` is a copy plus a transpose (HF stores Conv1D as (in, out)).
- Attention goes through `F.scaled_dot_product_attention` with `is_causal=True`: flash or
  memory-efficient kernels where the device has them; the causal mask is implicit.
- `forward(idx)` always returns logits for every position, (B, T, vocab); the loss is computed by
  the caller, so the output never changes shape with the arguments. Training on a GPU scores a
  vocabulary padded to a multiple of 64 and returns the first `vocab` columns (a view).
- Optional biases (nanoGPT found them unneeded for small models), optional dropout.
- Generation has its own entry, `forward_cached(idx, cache)`: the same blocks written out flat with
  functional calls, reading and extending a KV cache (the engine's `KVCache`: `pos`, `advance(n)`,
  `update(layer, k, v)` for a window; `step_positions()`, `write_step(layer, k, v)` and `step_mask()` for one
  token per row, see `decode_step`),
  returning the logits of the last position only, (B, vocab). At one token per step a small model's cost is Python overhead, not arithmetic: each
  module call costs ~7 us here against ~11 us for a 128x384 matmul, and the flat path decodes the
  cpu-tiny shape about twice as fast as calling the modules. It is for inference only (no dropout,
  no gradients to the transposed copies described at `_DecodeTensors`); tests hold it equal to
  `forward` within 1e-5.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptlab.config import ModelConfig
from gptlab.quantize import Int8Weight, int8_linear, quantize_int8


class LanguageModel(nn.Module):
    """What GPT and Llama share: parameter counting, optimizer groups, the flat decode path's bookkeeping."""

    arch: str  # the `ModelConfig.arch` the class builds
    _decode: Any = None
    decode_weights = "float"  # or "int8": the decode path's matrices (gptlab/quantize.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a model")
        if config.arch != self.arch:
            raise ValueError(f"{type(self).__name__} builds the {self.arch} block, not {config.arch!r}; use build_model(config)")
        self.config = config

    def train(self, mode: bool = True) -> LanguageModel:
        """Switch to training (or eval) mode; training forgets the decode path's gathered tensors.

        Optimizers may update parameters without bumping their in-place version (torch's fused
        AdamW does not), so the version stamp alone would keep a decode copy of old weights across
        training steps: a sample drawn between steps would come from the weights of the first one.
        """
        if mode:
            self._decode = None
        return super().train(mode)

    def num_params(self) -> int:
        """Parameters, with a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def optimizer_groups(self, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
        """AdamW parameter groups: decay matrices and embeddings, not biases or norm gains.

        `exclude` holds the `id()`s of parameters another optimizer takes care of.
        """
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in exclude]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per parameter plus attention (PaLM appendix B)."""
        c = self.config
        n = self.num_params() - (c.block_size * c.n_embd if c.arch == "gpt2" else 0)  # a position lookup is free
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def _check_length(self, T: int) -> None:
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the context length {self.config.block_size}")

    def _check_cached(self, T: int, start: int) -> None:
        if start + T > self.config.block_size:
            raise ValueError(f"positions {start}..{start + T - 1} run past the context length {self.config.block_size}")

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final hidden states (on a GPU in training, against a vocabulary padded to a multiple of 64)."""
        if self.training and x.is_cuda:
            return padded_linear(x, self.lm_head.weight)
        return self.lm_head(x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU, project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate=self.approximate)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(LanguageModel):
    """A GPT-2-style decoder-only language model."""

    arch = "gpt2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the same matrix reads tokens in and scores them out (GPT-2, Press & Wolf 2017).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T), T <= block_size."""
        B, T = idx.size()
        self._check_length(T)
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self._head(x)  # (B, T, vocab_size)

    def forward_cached(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits (B, vocab_size) of the last position of `idx` (B, T), reading and extending `cache`.

        Either `cache` is empty and `idx` is a whole window (attention is causal within it), or `idx`
        is one new token per row that attends to every cached position. Inference only: no dropout.
        """
        B, T = idx.size()
        start = cache.pos
        self._check_cached(T, start)
        if start == 0 or self._decode is None:
            self._decode = _DecodeTensors.refresh(self, self._decode)
        if T == 1 and start > 0:
            return self.decode_step(idx, cache)
        C, nh, eps = self.config.n_embd, self.config.n_head, self.config.norm_eps
        d = self._decode
        # Rows are (B*T, C) throughout, so every linear is one matmul. Slicing the position table is
        # the same lookup as wpe(arange) without building an index tensor.
        x = (torch.embedding(d.wte, idx) + d.wpe[start : start + T]).view(B * T, C)
        for layer, (ln_1, attn, proj, ln_2, fc, mlp_proj, act) in enumerate(d.layers):
            h = torch.layer_norm(x, (C,), *ln_1, eps)
            q, k, v = _linear(h, *attn).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
            k, v = cache.update(layer, k, v)  # (B, nh, cached + T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
            x = _linear(y.transpose(1, 2).reshape(B * T, C), *proj, residual=x)
            h = act(_linear(torch.layer_norm(x, (C,), *ln_2, eps), *fc))
            x = _linear(h, *mlp_proj, residual=x)
        cache.advance(T)
        x = torch.layer_norm(x.view(B, T, C)[:, -1, :], (C,), *d.ln_f, eps)  # only the last position  (B, C)
        return _linear(x, *d.head)  # (B, vocab_size)

    def decode_step(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits (B, vocab_size) for one new token per row, `idx` (B, 1), after a prefill: the step the decode loop repeats.

        The cache says where each row is (`step_positions()`: one int for every row, or a (B,) tensor
        when rows of a batch sit at different positions), stores the new keys and values
        (`write_step`) and gives the mask of what each row sees (`step_mask()`). Attention reads the
        whole preallocated cache under that mask rather than a narrowed view of it: SDPA runs a
        contiguous cache faster, and the mask is one row of a table made once per cache, so a step
        costs fewer and cheaper ops (cpu-tiny: ~1.4x more tokens/s).
        """
        if self._decode is None:
            self._decode = _DecodeTensors.refresh(self, None)
        B = idx.size(0)
        C, nh, eps = self.config.n_embd, self.config.n_head, self.config.norm_eps
        d = self._decode
        pos = cache.step_positions()
        x = torch.embedding(d.wte, idx.view(B)) + (d.wpe_rows[pos] if isinstance(pos, int) else torch.embedding(d.wpe, pos))
        visible = cache.step_mask()  # (1 or B, 1, 1, cached positions)
        for layer, (ln_1, attn, proj, ln_2, fc, mlp_proj, act) in enumerate(d.layers):
            h = torch.layer_norm(x, (C,), *ln_1, eps)
            q, k, v = _linear(h, *attn).view(B, 3, nh, 1, C // nh).unbind(1)  # (B, nh, 1, hs)
            k, v = cache.write_step(layer, k, v)  # (B, nh, cached positions, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, nh, 1, hs)
            x = _linear(y.view(B, C), *proj, residual=x)
            h = act(_linear(torch.layer_norm(x, (C,), *ln_2, eps), *fc))
            x = _linear(h, *mlp_proj, residual=x)
        cache.advance(1)
        return _linear(torch.layer_norm(x, (C,), *d.ln_f, eps), *d.head)  # (B, vocab_size)

    def block_matrices(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The blocks' 2-D weights: the fused query/key/value matrices, and all the others (what Muon takes)."""
        qkv = [block.attn.c_attn.weight for block in self.transformer.h]
        fused = {id(p) for p in qkv}
        other = [p for block in self.transformer.h for p in block.parameters() if p.dim() == 2 and id(p) not in fused]
        return qkv, other


# ---- the Llama-style block ----

def rope_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's rotation as two (length, head_size) float32 tables for `apply_rope` (HF's frequencies):
    cos of the angles repeated over both halves of a head, and sin with the first half negated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return torch.cat((angles.cos(), angles.cos()), dim=-1), torch.cat((-angles.sin(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's i-th and (i + hs/2)-th coordinates as a pair by its frequency's angle: x (..., T, hs).

    HF's `x * cos + rotate_half(x) * sin` in three ops: rolling a head by half its width swaps the halves,
    and the sign rotate_half puts on the first half sits in the table.
    """
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


class LlamaAttention(nn.Module):
    """Causal self-attention with rotary positions, grouped-query heads and optional QK-norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, hs = config.n_embd, config.head_size
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, hs
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_head * hs, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_head * hs, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(hs, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(hs, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hs)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class SwiGLU(nn.Module):
    """The gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.hidden, bias=False)
        self.down_proj = nn.Linear(config.hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LanguageModel):
    """A Llama-style decoder-only language model, under Hugging Face LlamaForCausalLM's parameter names."""

    arch = "llama"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
                norm=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not parameters and not saved: they follow from the config (and move with .to(device)).
        cos, sin = rope_tables(config.head_size, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(GPT._init_weights)
        for name, p in self.named_parameters():  # the residual projections, scaled as GPT-2's
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T), T <= block_size."""
        B, T = idx.size()
        self._check_length(T)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs/2)
        x = self.drop(self.model.embed_tokens(idx))  # (B, T, C)
        for block in self.model.layers:
            x = block(x, cos, sin)
        x = self.model.norm(x)
        return self._head(x)  # (B, T, vocab_size)

    def forward_cached(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits (B, vocab_size) of the last position of `idx` (B, T), reading and extending `cache`.

        As `GPT.forward_cached`: a whole window into an empty cache, or one token per row after it.
        Cached keys are stored rotated, at the positions they were computed for.
        """
        B, T = idx.size()
        start = cache.pos
        self._check_cached(T, start)
        if start == 0 or self._decode is None:
            self._decode = _LlamaDecodeTensors.refresh(self, self._decode)
        if T == 1 and start > 0:
            return self.decode_step(idx, cache)
        d = self._decode
        c = self.config
        C, nh, nkv, eps = c.n_embd, c.n_head, c.kv_heads, c.norm_eps
        cos, sin = d.cos[start : start + T], d.sin[start : start + T]
        x = torch.embedding(d.wte, idx).view(B * T, C)  # rows are (B*T, C) throughout: one matmul per linear
        for layer, (ln_1, qkv, qk_norm, proj, ln_2, gate_up, down) in enumerate(d.layers):
            q, k, v = self._qkv(x, B, T, qkv, qk_norm, ln_1, cos, sin)
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=nkv != nh)
            x = self._mlp(_linear(y.transpose(1, 2).reshape(B * T, C), *proj, residual=x), ln_2, gate_up, down)
        cache.advance(T)
        x = F.rms_norm(x.view(B, T, C)[:, -1, :], (C,), d.norm, eps)  # only the last position  (B, C)
        return _linear(x, *d.head)  # (B, vocab_size)

    def decode_step(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits (B, vocab_size) for one new token per row, `idx` (B, 1), after a prefill (see GPT.decode_step)."""
        if self._decode is None:
            self._decode = _LlamaDecodeTensors.refresh(self, None)
        d = self._decode
        c = self.config
        B, C, nh, nkv, eps = idx.size(0), c.n_embd, c.n_head, c.kv_heads, c.norm_eps
        pos = cache.step_positions()
        if isinstance(pos, int):
            cos, sin = d.cos_rows[pos], d.sin_rows[pos]
        else:  # each row at its own position: (B, 1, 1, hs), broadcast over the heads
            cos, sin = d.cos[pos].view(B, 1, 1, -1), d.sin[pos].view(B, 1, 1, -1)
        visible = cache.step_mask()
        x = torch.embedding(d.wte, idx.view(B))
        for layer, (ln_1, qkv, qk_norm, proj, ln_2, gate_up, down) in enumerate(d.layers):
            q, k, v = self._qkv(x, B, 1, qkv, qk_norm, ln_1, cos, sin)
            k, v = cache.write_step(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=nkv != nh)
            x = self._mlp(_linear(y.reshape(B, C), *proj, residual=x), ln_2, gate_up, down)
        cache.advance(1)
        return _linear(F.rms_norm(x, (C,), d.norm, eps), *d.head)  # (B, vocab_size)

    def _qkv(self, x: torch.Tensor, B: int, T: int, qkv: tuple, qk_norm: torch.Tensor | None, ln_1: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (B, nh, T, hs) and keys (B, nkv, T, hs), and values, of rows `x` (B*T, C)."""
        c = self.config
        nh, nkv, hs, eps = c.n_head, c.kv_heads, c.head_size, c.norm_eps
        h = _linear(F.rms_norm(x, (c.n_embd,), ln_1, eps), *qkv).view(B, T, nh + 2 * nkv, hs).transpose(1, 2)
        qk, v = h.split((nh + nkv, nkv), dim=1)  # (B, heads, T, hs): queries and keys are rotated together
        if qk_norm is not None:
            qk = F.rms_norm(qk, (hs,), None, eps) * qk_norm
        q, k = apply_rope(qk, cos, sin).split((nh, nkv), dim=1)
        return q, k, v

    def _mlp(self, x: torch.Tensor, ln_2: torch.Tensor, gate_up: tuple, down: tuple) -> torch.Tensor:
        """x + the SwiGLU MLP of norm(x), for rows (N, C)."""
        gate, up = _linear(F.rms_norm(x, (self.config.n_embd,), ln_2, self.config.norm_eps), *gate_up).chunk(2, dim=1)
        return _linear(F.silu(gate) * up, *down, residual=x)

    def block_matrices(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The blocks' 2-D weights: (none fused, all of them), as GPT.block_matrices gives them to Muon."""
        return [], [p for block in self.model.layers for p in block.parameters() if p.dim() == 2]


def padded_linear(x: torch.Tensor, weight: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """x @ weight.T, computed against weight padded with zero rows to a multiple of `multiple`.

    GPU matmuls want a vocabulary that is a multiple of 64 (50257 -> 50304); the padded scores are
    cut off again (a view), so the maths and the stored weights stay those of the real vocabulary.
    """
    rows = weight.size(0)
    if rows % multiple == 0:
        return F.linear(x, weight)
    return F.linear(x, F.pad(weight, (0, 0, 0, -rows % multiple)))[..., :rows]


def _linear(
    x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None, transposed: bool,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + x @ W.T + b, from W (out, in), from a transposed copy (in, out), or from int8 rows."""
    if isinstance(weight, Int8Weight):
        out = int8_linear(x, weight)
        if bias is not None:
            out += bias
        return out if residual is None else out.add_(residual)
    if bias is None and residual is not None:  # one addmm adds the residual stream for free
        return torch.addmm(residual, x, weight if transposed else weight.t())
    if transposed:
        out = torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    else:
        out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


def _erf_gelu(u: torch.Tensor) -> torch.Tensor:
    """sqrt(2) * gelu(sqrt(2) * u): exact GELU with its two sqrt(2) factors folded into the weights around it."""
    return torch.addcmul(u, u, torch.erf(u))


def _decode_linear(module: nn.Linear | None, on_cpu: bool, weight: torch.Tensor | None = None, scale: float = 1.0,
                   scale_bias: bool = False, int8: bool = False) -> tuple:
    """(weight, bias, transposed) for `_linear`: on the CPU, matrices with at least as many outputs as
    inputs kept transposed (see _DecodeTensors), or all of them as int8 rows; `weight` replaces the
    module's (a fused copy)."""
    w = (module.weight if weight is None else weight).detach()
    bias = module.bias if module is not None else None
    if scale != 1.0:
        w = w * scale
        bias = bias * scale if bias is not None and scale_bias else bias
    if int8:
        return quantize_int8(w), bias, False
    transposed = on_cpu and w.size(0) >= w.size(1)
    return (w.t().contiguous() if transposed else w, bias, transposed)


class _Refreshable:
    """Tensors gathered once from a model for its decode path, rebuilt when a parameter changed."""

    stamp: tuple

    @staticmethod
    def stamp_of(model: nn.Module) -> tuple:
        """Identity, storage and in-place version of every parameter."""
        return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())

    @classmethod
    def refresh(cls, model: Any, current: Any) -> Any:
        """`current` if the parameters are unchanged since it was made, else a new one."""
        if current is not None and current.stamp == cls.stamp_of(model):
            return current
        return cls(model)  # type: ignore[call-arg]


class _DecodeTensors(_Refreshable):
    """What `forward_cached` reads, gathered once instead of ~120 module attribute lookups (~1 us each)
    per step of the cpu-tiny shape; rebuilt when a parameter has been replaced or changed in place.

    On the CPU, matrices with at least as many outputs as inputs are also kept transposed, (in, out):
    MKL's one-row matmul streams that layout faster. Measured for GPT-2 124M, one thread: c_attn
    597 -> 390 us, c_fc 789 -> 577 us, the output head 11.3 -> 6.6 ms (MLP c_proj, 768 from 3072,
    is faster as it is and stays). The copies add ~75% to the weights' memory while they live.

    Exact GELU on the CPU is rewritten around erf: with u = z / sqrt(2) (folded into c_fc's copy),
    gelu(z) = (u + u * erf(u)) / sqrt(2), and the last 1 / sqrt(2) is folded into a copy of the MLP's
    c_proj. Two cheap ops replace torch's gelu, whose fixed cost is ~10 us per call at any size
    (cpu-tiny: 4 of them per token). The results agree with gelu to float32 rounding.
    """

    def __init__(self, model: GPT) -> None:
        t = model.transformer
        on_cpu = t.wte.weight.device.type == "cpu"
        self.stamp = self.stamp_of(model)

        int8 = model.decode_weights == "int8"

        def linear(module: nn.Linear, scale: float = 1.0, scale_bias: bool = False) -> tuple:
            return _decode_linear(module, on_cpu, scale=scale, scale_bias=scale_bias, int8=int8)

        def mlp(b: Block) -> tuple:
            if on_cpu and b.mlp.approximate == "none":
                s = 0.5**0.5
                return linear(b.mlp.c_fc, s, scale_bias=True), linear(b.mlp.c_proj, s), _erf_gelu
            return linear(b.mlp.c_fc), linear(b.mlp.c_proj), partial(F.gelu, approximate=b.mlp.approximate)

        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.wpe_rows = list(self.wpe.detach().unbind(0))  # one position's row without an indexing op
        self.layers = [
            ((b.ln_1.weight, b.ln_1.bias), linear(b.attn.c_attn), linear(b.attn.c_proj), (b.ln_2.weight, b.ln_2.bias),
             *mlp(b))
            for b in t.h
        ]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.head = linear(model.lm_head)


class _LlamaDecodeTensors(_Refreshable):
    """What `Llama.forward_cached` reads: per layer the query/key/value matrices fused into one and
    gate/up into one (one matmul each per step), laid out as `_DecodeTensors` lays GPT's out."""

    def __init__(self, model: Llama) -> None:
        m = model.model
        on_cpu = m.embed_tokens.weight.device.type == "cpu"
        self.stamp = self.stamp_of(model)
        linear = partial(_decode_linear, on_cpu=on_cpu, int8=model.decode_weights == "int8")
        self.wte = m.embed_tokens.weight
        self.cos, self.sin = model.rope_cos, model.rope_sin
        self.cos_rows, self.sin_rows = list(self.cos.unbind(0)), list(self.sin.unbind(0))
        self.layers = []
        for b in m.layers:
            a = b.self_attn
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
            gate_up = torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]).detach()
            qk_norm = None  # each query head's gain, then each key head's: (nh + nkv, 1, hs)
            if a.qk_norm:
                qk_norm = torch.cat([a.q_norm.weight.expand(a.n_head, -1), a.k_norm.weight.expand(a.n_kv_head, -1)])
                qk_norm = qk_norm.detach().unsqueeze(1)
            self.layers.append((b.input_layernorm.weight, linear(None, weight=qkv), qk_norm, linear(a.o_proj),
                                b.post_attention_layernorm.weight, linear(None, weight=gate_up), linear(b.mlp.down_proj)))
        self.norm = m.norm.weight
        self.head = linear(model.lm_head)


MODELS: dict[str, type[LanguageModel]] = {"gpt2": GPT, "llama": Llama}


def build_model(config: ModelConfig) -> LanguageModel:
    """The model `config.arch` names, freshly initialised."""
    return MODELS[config.arch](config)
