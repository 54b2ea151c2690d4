"""The engine: KV cache against the full forward (both blocks), sliding windows, sampling functions, seeds, limits."""

from __future__ import annotations

import pytest
import torch

from gptlab.config import ModelConfig, SampleConfig
from gptlab.engine import (
    Engine,
    KVCache,
    apply_repetition_penalty,
    decode,
    decode_threads,
    draw,
    generate,
    make_generator,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from gptlab.errors import GptlabError
from gptlab.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


# The block designs the cached path must agree with the full forward for: GPT-2 (with and without
# biases), and Llama with grouped-query attention, and with QK-norm, an untied head and another theta.
VARIANTS = {
    "gpt2": dict(),
    "gpt2-bias": dict(bias=True),
    "llama-gqa": dict(arch="llama", n_head=4, n_kv_head=2),
    "llama-qk-norm": dict(arch="llama", n_head=4, n_kv_head=1, qk_norm=True, tie_embeddings=False, rope_theta=500.0),
}
ARCHS = ["gpt2", "llama-gqa", "llama-qk-norm"]


def tiny(block_size=64, vocab_size=50, n_layer=2, variant="gpt2", **kw):
    torch.manual_seed(0)
    settings = dict(n_layer=n_layer, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size)
    return build_model(ModelConfig(**{**settings, **VARIANTS[variant], **kw})).eval()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_matches_full_forward(variant):
    model = tiny(block_size=256, variant=variant)
    seq = torch.randint(0, 50, (1, 5))
    cache = KVCache.for_model(model, 1, 256)
    worst = 0.0
    with torch.inference_mode():
        logits = model.forward_cached(seq, cache)
        for _ in range(200):  # decode 200 tokens, comparing every step with a full recompute
            worst = max(worst, (logits - model(seq)[:, -1, :]).abs().max().item())
            nxt = logits.argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model.forward_cached(nxt, cache)
    assert seq.size(1) == 205 and cache.pos == 205
    assert worst < 1e-5


@pytest.mark.parametrize("variant", ARCHS)
def test_cached_path_follows_weights_changed_in_place(variant):
    model = tiny(block_size=32, variant=variant)
    seq = torch.randint(0, 50, (1, 9))
    with torch.inference_mode():
        model.forward_cached(seq, KVCache.for_model(model, 1, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        cached = model.forward_cached(seq, KVCache.for_model(model, 1, 32))
        assert torch.allclose(cached, model(seq)[:, -1, :], atol=1e-5)


@pytest.mark.parametrize("variant", ARCHS)
def test_samples_share_the_prefill_and_match_their_own_full_forward(variant):
    model = tiny(block_size=64, variant=variant)
    prompt = torch.randint(0, 50, (1, 7))
    cache = KVCache.for_model(model, 3, 64)
    with torch.inference_mode():
        first = model.forward_cached(prompt, cache).expand(3, -1)  # one row for the prompt
        nxt = torch.tensor([[1], [2], [3]])
        logits = model.forward_cached(nxt, cache)  # three rows from here on
        full = model(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, -1, :]
    assert torch.allclose(first, model(prompt)[:, -1, :].expand(3, -1), atol=1e-5)
    assert torch.allclose(logits, full, atol=1e-5)


def greedy_reference(model, prompt, n, slide):
    """Greedy decoding by full recompute over the window the engine is documented to use."""
    block = model.config.block_size
    seq = prompt[-block:]
    start, out = 0, []
    for _ in range(n):
        token = model(torch.tensor([seq[start:]]))[0, -1].argmax().item()
        out.append(token)
        seq.append(token)
        if len(seq) - start > block:
            start = len(seq) - (block - slide + 1)
    return out


@pytest.mark.parametrize("variant", ARCHS)
@pytest.mark.parametrize("slide", [1, 5, 8, 16])
def test_generation_past_the_context_slides_the_window(slide, variant):
    model = tiny(block_size=16, variant=variant)
    prompt = [3, 1, 4, 1, 5]
    engine = Engine(model, slide=slide)
    ids = engine.generate(prompt, SampleConfig(max_new_tokens=200, temperature=0))[0]
    assert len(ids) == 200  # 12 contexts' worth: rotary positions restart with every recomputed window
    with torch.inference_mode():
        assert ids == greedy_reference(model, prompt, 200, slide)


@pytest.mark.parametrize("variant", ARCHS)
def test_slide_1_is_nanogpt_sampling_exactly(variant):
    model = tiny(block_size=16, variant=variant)
    idx = torch.randint(0, 50, (2, 3))
    ours = generate(model, idx, 200, temperature=0.9, top_k=20, seed=5, slide=1)
    g = torch.Generator().manual_seed(5)
    ref = idx
    with torch.inference_mode():
        for _ in range(200):  # nanoGPT's loop: crop, recompute, sample
            logits = model(ref[:, -16:])[:, -1, :]
            ref = torch.cat([ref, sample_next(logits, g, 0.9, 20)], dim=1)
    assert torch.equal(ours, ref)


def test_prompt_longer_than_the_context_is_cropped_with_a_warning():
    model = tiny(block_size=16)
    prompt = list(range(40))
    with pytest.warns(UserWarning, match="using its last 16"):
        cropped = Engine(model).generate(prompt, SampleConfig(max_new_tokens=5, temperature=0))
    assert cropped == Engine(model).generate(prompt[-16:], SampleConfig(max_new_tokens=5, temperature=0))


def test_seed_reproducibility():
    engine = Engine(tiny())
    config = SampleConfig(max_new_tokens=50, num_samples=2, temperature=1.0, seed=7)
    assert engine.generate([1, 2], config) == engine.generate([1, 2], config)


def test_different_seeds_differ():
    engine = Engine(tiny())
    a = engine.generate([1, 2], SampleConfig(max_new_tokens=50, temperature=1.0, seed=1))
    b = engine.generate([1, 2], SampleConfig(max_new_tokens=50, temperature=1.0, seed=2))
    assert a != b


def test_samples_of_one_prompt_differ_from_each_other():
    rows = Engine(tiny()).generate([1, 2], SampleConfig(max_new_tokens=30, num_samples=3, temperature=1.0, seed=0))
    assert len({tuple(r) for r in rows}) == 3


def test_temperature_zero_is_greedy_and_deterministic():
    model = tiny()
    engine = Engine(model)
    a = engine.generate([4, 2], SampleConfig(max_new_tokens=20, num_samples=2, temperature=0, seed=1))
    b = engine.generate([4, 2], SampleConfig(max_new_tokens=20, temperature=0, seed=99))
    assert a[0] == a[1] == b[0]
    with torch.inference_mode():
        assert a[0][0] == model(torch.tensor([[4, 2]]))[0, -1].argmax().item()
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, None, temperature=0), logits.argmax(dim=-1, keepdim=True))


def test_max_tokens_respected():
    rows = Engine(tiny()).generate([1], SampleConfig(max_new_tokens=13, num_samples=2, seed=0))
    assert [len(r) for r in rows] == [13, 13]


def test_end_of_text_ends_a_sample():
    model = tiny()
    first = Engine(model).generate([1, 2, 3], SampleConfig(max_new_tokens=5, temperature=0))[0][0]
    assert Engine(model, eot_id=first).generate([1, 2, 3], SampleConfig(max_new_tokens=5, temperature=0)) == [[]]
    steps = list(Engine(model, eot_id=first).stream([1, 2, 3], SampleConfig(max_new_tokens=5, temperature=0)))
    assert steps == []


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.5, 4.0, -1.0, 2.0, 3.0, 1.0]])
    assert kept(top_k_filter(logits, 3)) == {1, 3, 4}
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 6)) == set(range(6))
    assert torch.equal(top_k_filter(logits, 3)[0, [1, 3, 4]], logits[0, [1, 3, 4]])  # survivors untouched


