"""The GPT: shapes, Hugging Face names, causality, weight tying, and that it can learn."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from gptlab.config import ModelConfig
from gptlab.model import GPT


def tiny(**kw):
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(ModelConfig(**cfg))


def test_forward_returns_logits_for_every_position():
    model = tiny()
    idx = torch.randint(0, 50, (3, 11))
    assert model(idx).shape == (3, 11, 50)


def test_parameter_names_match_hugging_face_gpt2():
    names = set(tiny(bias=True).state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.weight", "transformer.h.1.mlp.c_fc.weight",
                 "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names


def test_no_bias_option_removes_biases():
    assert not any(n.endswith(".bias") for n in tiny(bias=False).state_dict())


def test_output_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_attention_is_causal():
    model = tiny().eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_initial_loss_is_close_to_uniform():
    model = tiny(vocab_size=65, n_embd=64)
    idx, targets = torch.randint(0, 65, (8, 16)), torch.randint(0, 65, (8, 16))
    loss = F.cross_entropy(model(idx).view(-1, 65), targets.view(-1))
    assert abs(loss.item() - math.log(65)) < 0.15


def test_overfits_one_batch():
    model = tiny()
    idx = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 50), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_dropout_only_in_training_mode():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 50, (2, 10))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_weight_decay_groups_split_matrices_from_vectors():
    model = tiny(bias=True)
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_vocab_padded_output_head_is_the_same_maths():
    from gptlab.model import padded_linear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(65, 16, requires_grad=True)
    padded = padded_linear(x, w)
    assert padded.shape == (2, 5, 65)
    plain = torch.nn.functional.linear(x, w)
    assert torch.allclose(padded, plain, atol=1e-6)
    g = torch.randn(2, 5, 65)
    (gx, gw) = torch.autograd.grad(padded, (x, w), g)
    (px, pw) = torch.autograd.grad(plain, (x, w), g)
    assert torch.allclose(gx, px, atol=1e-5) and torch.allclose(gw, pw, atol=1e-5)
    assert padded_linear(x, w[:64]).is_contiguous()  # already a multiple: no padding, no view
