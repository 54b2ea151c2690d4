"""A run written as a Hugging Face folder: a `transformers` GPT-2 or Llama model, or a Space; atomically.

    gptlab export runs/shakespeare --format hf --out exports/shakespeare-gpt
    gptlab export runs/shakespeare --format space --out exports/shakespeare-space
    gptlab export runs/shakespeare --format gguf --out exports/shakespeare.gguf

Design choices:
- An export is a plain `GPT2LMHeadModel` or `LlamaForCausalLM` folder, as the run's `arch` says
  (config.json, model.safetensors, generation_config.json, tokenizer files, README.md):
  `from_pretrained` loads it with no custom code. `MAPPINGS` holds the module that writes each arch.
- The folder is written under a temporary name beside the target and renamed into place when
  complete, so a failed export leaves the previous one or nothing.
- A format is an entry of `FORMATS`: a function that fills an empty folder from an `ExportSource`.
- A chat run's folder carries its chat: the markers are special added tokens at our ids
  (`ChatTokenizer.hf_files`), tokenizer_config.json holds the template and <|end|> as eos_token,
  and config.json and generation_config.json list every id our engine stops a reply at as
  eos_token_id, <|end|> first, so `apply_chat_template` + `generate` give gptlab's replies.
- Writing needs only safetensors and tokenizers; huggingface_hub is imported inside `hub.push`.
- gguf is one file, not a folder (see gguf.py): it has its own target checks and atomic write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.folders import check_replaceable, check_writes_kind, write_export_marker
from gptlab.fsutil import fsync_tree, write_text
from gptlab.hf import gpt2, llama
from gptlab.hf.card import model_card
from gptlab.hf.gguf import OUTTYPES, check_gguf_target, write_gguf
from gptlab.hf.gpt2 import hf_generation_config
from gptlab.hf.source import ExportSource, load_source
from gptlab.hf.space import write_space
from gptlab.hf.tokenizers import write_hf_tokenizer
from gptlab.rundir import LOSS_PLOT
from gptlab.tokenizer import ChatTokenizer

# The run's arch -> the module that writes it as transformers' model (hf_config, hf_state_dict).
MAPPINGS = {"gpt2": gpt2, "llama": llama}

def chat_stop_ids(tokenizer: ChatTokenizer) -> list[int]:
    """The ids a reply stops at: <|end|> first (what generate pads with), the other markers, end-of-text if any."""
    ids = [tokenizer.end_id, *sorted(tokenizer.stop_ids - {tokenizer.end_id})]
    return ids + ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])

def write_hf(src: ExportSource, folder: Path) -> None:
    """Fill `folder` with a transformers GPT-2 or Llama model, its tokenizer and a model card."""
    from safetensors.torch import save

    if src.model_cfg.arch == "llama":
        llama.check_exportable(src.model_cfg, src.run_dir)
    mapping = MAPPINGS[src.model_cfg.arch]
    vocab_size = src.tokenizer.vocab_size
    eot = src.tokenizer.eot_id
    config = mapping.hf_config(src.model_cfg, vocab_size, eot)
    generation = hf_generation_config(src.model_cfg, eot)
    if isinstance(src.tokenizer, ChatTokenizer):
        # generate stops where gptlab's engine does: at any marker (a reply ends at <|end|>) or end-of-text.
        config["eos_token_id"] = generation["eos_token_id"] = chat_stop_ids(src.tokenizer)
        generation["pad_token_id"] = src.tokenizer.end_id
    (folder / "model.safetensors").write_bytes(save(mapping.hf_state_dict(src.model, vocab_size), metadata={"format": "pt"}))
    write_text(folder / "config.json", json.dumps(config, indent=1))
    write_text(folder / "generation_config.json", json.dumps(generation, indent=1))
    write_hf_tokenizer(src.tokenizer, folder, src.model_cfg.block_size)
    if isinstance(src.tokenizer, ChatTokenizer):
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer_config.update(src.tokenizer.hf_chat_config())
        write_text(folder / "tokenizer_config.json", json.dumps(tokenizer_config, indent=1))
    if (src.run_dir / LOSS_PLOT).is_file():
        shutil.copyfile(src.run_dir / LOSS_PLOT, folder / LOSS_PLOT)
    write_text(folder / "README.md", model_card(src, (folder / LOSS_PLOT).is_file()))

FORMATS: dict[str, Callable[[ExportSource, Path], None]] = {"hf": write_hf, "space": write_space}
FILE_FORMATS = ("gguf",)

def default_export_dir(run_dir: str | Path, fmt: str) -> Path:
    """exports/<run name>, with the format appended when it is not the Hugging Face one."""
    name = Path(run_dir).resolve().name
    if fmt in FILE_FORMATS:
        return Path("exports") / f"{name}.{fmt}"
    return Path("exports") / (name if fmt == "hf" else f"{name}-{fmt}")

def _check_target(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    check_writes_kind(out, "export")
    if not overwrite:
        raise GptlabError(f"{out} already exists and is not empty; pass --overwrite to replace it, or choose another --out")
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target in (cwd, *cwd.parents) or target in (run_dir.resolve(), *run_dir.resolve().parents):
        raise GptlabError(f"--overwrite would delete {out}, which holds the current folder or the run; choose another --out")
    check_replaceable(out, "export")

def _export_gguf(run_dir: Path, out: Path, checkpoint: str, overwrite: bool, outtype: str) -> Path:
    if outtype not in OUTTYPES:
        raise GptlabError(f"--outtype {outtype!r} is not available; choose one of: {', '.join(OUTTYPES)}")
    check_gguf_target(out, overwrite)
    src = load_source(run_dir, checkpoint)
    src.name = out.stem
    write_gguf(src, out, outtype)
    return out

def export(run_dir: str | Path, out: str | Path | None = None, fmt: str = "hf", checkpoint: str = "best",
           overwrite: bool = False, outtype: str = "f32") -> Path:
    """Write the run in `run_dir` as a `fmt` folder (or gguf file) at `out` (default under exports/); returns it."""
    if fmt not in (*FORMATS, *FILE_FORMATS):
        raise GptlabError(f"--format {fmt!r} is not available; choose one of: {', '.join((*FORMATS, *FILE_FORMATS))}")
    if outtype != "f32" and fmt != "gguf":
        raise GptlabError(f"--outtype is for --format gguf; drop --outtype {outtype} or use --format gguf")
    run_dir = Path(run_dir)
    out = Path(out) if out else default_export_dir(run_dir, fmt)
    if fmt == "gguf":
        return _export_gguf(run_dir, out, checkpoint, overwrite, outtype)
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
        write_export_marker(staging, fmt)
        fsync_tree(staging)
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
