"""The `gptlab` command: parses arguments and calls the library; no logic of its own.

Training flags are generated from the fields of ModelConfig and TrainConfig, so every config field
is a flag with its help text and default, and nothing is listed twice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

from gptlab.errors import GptlabError

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field, typed, with the field's help and default."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        names = [flag] + (["--lr"] if f.name == "learning_rate" else [])
        kind = TYPES[str(f.type)]
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=help_text)


def config_overrides(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    names = {f.name for cls in classes for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def build_parser() -> argparse.ArgumentParser:
    """The full `gptlab` argument parser."""
    from gptlab import __version__
    from gptlab.config import ModelConfig, TrainConfig, preset_names

    parser = OneLineParser(prog="gptlab", description="From a plain text file to a GPT you trained yourself.")
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    p = sub.add_parser("prepare", help="tokenize text into token files for training",
                       description="Tokenize a file, several files, a folder of .txt files or a named dataset (shakespeare).")
    p.add_argument("inputs", nargs="+", metavar="TEXT", help="text file(s), folder(s) of .txt, or a named dataset")
    p.add_argument("--tokenizer", default="char", help="char, gpt2 or bpe:N (default: 'char')")
    p.add_argument("--out", default=None, help="output folder (default: data/<name>-<tokenizer>)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation, from the end (default: 0.1)")

    t = sub.add_parser("train", help="train a GPT (from a prepared folder or straight from text)",
                       description="Train a GPT. Settings resolve as preset < --config file < flags.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("inputs", nargs="*", metavar="TEXT", help="text to prepare and train on in one go (instead of --data)")
    t.add_argument("--preset", choices=None, default=None, help=f"named settings: {', '.join(preset_names())}")
    t.add_argument("--config", default=None, help="JSON file of settings (e.g. a run's config.json)")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_config_flags(t, ModelConfig, "model")
    add_config_flags(t, TrainConfig, "training")

    i = sub.add_parser("info", help="describe a run folder, or what a preset would build")
    i.add_argument("run", nargs="?", help="run folder")
    i.add_argument("--preset", default=None, help="describe a preset instead of a run")
    i.add_argument("--json", action="store_true", help="print JSON")
    return parser


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data import prepare

    out = prepare(args.inputs, tokenizer=args.tokenizer, out=args.out, val_fraction=args.val_fraction)
    print(f"prepared {out}; train with: gptlab train --data {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gptlab.config import ModelConfig, TrainConfig, resolve_config
    from gptlab.data import default_data_dir, matches_sources, prepare, resolve_inputs
    from gptlab.train import train

    overrides = config_overrides(args, ModelConfig, TrainConfig)
    config_file = args.config
    if args.resume:
        from gptlab.checkpoint import CONFIG

        if not os.path.isfile(os.path.join(args.resume, CONFIG)):
            raise GptlabError(f"--resume {args.resume}: no run there (no {CONFIG}); give the folder of an earlier run")
        if args.preset or args.config:
            raise GptlabError("--resume takes its settings from the run's config.json; drop --preset/--config")
        config_file = os.path.join(args.resume, CONFIG)
        overrides["out"] = args.resume
    model_cfg, train_cfg = resolve_config(args.preset, config_file, overrides)
    if args.inputs:
        if "data" in overrides:
            raise GptlabError("give either text to train on or --data, not both")
        name, _ = resolve_inputs(args.inputs)
        data_dir = default_data_dir(name, train_cfg.tokenizer)
        if matches_sources(data_dir, args.inputs, train_cfg.tokenizer, train_cfg.val_fraction):
            print(f"using prepared data in {data_dir}")
        else:
            prepare(args.inputs, train_cfg.tokenizer, data_dir, train_cfg.val_fraction,
                    log=(lambda *a: None) if args.quiet else print)
        model_cfg, train_cfg = resolve_config(args.preset, config_file, {**overrides, "data": str(data_dir)})
    result = train(model_cfg, train_cfg, resume=bool(args.resume), overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        print(f"done: {result.steps:,} steps, best val loss {result.best_val_loss:.4f}, "
              f"{result.elapsed_sec:,.1f}s; run folder {result.run_dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gptlab.config import ModelConfig, get_preset

    if args.preset:
        preset = get_preset(args.preset)
        model = ModelConfig(**preset["model"])
        vocab = model.vocab_size or 65
        info = {
            "preset": preset["name"], "about": preset["about"], "n_layer": model.n_layer, "n_head": model.n_head,
            "n_embd": model.n_embd, "block_size": model.block_size, "vocab_size": vocab,
            "vocab_from_data": model.vocab_size == 0, "params": model.num_params(vocab),
            "train": preset["train"],
        }
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        print(f"preset {info['preset']}: {info['about']}")
        print(f"  layers {model.n_layer}, heads {model.n_head}, width {model.n_embd}, context {model.block_size}, "
              f"dropout {model.dropout}, bias {model.bias}")
        note = " (vocabulary comes from the data; 65 = tiny Shakespeare char)" if model.vocab_size == 0 else ""
        print(f"  vocabulary {vocab:,}{note}")
        print(f"  parameters {info['params']:,}")
        print("  training: " + ", ".join(f"{k}={v}" for k, v in preset["train"].items()))
        return 0
    if not args.run:
        raise GptlabError("give a run folder (gptlab info runs/x) or --preset NAME")
    from gptlab.train import run_summary

    info = run_summary(args.run)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    m = info["model"]
    best = f"{info['best_val_loss']:.4f}" if info["best_val_loss"] is not None else "n/a"
    print(f"run {info['run']}")
    print(f"  model      {info['params']:,} parameters: {m['n_layer']} layers, {m['n_head']} heads, "
          f"{m['n_embd']} wide, context {m['block_size']}, vocab {m['vocab_size']:,}")
    print(f"  tokenizer  {info['tokenizer'].get('type', '?')}")
    print(f"  data       {info['data']}")
    print(f"  trained    {info['steps']:,} steps, {info['tokens_seen']:,} tokens seen, {info['elapsed_sec']:,.1f}s")
    print(f"  val loss   best {best}")
    for name, path in info["files"].items():
        print(f"  {name:<18} {path}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gptlab` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GptlabError as e:
        from gptlab.train import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(f"gptlab {args.command}: {e}", file=sys.stderr)
            return 130
        print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
