"""README.md for an export: what the model is, what it was trained on and how well, how to use it, samples."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from gptlab.config import SAMPLES_SETTINGS, TrainConfig
from gptlab.errors import GptlabError
from gptlab.hf.gpt2 import DEFAULT_MAX_LENGTH
from gptlab.hf.source import ExportSource
from gptlab.rundir import LOSS_PLOT, SAMPLES, run_summary
from gptlab.tokenizer import ChatTokenizer


def _data_description(train_cfg: TrainConfig) -> str:
    from gptlab.data import NAMED_DATASETS, read_meta

    try:
        meta = read_meta(train_cfg.data)
    except GptlabError:
        return f"the prepared data folder `{Path(train_cfg.data).name or '?'}`"
    named = NAMED_DATASETS.get(meta.get("name", ""))
    sources = meta.get("sources", [])
    if named:
        what = named["about"]
    elif len(sources) == 1:
        what = f"`{Path(sources[0]['path']).name}`"
    else:
        names = [f"`{Path(s['path']).name}`" for s in sources[:5]] + (["..."] if len(sources) > 5 else [])
        what = f"{len(sources)} text files ({', '.join(names)})"
    return (f"{what}: {meta.get('bytes', 0):,} bytes of text, {meta['train_tokens']:,} training and "
            f"{meta['val_tokens']:,} validation tokens (the last {meta.get('val_fraction', 0.1):.0%} of the text)")

def _fenced(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"

def _card_samples(run_dir: Path) -> list[str]:
    path = run_dir / SAMPLES
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.startswith("# "):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return [s.strip("\n") for s in text.split("\n\n=== Next Sequence ===\n\n") if s.strip()]

# What each arch is called in the card: (the opening's "A ... language model", the Hub tag, transformers' class).
ARCH_NAMES = {"gpt2": ("GPT-2-style", "gpt2", "GPT2LMHeadModel"), "llama": ("Llama-style", "llama", "LlamaForCausalLM")}

def arch_tags(arch: str) -> list[str]:
    """The Hub tags of a card: gptlab, the architecture, text-generation."""
    return ["tags:", "- gptlab", f"- {ARCH_NAMES[arch][1]}", "- text-generation"]

def hf_front_matter(arch: str) -> list[str]:
    """The YAML header of an hf export's card."""
    return ["---", "library_name: transformers", "pipeline_tag: text-generation", *arch_tags(arch), "---"]

def chat_usage(name: str, hf_class: str) -> list[str]:
    """The "Use it" section of a chat model: its template through transformers, the reply cut at <|end|>."""
    return [
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")   # this folder, or its Hub repo id',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": "What is 2 + 3?"}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")',
        'reply = model.generate(**inputs, max_new_tokens=100)[0, inputs["input_ids"].shape[1]:]',
        "print(tokenizer.decode(reply, skip_special_tokens=True))",
        "```",
        "",
        f"It is a plain `{hf_class}` with a chat template (`tokenizer_config.json`): each message is its role's "
        "marker (`<|system|>`, `<|user|>`, `<|assistant|>`), its content and `<|end|>`, and the reply follows "
        "`<|assistant|>`. `generate` stops at the end of the reply (`<|end|>`, or any other marker: "
        "`eos_token_id` in `generation_config.json`).",
        "",
    ]

def model_card(src: ExportSource, has_plot: bool, front_matter: Sequence[str] | None = None,
               usage: Sequence[str] | None = None, plot: str = LOSS_PLOT) -> str:
    """README.md: what the model is, what it was trained on and how well, how to use it, samples.

    `front_matter` is the YAML header the Hub reads (default: the hf export's); `usage` replaces the transformers "Use it" section;
    `plot` is where the loss plot lies, relative to the card.
    """
    name = src.name or src.run_dir.resolve().name
    s = run_summary(src.run_dir)
    m = src.model_cfg
    style, _, hf_class = ARCH_NAMES[m.arch]
    if front_matter is None:
        front_matter = hf_front_matter(m.arch)
    tok = src.tokenizer
    tok_text = tok.describe()
    best = f"{s['best_val_loss']:.4f}" if s["best_val_loss"] is not None else "n/a"
    init = src.train_cfg.init_from
    origin = f"fine-tuned from `{Path(init).name}`" if init else "trained from scratch"
    chat = isinstance(tok, ChatTokenizer)
    lines = [
        *front_matter,
        "",
        f"# {name}",
        "",
        f"A {style} {'chat' if chat else 'language'} model {origin} with gptlab on "
        f"{_data_description(src.train_cfg)}.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {s['params']:,} |",
        f"| shape | {m.describe()} |",
        f"| tokenizer | {tok_text} |",
        f"| training | {s['steps']:,} steps, {s['tokens_seen']:,} tokens seen, {s['elapsed_sec']:,.0f} s, "
        f"peak learning rate {src.train_cfg.learning_rate:g} |",
        f"| best validation loss | {best} |",
        f"| weights | `{src.weights.name}` of the run |",
        "",
    ]
    if has_plot:
        lines += [f"![train and validation loss against steps]({plot})", ""]
    if usage is None and chat:
        usage = chat_usage(name, hf_class)
    lines += list(usage) if usage is not None else [
        "## Use it",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generate = pipeline("text-generation", "{name}")   # this folder, or its Hub repo id',
        'print(generate("ROMEO:")[0]["generated_text"])',
        "```",
        "",
        f"It is a plain `{hf_class}`. The sampling defaults are in `generation_config.json`: "
        f"temperature {SAMPLES_SETTINGS.temperature:g}, top-k {SAMPLES_SETTINGS.top_k}, and `max_length` {min(m.block_size, DEFAULT_MAX_LENGTH)} tokens, prompt "
        "included, so generation never runs past the context the model was trained on.",
        "",
    ]
    samples = _card_samples(src.run_dir)
    if samples:
        prompted = "Replies to fixed questions" if chat else "Unprompted"
        lines += ["## Samples", "", f"{prompted}, temperature {SAMPLES_SETTINGS.temperature:g}, top-k {SAMPLES_SETTINGS.top_k}, "
                  "from the best checkpoint:", ""]
        for sample in samples:
            lines += [_fenced(sample), ""]
    lines += ["## Limits", "",
              f"A small model trained on a small corpus: it imitates the style of its training text within a "
              f"{m.block_size}-token window and knows nothing else. Do not rely on what it writes.", ""]
    return "\n".join(lines)
