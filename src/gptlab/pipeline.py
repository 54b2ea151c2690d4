"""What `gptlab train` does before the loop: settings resolved, text prepared, a shape sized, --init-from read.

    from gptlab.pipeline import run_training
    run_training(["my.txt"], {"time": "5m"})          # as `gptlab train my.txt --time 5m`

Design choices:
- Settings resolve as preset < --config file < flags (`config.resolve_config`); `--resume RUN`
  takes the run's own config.json instead and writes back into the run.
- Text given straight to `train` is prepared once into data/<name>-<tokenizer> and reused while
  the sources are unchanged (same bytes, tokenizer and split). With `--init-from DIR` the text is
  prepared with DIR's own tokenizer (data/<name>-<DIR's name>): a model reads only its own ids, so an
  explicit --tokenizer that is not DIR's is an error rather than a silent switch.
- With no preset or config file, what the user left open is sized to the data and the machine
  (`sizing.choose`), and the choice is printed with its reason.
- `--init-from` is resolved here, into the shape, weights and tokenizer `train` starts from, so the
  trainer never reads foreign folders.
- The run folder is locked while training writes it (`rundir.RunLock`), and a folder of another kind
  (prepared data, an export) is never trained into.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from gptlab import distributed
from gptlab.config import ModelConfig, TrainConfig, parse_duration, resolve_config
from gptlab.errors import GptlabError
from gptlab.folders import check_writes_kind
from gptlab.rundir import CONFIG, LAST, RunLock, check_run, default_run_dir
from gptlab.tokenizer import Tokenizer


def training_settings(preset: str | None, config_file: str | None, resume: str | None,
                      overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, str | None, dict[str, Any]]:
    """Validated configs, and the config file and overrides they came from (with --resume's folded in)."""
    overrides = dict(overrides)
    if resume:
        if not os.path.isfile(os.path.join(resume, CONFIG)):
            raise GptlabError(f"--resume {resume}: no run there (no {CONFIG}); give the folder of an earlier run")
        if preset or config_file:
            raise GptlabError("--resume takes its settings from the run's config.json; drop --preset/--config")
        if (Path(resume) / LAST).is_file():  # its files must belong together before training continues them
            check_run(resume, "last")
        config_file = os.path.join(resume, CONFIG)
        overrides["out"] = resume
    model_cfg, train_cfg = resolve_config(preset, config_file, overrides)
    return model_cfg, train_cfg, config_file, overrides


def run_training(inputs: list[str], overrides: dict[str, Any], preset: str | None = None,
                 config_file: str | None = None, resume: str | None = None, overwrite: bool = False,
                 quiet: bool = False) -> Any:
    """Prepare `inputs` if given, size what is left open, resolve --init-from, and train; returns the TrainResult."""
    from gptlab.train import train

    model_cfg, train_cfg, config_file, overrides = training_settings(preset, config_file, resume, overrides)
    init = None
    if train_cfg.chat and not resume:
        if inputs or "data" in overrides:
            raise GptlabError("--chat's conversations are the training data; drop the text and --data")
        init, data_dir = prepare_chat_training(train_cfg, overrides, model_cfg.dropout)
        overrides["data"] = str(data_dir)
        model_cfg, train_cfg = resolve_config(preset, config_file, overrides)
    if inputs:
        if "data" in overrides:
            raise GptlabError("give either text to train on or --data, not both")
        init_tokenizer = init_text_tokenizer(train_cfg, overrides) if not resume else None
        data_dir = prepare_for_training(inputs, train_cfg, quiet, init_tokenizer)
        overrides["data"] = str(data_dir)
        if init_tokenizer is not None:  # the run's config says which tokenizer the text really got
            overrides["tokenizer"] = init_tokenizer.spec
        if not (preset or config_file):
            overrides = size_to_data(overrides, data_dir, train_cfg.device, quiet=quiet or not distributed.is_main(),
                                     keep_shape=bool(train_cfg.init_from))
        model_cfg, train_cfg = resolve_config(preset, config_file, overrides)
    if not train_cfg.data:
        raise GptlabError("no training data; pass --data <prepared folder> or a text file (gptlab train my.txt)")
    if train_cfg.init_from and not resume and init is None:
        from gptlab.hf.init import load_init
        from gptlab.tokenizer import load_tokenizer

        init = load_init(train_cfg.init_from, model_cfg, load_tokenizer(train_cfg.data), train_cfg.data,
                         block_size=overrides.get("block_size", 0))  # only a --block-size the user gave
    run_dir = Path(train_cfg.out) if train_cfg.out else default_run_dir(train_cfg.data)
    check_writes_kind(run_dir, "run")
    lock = RunLock(run_dir) if distributed.is_main() else contextlib.nullcontext()
    with lock:  # one trainer per run folder; under torchrun, rank 0 holds it for all
        return train(model_cfg, train_cfg, resume=bool(resume), overwrite=overwrite, quiet=quiet, init=init)


def prepare_chat_training(train_cfg: TrainConfig, overrides: dict[str, Any], dropout: float) -> tuple[Any, Path]:
    """What `--chat FILE --init-from DIR` starts from: DIR's model and tokenizer with the chat turn markers
    added (the embedding grown by their rows), and FILE's conversations packed into data/<FILE>-chat."""
    from dataclasses import replace

    from gptlab.chat import grow_vocab, prepare_chat
    from gptlab.data import default_data_dir
    from gptlab.hf.init import load_init
    from gptlab.tokenizer import chat_tokenizer

    if not train_cfg.init_from:
        raise GptlabError("--chat fine-tunes a trained model for conversation; give --init-from RUN (a gptlab run "
                          "trained on text, or a Hugging Face model folder)")
    model_cfg, weights, tokenizer = load_init(train_cfg.init_from, ModelConfig(dropout=dropout),
                                              block_size=overrides.get("block_size", 0))
    tokenizer = chat_tokenizer(tokenizer)
    weights = grow_vocab(weights, tokenizer.vocab_size)
    model_cfg = replace(model_cfg, vocab_size=max(model_cfg.vocab_size, tokenizer.vocab_size))
    data_dir = default_data_dir(Path(train_cfg.chat).stem, "chat")
    check_writes_kind(data_dir, "data", "the chat data folder")
    if distributed.is_main():
        prepare_chat(train_cfg.chat, tokenizer, model_cfg.block_size, data_dir, train_cfg.val_fraction)
    distributed.barrier()
    return (model_cfg, weights, tokenizer), data_dir


def init_text_tokenizer(train_cfg: TrainConfig, overrides: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer of --init-from's folder, for text given to `train`; None without --init-from."""
    if not train_cfg.init_from:
        return None
    from gptlab.hf.tokenizers import tokenizer_of

    tokenizer = tokenizer_of(train_cfg.init_from, "--init-from")
    asked = overrides.get("tokenizer")
    if asked is not None and asked != tokenizer.spec:
        raise GptlabError(f"--tokenizer {asked} is not the tokenizer of --init-from {train_cfg.init_from} "
                          f"({tokenizer.spec}); drop --tokenizer: the text is prepared with that folder's own")
    return tokenizer


def prepare_for_training(inputs: list[str], train_cfg: TrainConfig, quiet: bool,
                         tokenizer: Tokenizer | None = None) -> Path:
    """The data folder for text given to `train`: prepared now, or reused when it holds the same sources.

    `tokenizer`: one already made (--init-from's), used instead of building train_cfg.tokenizer.
    """
    from gptlab.data import default_data_dir, matches_sources, prepare, resolve_inputs, tokenizer_label

    source = train_cfg.init_from if tokenizer is not None else ""
    spec: str | Tokenizer = tokenizer if tokenizer is not None else train_cfg.tokenizer
    name, _ = resolve_inputs(inputs)
    data_dir = default_data_dir(name, tokenizer_label(spec, source))
    with distributed.main_first():  # under torchrun, rank 0 prepares and the others find it ready
        if matches_sources(data_dir, inputs, spec, train_cfg.val_fraction):
            if distributed.is_main() and not quiet:
                print(f"using prepared data in {data_dir}")
        else:
            prepare(inputs, spec, data_dir, train_cfg.val_fraction,
                    log=(lambda *a: None) if quiet or not distributed.is_main() else print, tokenizer_from=source)
    return data_dir


def size_to_data(overrides: dict[str, Any], data_dir: str | Path, device: str, quiet: bool,
                 keep_shape: bool = False) -> dict[str, Any]:
    """`overrides` plus the model shape and budget that `gptlab.sizing` picks for this data and machine.

    `keep_shape`: the model comes from --init-from, so only the length is picked (a preset's learning
    rates, made for training from scratch, would wreck a trained model).
    """
    from gptlab.data import read_meta
    from gptlab.device import autodetect_device
    from gptlab.sizing import MODEL_SHAPE, choose

    meta = read_meta(data_dir)
    budget = parse_duration(overrides["time"]) if overrides.get("time") else None
    given = set(overrides) | (set(MODEL_SHAPE) if keep_shape else set())
    choice = choose(int(meta["train_tokens"]), autodetect_device(device).type, given, budget)
    if choice is None:
        return overrides
    if not quiet:
        print(choice.reason)
    return {**choice.model, **choice.train, **overrides}
