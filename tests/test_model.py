"""The models (GPT-2's block and the Llama block): shapes, Hugging Face names, causality, weight tying, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gptlab.checkpoint import state_dict_for_saving
from gptlab.config import ModelConfig, TrainConfig
from gptlab.model import GPT, Llama, build_model
from gptlab.optim import make_optimizer

LLAMA = dict(arch="llama", n_head=4, n_kv_head=2)
ARCHS = pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])


def tiny(**kw):
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**cfg))


@ARCHS
def test_forward_returns_logits_for_every_position(arch):
    model = tiny(**arch)
    idx = torch.randint(0, 50, (3, 11))
    assert model(idx).shape == (3, 11, 50)


def test_build_model_picks_the_block_and_each_class_refuses_the_other():
    assert type(tiny()) is GPT and type(tiny(**LLAMA)) is Llama
    with pytest.raises(ValueError, match="build_model"):
        GPT(ModelConfig(vocab_size=50, **LLAMA))
    with pytest.raises(ValueError, match="build_model"):
        Llama(ModelConfig(vocab_size=50))


@pytest.mark.parametrize("kw", [{}, dict(bias=True), dict(mlp_hidden=48), LLAMA,
                                dict(arch="llama", n_kv_head=1, qk_norm=True, tie_embeddings=False, mlp_hidden=40)])
def test_config_states_every_saved_tensor_and_the_count(kw):
    model = tiny(**kw)
    assert model.config.param_shapes() == {k: tuple(v.shape) for k, v in state_dict_for_saving(model).items()}
    assert model.config.num_params() == model.num_params()


def test_llama_parameter_names_are_hugging_face_llamas():
    model = tiny(arch="llama", n_head=4, n_kv_head=1, tie_embeddings=False)
    names = set(model.state_dict())
    for name in ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.gate_proj.weight",
                 "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
                 "lm_head.weight"]:
        assert name in names
    assert not any(n.endswith(".bias") for n in names)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)  # one key head of 8 for four query heads
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" in state_dict_for_saving(model)
    tied = tiny(**LLAMA)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in state_dict_for_saving(tied)


def test_rotary_attention_depends_on_relative_positions_only():
    """One token attending to another scores the same wherever the pair sits: rotate both by the same offset."""
    from gptlab.model import apply_rope, rope_tables

    cos, sin = rope_tables(8, 40, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    def score(i, j):
        return (apply_rope(q.view(1, 8), cos[i:i + 1], sin[i:i + 1]) * apply_rope(k.view(1, 8), cos[j:j + 1], sin[j:j + 1])).sum()
    assert torch.allclose(score(5, 2), score(35, 32), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_llama_and_gpt2_configs_refuse_what_their_block_cannot_do():
    from gptlab.errors import GptlabError

    for kw, flag in [(dict(n_kv_head=2), "--n-kv-head"), (dict(qk_norm=True), "--qk-norm"),
                     (dict(tie_embeddings=False), "--no-tie-embeddings"),
                     (dict(arch="llama", n_head=4, n_kv_head=3), "does not divide"),
                     (dict(arch="llama", bias=True), "no biases"), (dict(arch="llama", n_head=2, n_embd=6), "even head size"),
                     (dict(arch="bert"), "--arch"), (dict(rope_theta=0.5), "--rope-theta"), (dict(norm_eps=0.0), "--norm-eps")]:
        with pytest.raises(GptlabError, match=flag):
            ModelConfig(**{"n_head": 4, **kw})


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


@ARCHS
def test_attention_is_causal(arch):
    model = tiny(**arch).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


@ARCHS
def test_initial_loss_is_close_to_uniform(arch):
    model = tiny(vocab_size=65, n_embd=64, **arch)
    idx, targets = torch.randint(0, 65, (8, 16)), torch.randint(0, 65, (8, 16))
    loss = F.cross_entropy(model(idx).view(-1, 65), targets.view(-1))
    assert abs(loss.item() - math.log(65)) < 0.15


@ARCHS
def test_overfits_one_batch(arch):
    model = tiny(**arch)
    idx = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 50), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@ARCHS
def test_dropout_only_in_training_mode(arch):
    model = tiny(dropout=0.5, **arch)
    idx = torch.randint(0, 50, (2, 10))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_both_optimizers_train_the_llama_block(optimizer):
    model = tiny(**LLAMA)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, learning_rate=3e-3, muon_lr=0.02), torch.device("cpu"))
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 50), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


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
