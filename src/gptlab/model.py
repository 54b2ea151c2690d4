"""The GPT, all of it, top to bottom.

Design choices:
- GPT-2's architecture: learned position embeddings, pre-LayerNorm blocks, GELU MLP of width 4x,
  a final LayerNorm, and the output head tied to the token embedding.
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
  `update(layer, k, v)` for a window, `write(layer, pos, k, v)` and `visible(pos)` for one token),
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
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate=self.approximate)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder-only language model."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a GPT")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
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

    def num_params(self) -> int:
        """Parameters, with the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T), T <= block_size."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the context length {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.training and x.is_cuda:
            return padded_linear(x, self.lm_head.weight)
        return self.lm_head(x)  # (B, T, vocab_size)

    def forward_cached(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits (B, vocab_size) of the last position of `idx` (B, T), reading and extending `cache`.

        Either `cache` is empty and `idx` is a whole window (attention is causal within it), or `idx`
        is one new token per row that attends to every cached position. Inference only: no dropout.
        """
        B, T = idx.size()
        start = cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"positions {start}..{start + T - 1} run past the context length {self.config.block_size}")
        if start == 0 or self._decode is None:
            self._decode = _DecodeTensors.refresh(self, self._decode)
        if T == 1 and start > 0:
            return self._decode_one(idx, cache)
        C, nh = self.config.n_embd, self.config.n_head
        d = self._decode
        # Rows are (B*T, C) throughout, so every linear is one matmul. Slicing the position table is
        # the same lookup as wpe(arange) without building an index tensor.
        x = (torch.embedding(d.wte, idx) + d.wpe[start : start + T]).view(B * T, C)
        for layer, (ln_1, attn, proj, ln_2, fc, mlp_proj, act) in enumerate(d.layers):
            h = torch.layer_norm(x, (C,), *ln_1)
            q, k, v = _linear(h, *attn).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hs)
            k, v = cache.update(layer, k, v)  # (B, nh, cached + T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
            x = _linear(y.transpose(1, 2).reshape(B * T, C), *proj, residual=x)
            h = act(_linear(torch.layer_norm(x, (C,), *ln_2), *fc))
            x = _linear(h, *mlp_proj, residual=x)
        cache.advance(T)
        x = torch.layer_norm(x.view(B, T, C)[:, -1, :], (C,), *d.ln_f)  # only the last position  (B, C)
        return _linear(x, *d.head)  # (B, vocab_size)

    def _decode_one(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """`forward_cached` for one new token per row after the prefill: the step the decode loop repeats.

        Attention reads the whole preallocated cache under a mask of the filled positions rather than
        a narrowed view of it: SDPA runs a contiguous cache faster, and the mask is one row of a table
        made once per cache, so a step costs fewer and cheaper ops (cpu-tiny: ~1.4x more tokens/s).
        """
        B = idx.size(0)
        C, nh = self.config.n_embd, self.config.n_head
        d = self._decode
        n = cache.pos
        x = torch.embedding(d.wte, idx.view(B)) + d.wpe_rows[n]  # (B, C)
        visible = cache.visible(n)  # (1, 1, 1, max_len): positions 0..n
        for layer, (ln_1, attn, proj, ln_2, fc, mlp_proj, act) in enumerate(d.layers):
            h = torch.layer_norm(x, (C,), *ln_1)
            q, k, v = _linear(h, *attn).view(B, 3, nh, 1, C // nh).unbind(1)  # (B, nh, 1, hs)
            k, v = cache.write(layer, n, k, v)  # (B, nh, max_len, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, nh, 1, hs)
            x = _linear(y.view(B, C), *proj, residual=x)
            h = act(_linear(torch.layer_norm(x, (C,), *ln_2), *fc))
            x = _linear(h, *mlp_proj, residual=x)
        cache.advance(1)
        return _linear(torch.layer_norm(x, (C,), *d.ln_f), *d.head)  # (B, vocab_size)

    _decode: Any = None

    def optimizer_groups(self, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
        """AdamW parameter groups: decay matrices and embeddings, not biases or LayerNorm gains.

        `exclude` holds the `id()`s of parameters another optimizer takes care of.
        """
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in exclude]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def block_matrices(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The blocks' 2-D weights: the fused query/key/value matrices, and all the others (what Muon takes)."""
        qkv = [block.attn.c_attn.weight for block in self.transformer.h]
        fused = {id(p) for p in qkv}
        other = [p for block in self.transformer.h for p in block.parameters() if p.dim() == 2 and id(p) not in fused]
        return qkv, other

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per parameter plus attention (PaLM appendix B)."""
        c = self.config
        n = self.num_params() - c.block_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size


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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + x @ W.T + b, from W (out, in) or from a transposed copy (in, out)."""
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


class _DecodeTensors:
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

        def linear(module: nn.Linear, scale: float = 1.0, scale_bias: bool = False) -> tuple:
            w, bias = module.weight.detach(), module.bias
            if scale != 1.0:
                w = w * scale
                bias = bias * scale if bias is not None and scale_bias else bias
            transposed = on_cpu and w.size(0) >= w.size(1)
            return (w.t().contiguous() if transposed else w, bias, transposed)

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

    @staticmethod
    def stamp_of(model: GPT) -> tuple:
        """Identity, storage and in-place version of every parameter."""
        return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())

    @classmethod
    def refresh(cls, model: GPT, current: _DecodeTensors | None) -> _DecodeTensors:
        """`current` if the parameters are unchanged since it was made, else a new one."""
        if current is not None and current.stamp == cls.stamp_of(model):
            return current
        return cls(model)