def test_top_k_ties_never_keep_more_than_k():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0]])
    two = kept(top_k_filter(logits, 2))
    assert len(two) == 2 and two <= {1, 2, 3}
    assert kept(top_k_filter(logits, 4)) == {1, 2, 3, 5}
    ids = {sample_next(logits, torch.Generator().manual_seed(s), top_k=2).item() for s in range(50)}
    assert ids == two  # sampling draws from the same k candidates


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # sorted: 1 (.5), 3 (.3), 0 (.15), 2 (.05)
    assert kept(top_p_filter(logits, 0.45)) == {1}
    assert kept(top_p_filter(logits, 0.75)) == {1, 3}
    assert kept(top_p_filter(logits, 0.9)) == {1, 3, 0}
    assert kept(top_p_filter(logits, 0.99)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 1e-9)) == {1}  # the most likely token always stays


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(min_p_filter(logits, 0.2)) == {0, 1, 2}  # threshold 0.1
    assert kept(min_p_filter(logits, 0.0)) == {0, 1, 2, 3}


def test_repetition_penalty_is_the_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_changes_greedy_output():
    engine = Engine(tiny())
    plain = engine.generate([1, 2], SampleConfig(max_new_tokens=40, temperature=0))
    penalized = engine.generate([1, 2], SampleConfig(max_new_tokens=40, temperature=0, repetition_penalty=5.0))
    assert plain != penalized
    assert len(set(penalized[0])) > len(set(plain[0]))


def test_draw_follows_the_probabilities():
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7]]).expand(20000, -1)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)).flatten(), minlength=4).float() / 20000
    assert counts[2] == 0
    assert torch.allclose(counts, torch.tensor([0.1, 0.2, 0.0, 0.7]), atol=0.015)


def test_tensor_generate_keeps_its_shape_and_the_callers_rows():
    model = tiny(block_size=16)
    idx = torch.randint(0, 50, (3, 4))
    out = generate(model, idx, 30, seed=0)
    assert out.shape == (3, 34) and torch.equal(out[:, :4], idx)
    assert out.requires_grad is False and not out.is_inference()


def test_small_models_decode_on_one_thread_and_restore_the_setting():
    model = tiny()
    torch.set_num_threads(2)
    steps = decode(model, torch.tensor([[1]]), SampleConfig(max_new_tokens=3), make_generator("cpu", 0))
    next(steps)
    assert torch.get_num_threads() == decode_threads(model) == 1
    steps.close()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("settings, flag", [
    (dict(temperature=-0.5), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"),
    (dict(top_k=0), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(min_p=-0.1), "--min-p"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"),
    (dict(repetition_penalty=-1.0), "--repetition-penalty"),
    (dict(num_samples=0), "--num-samples"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(max_new_tokens=100_001), "--max-new-tokens"),
    (dict(max_new_tokens=50, max_new_tokens_limit=10), "--max-new-tokens"),
    (dict(seed=-1), "--seed"),
    (dict(stop=("",)), "--stop"),
])
def test_bad_sampling_values_are_one_line_errors(settings, flag):
    with pytest.raises(GptlabError) as e:
        SampleConfig(**settings)
    message = str(e.value)
    assert message.startswith(flag) and "\n" not in message
    assert "must" in message


def test_engine_checks_prompt_ids_and_slide():
    engine = Engine(tiny())
    with pytest.raises(GptlabError, match="outside the model's vocabulary"):
        engine.generate([1, 50])
    with pytest.raises(GptlabError, match="no tokens"):
        engine.generate([])
    with pytest.raises(GptlabError, match="slide"):
        Engine(tiny(), slide=0).generate([1])
