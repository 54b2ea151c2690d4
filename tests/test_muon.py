"""Muon: the orthogonalisation, the update rule, and training and resuming with --optimizer muon."""

from __future__ import annotations

import pytest
import torch

from gptlab.checkpoint import read_weights
from gptlab.config import resolve_config
from gptlab.errors import GptlabError
from gptlab.muon import Muon, OptimizerSet, orthogonalize
from gptlab.optim import make_optimizer
from gptlab.train import train

from .conftest import TINY_MODEL


def muon_cfg(data, out, **kw):
    settings = dict(**TINY_MODEL, data=str(data), out=str(out), batch_size=8, max_iters=20, eval_interval=10,
                    eval_iters=2, num_samples=0, warmup_iters=2, learning_rate=3e-3, optimizer="muon")
    settings.update(kw)
    return resolve_config(overrides=settings)


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 128)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    small, big = min(shape), max(shape)
    u, _ = torch.linalg.qr(torch.randn(big, small))
    v, _ = torch.linalg.qr(torch.randn(small, small))
    g = (u * torch.logspace(-1.5, 0, small)) @ v  # singular values from 0.03 to 1: condition number 32
    if shape[0] < shape[1]:
        g = g.T
    assert g.shape == shape
    s = torch.linalg.svdvals(orthogonalize(g, steps=5))
    assert s.min() > 0.6 and s.max() < 1.2, s  # the quintic iteration lands in a band around 1, by design
    assert torch.allclose(orthogonalize(g * 1000, steps=5), orthogonalize(g, steps=5), atol=1e-5)  # scale-free


def test_orthogonalize_batched_equals_one_at_a_time():
    torch.manual_seed(1)
    g = torch.randn(4, 48, 16)
    batched = orthogonalize(g, steps=3)
    for i in range(4):
        assert torch.allclose(batched[i], orthogonalize(g[i], steps=3), atol=1e-6)


def test_muon_step_is_the_documented_rule():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(96, 32))
    start = w.detach().clone()
    grads = [torch.randn(96, 32) for _ in range(2)]
    opt = Muon([{"params": [w], "split": 3}], lr=0.1, momentum=0.9, weight_decay=0.5, ns_steps=3)
    expected, buf = start.clone(), torch.zeros(96, 32)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        direction = (g + 0.9 * buf).view(3, 32, 32)  # Nesterov, then three square blocks
        update = orthogonalize(direction, steps=3).reshape(96, 32)
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * 0.2 * 32**0.5 * update
    assert torch.allclose(w.detach(), expected, atol=1e-5)


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="split"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(10, 4))], "split": 3}])


def test_muon_takes_the_block_matrices_and_adamw_the_rest(char_data, tmp_path):
    from gptlab.model import GPT

    model_cfg, cfg = muon_cfg(char_data, tmp_path / "r")
    model = GPT(model_cfg.__class__(**{**model_cfg.__dict__, "vocab_size": 65}))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, OptimizerSet)
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert "transformer.wte.weight" in in_adamw  # the tied embedding and head stay with AdamW
    assert [g["split"] for g in muon.param_groups] == [3, 1]  # c_attn holds query, key and value


def test_muon_learns_faster_than_adamw_in_the_same_steps(tmp_path, char_data):
    settings = dict(max_iters=100, eval_interval=100, eval_iters=8)
    muon = train(*muon_cfg(char_data, tmp_path / "m", **settings), quiet=True)
    adamw = train(*muon_cfg(char_data, tmp_path / "a", optimizer="adamw", **settings), quiet=True)
    assert muon.final_val_loss < adamw.final_val_loss - 0.1, (muon.final_val_loss, adamw.final_val_loss)


def test_muon_run_resumes_exactly(tmp_path, char_data):
    train(*muon_cfg(char_data, tmp_path / "a", max_iters=20, lr_decay_iters=20), quiet=True)
    train(*muon_cfg(char_data, tmp_path / "b", max_iters=10, lr_decay_iters=20), quiet=True)
    train(*muon_cfg(char_data, tmp_path / "b", max_iters=20, lr_decay_iters=20), resume=True, quiet=True)
    straight, _ = read_weights(tmp_path / "a" / "last.safetensors")
    resumed, _ = read_weights(tmp_path / "b" / "last.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resuming_with_the_other_optimizer_is_a_clear_error(tmp_path, char_data):
    train(*muon_cfg(char_data, tmp_path / "r", max_iters=10), quiet=True)
    with pytest.raises(GptlabError, match="--optimizer adamw"):
        train(*muon_cfg(char_data, tmp_path / "r", max_iters=20, optimizer="adamw"), resume=True, quiet=True)


def test_unknown_optimizer_is_refused():
    with pytest.raises(GptlabError, match="--optimizer must be adamw or muon"):
        resolve_config(overrides=dict(optimizer="sgd"))
    with pytest.raises(GptlabError, match="--muon-lr"):
        resolve_config(overrides=dict(muon_lr=-1.0))
