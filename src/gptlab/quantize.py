"""Weights for decoding in fewer bytes: int8 per output channel, and bfloat16.

Decoding one token reads every weight once, so at batch 1 its speed is memory bandwidth divided by
the bytes of weights: int8 reads a quarter of float32's bytes, bf16 half.

Design choices:
- int8 is weight-only and symmetric per output channel: each row of a (out, in) matrix is scaled so
  its largest magnitude maps to 127 (`scale = amax / 127`, rounded up to a bf16 number), then
  rounded. The matmul is torch's `_weight_int8pack_mm`, which multiplies by the int8 rows and
  applies the scales in one pass, without ever making a float copy of the matrix. Its inputs and
  outputs are bf16: with float32 ones this torch's CPU kernel is not vectorised (GPT-2's 2304 x 768
  matrix: 1,444 us against 115 us), so activations pass through bf16 for the matmul only (as
  llama.cpp's q8_0 rounds them to 8 bits) and come back in the model's dtype. The scales are bf16
  numbers, so the int8 model is exactly q * scale, whatever dtype reads it.
- Only the matrices of the linear layers and the output head are quantized. Embedding lookups read
  one row per token and stay as they are, and so do norms and biases (a few KB).
- A model loaded as int8 is the int8 model everywhere: its float weights are replaced by what int8
  stores (`fake_quantize_`), so `forward`, `gptlab eval --quantize int8` and the decode path compute
  the same function, and a tied embedding reads the same rows the head scores with. The quality
  cost is then the ordinary val loss and perplexity of that model.
- bf16 decoding is the whole model cast to bfloat16 (`load(..., weights="bf16")`): its cache and
  activations follow the parameters' dtype; sampling reads the logits in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gptlab.errors import GptlabError

KINDS = ("float32", "bf16", "int8")  # what `gptlab sample/serve --quantize` accept ("none" means float32)


class Int8Weight(NamedTuple):
    """A (out, in) matrix as int8 rows and one float scale per row: W ~ q * scales[:, None]."""

    q: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) bf16


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8 of a (out, in) matrix, with bf16 scales; a zero row gets scale 1 (its q is all zeros)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    exact = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    scales = exact.to(torch.bfloat16)
    low = scales.float() < exact  # rounded down: one bf16 step up, so amax still fits in 127 steps
    scales = torch.where(low, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return Int8Weight(q, scales)


def dequantize(w: Int8Weight) -> torch.Tensor:
    """The float (out, in) matrix an int8 one stands for."""
    return w.q.float() * w.scales.float()[:, None]


def int8_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x (N, in) @ W.T for an int8 W: (N, out), in x's dtype (the matmul itself in bf16, see above)."""
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), w.q, w.scales).to(x.dtype)


def check_kind(kind: str | None, device: torch.device) -> str:
    """The weights kind to decode with (`None` and "none" are float32); a GptlabError naming the choices."""
    kind = "float32" if kind in (None, "none", "float32", "fp32") else kind
    if kind not in KINDS:
        raise GptlabError(f"--quantize must be one of none, bf16, int8; got {kind!r}")
    if kind == "int8" and device.type != "cpu":
        raise GptlabError(f"--quantize int8 decodes on the CPU; on {device.type} use --quantize bf16")
    return kind


def quantize_model_(model: torch.nn.Module, kind: str | None) -> torch.nn.Module:
    """Make `model` the `kind` model, in place: bf16 casts it; int8 rounds its linear weights to what int8
    stores (so `forward` and evaluation compute what decoding does) and gives its decode path int8 matrices."""
    device = next(model.parameters()).device
    kind = check_kind(kind, device)
    if kind == "bf16":
        model.to(torch.bfloat16)
    if kind == "int8":
        fake_quantize_(model)
    model.decode_weights = "int8" if kind == "int8" else "float"
    model._decode = None  # gathered again, in the new kind, at the next prefill
    return model


@torch.no_grad()
def fake_quantize_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every weight the int8 decode path quantizes by what int8 makes of it (quantizing again changes nothing)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(dequantize(quantize_int8(module.weight)).to(module.weight.dtype))
    return model
