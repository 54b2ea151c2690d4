"""The `gptlab` command: parses arguments and calls the library; no logic of its own.

Training flags are generated from the fields of ModelConfig and TrainConfig, so every config field
is a flag with its help text and default, and nothing is listed twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import MISSING, fields
from typing import Any

from gptlab.errors import GptlabError, TrainingInterrupted

TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (),
                     aliases: dict[str, str] | None = None) -> None:
    """One --flag per dataclass field, typed, with the field's help and default; nothing set unless given."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        default = f.default if f.default is not MISSING else None
        about = f.metadata.get("help", "")
        kind = str(f.type).split(" |")[0]
        if kind.startswith("tuple"):  # a list of texts: the flag is given once per item
            group.add_argument(*names, dest=f.name, action="append", default=argparse.SUPPRESS, metavar="TEXT",
                               help=f"{about}; give it again for more".replace("%", "%%"))
        elif kind == "bool":
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"{about} (default: {default!r})".replace("%", "%%"))
        else:
            group.add_argument(*names, dest=f.name, type=TYPES[kind], default=argparse.SUPPRESS,
                               metavar=f.name.upper(), help=f"{about} (default: {default!r})".replace("%", "%%"))


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
    h = sub.add_parser("help", help="show the help of gptlab or of one command", description="gptlab help [COMMAND]")
    h.add_argument("topic", nargs="?", metavar="COMMAND", help="a command, e.g. train")

    p = sub.add_parser("prepare", help="tokenize text into token files for training",
                       description="Tokenize a file, several files, a folder of .txt files or a named dataset (shakespeare).")
    p.add_argument("inputs", nargs="+", metavar="TEXT", help="text file(s), folder(s) of .txt, or a named dataset")
    from gptlab.tokenizer import kinds_help
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", default=None, help=f"{kinds_help()} (default: 'char')")
    which.add_argument("--tokenizer-from", default=None, metavar="DIR",
                       help="use the tokenizer of DIR: a gptlab run or data folder, or a Hugging Face model folder "
                            "(tokenizer.json, or vocab.json + merges.txt)")
    p.add_argument("--out", default=None, help="output folder (default: data/<name>-<tokenizer or DIR's name>)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation, from the end (default: 0.1)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes that tokenize; 0 = one per core (up to 8) for big inputs (default: 0)")
    p.add_argument("--keep-crlf", action="store_true",
                   help="keep Windows line ends (CRLF) as they are; by default they become LF, as on Linux and macOS")

    t = sub.add_parser("train", help="train a GPT (from a prepared folder or straight from text)",
                       description="Train a GPT. Settings resolve as preset < --config file < flags.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("inputs", nargs="*", metavar="TEXT", help="text to prepare and train on in one go (instead of --data)")
    t.add_argument("--preset", choices=None, default=None, help=f"named settings: {', '.join(preset_names())}")
    t.add_argument("--config", default=None, help="JSON file of settings (e.g. a run's config.json)")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine (one per GPU, or CPU processes) through torchrun")
    t.add_argument("--nnodes", type=int, default=None, metavar="M",
                   help="with --nproc: machines taking part, each running the same command; unset = 1")
    t.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nproc and --nnodes: where the machines meet (the first machine's address and a free port)")
    add_config_flags(t, ModelConfig, "model")
    add_config_flags(t, TrainConfig, "training", aliases={"learning_rate": "--lr"})

    i = sub.add_parser("info", help="describe a run folder, or what a preset would build")
    i.add_argument("run", nargs="?", help="run folder")
    i.add_argument("--preset", default=None, help="describe a preset instead of a run")
    i.add_argument("--json", action="store_true", help="print JSON")

    add_model_commands(sub)
    return parser


def add_model_commands(sub: Any) -> None:
    """The commands that use a trained run: sample, eval, plot, export, push, serve."""
    from gptlab.config import SampleConfig

    s = sub.add_parser("sample", help="generate text from a trained run",
                       description="Generate text from a run folder. \\n and \\t in --prompt and --stop mean newline and tab.")
    s.add_argument("run", help="run folder")
    s.add_argument("--prompt", default="", help="text to continue (default: empty, a fresh start)")
    s.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 file instead")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token (--temperature 0)")
    s.add_argument("--stream", action="store_true", help="print the text as it is made (one sample)")
    s.add_argument("--check-copying", action="store_true",
                   help="report how much of each sample is copied verbatim from the training text")
    s.add_argument("--copy-ngram", type=int, default=8, metavar="N",
                   help="n-gram length in tokens for --check-copying (default: 8)")
    s.add_argument("--checkpoint", default="best", help="best, last or a .safetensors file (default: 'best')")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    s.add_argument("--quantize", default="none", metavar="KIND",
                    help="weights to decode with: none (float32 as trained), bf16, or int8 per channel (default: 'none')")
    add_config_flags(s, SampleConfig, "sampling")

    c = sub.add_parser("chat", help="talk to a run fine-tuned for chat, in the terminal",
                       description="A conversation with a run trained with --chat: type a message, the reply streams in. "
                                   "/reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops a reply.")
    c.add_argument("run", help="run folder (fine-tuned with gptlab train --chat)")
    c.add_argument("--system", default="", help="a system message that starts the conversation")
    c.add_argument("--checkpoint", default="best", help="best, last or a .safetensors file (default: 'best')")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    c.add_argument("--quantize", default="none", metavar="KIND",
                    help="weights to decode with: none (float32 as trained), bf16, or int8 per channel (default: 'none')")
    add_config_flags(c, SampleConfig, "sampling", skip=("num_samples",))

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run on text",
                       description="Score a run on its own val split, a prepared data folder's val split, or a text file.")
    e.add_argument("run", help="run folder")
    e.add_argument("--data", default=None, metavar="TEXT", help="a text file or a prepared data folder (default: the run's val split)")
    e.add_argument("--stride", type=int, default=0,
                   help="tokens between window starts; less than the context scores with more context (default: 0 = the context length)")
    e.add_argument("--batch-size", type=int, default=0, help="windows per forward pass (default: 0 = as many as fit in 256 MB of logits)")
    e.add_argument("--checkpoint", default="best", help="best, last or a .safetensors file (default: 'best')")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    e.add_argument("--quantize", default="none", metavar="KIND",
                   help="score the model with these weights: none (float32), bf16 or int8, what decoding with them computes (default: 'none')")
    e.add_argument("--json", action="store_true", help="print JSON")

    pl = sub.add_parser("plot", help="draw a figure of a run: next-token temperatures, or the loss curves",
                        description="temperature: the next-token distribution after --prompt at several temperatures. "
                                    "loss: redraw loss.png from metrics.csv.")
    pl.add_argument("kind", choices=["temperature", "loss"], help="which figure")
    pl.add_argument("run", help="run folder")
    pl.add_argument("--prompt", default="", help="text whose next token is shown (temperature)")
    pl.add_argument("--temperatures", default="0.1,1,5", help="comma-separated, each > 0 (default: '0.1,1,5')")
    pl.add_argument("--top", type=int, default=20, help="tokens shown, the most likely first (default: 20)")
    pl.add_argument("--out", default=None, help="PNG to write (default: <run>/temperature.png)")
    pl.add_argument("--checkpoint", default="best", help="best, last or a .safetensors file (default: 'best')")
    pl.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")

    x = sub.add_parser("export", help="write a run as a Hugging Face transformers folder or Space",
                       description="Write a run as a folder that transformers loads: "
                                   "AutoModelForCausalLM.from_pretrained(DIR), pipeline('text-generation', DIR); "
                                   "or, with --format space, as a Gradio Space serving the page of gptlab serve.")
    x.add_argument("run", help="run folder")
    x.add_argument("--format", default="hf", help="hf: a transformers GPT-2 or Llama folder with tokenizer and model card; "
                                                  "space: a Hugging Face Space (app.py, the model, gptlab); "
                                                  "gguf: one file for llama.cpp and Ollama, with a Modelfile (default: 'hf')")
    x.add_argument("--out", default=None, help="folder to write, or the .gguf file "
                                               "(default: exports/<run name>, exports/<run name>-space, exports/<run name>.gguf)")
    x.add_argument("--outtype", default="f32", help="gguf weights: f32, f16, bf16 or q8_0 (default: 'f32')")
    x.add_argument("--checkpoint", default="best", help="best, last or a .safetensors file (default: 'best')")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files (a .gguf --out: only a GGUF file)")

    u = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub",
                       description="Upload a folder to a Hub repo (created if needed). The token comes from HF_TOKEN "
                                   "or `hf auth login`.")
    u.add_argument("folder", help="folder to upload (e.g. made by gptlab export)")
    u.add_argument("--repo-id", required=True, help="the Hub repo, as user/name")
    u.add_argument("--private", action="store_true", help="create the repo private")
    u.add_argument("--space", action="store_true", help="upload to a Space (Gradio) instead of a model repo")
    u.add_argument("--dry-run", action="store_true", help="list what would be uploaded; touch no network")

    from gptlab.serve.limits import Limits

    sv = sub.add_parser("serve", help="serve runs: a web page and an OpenAI-compatible API",
                        description="Serve runs from one process: the page at /, the OpenAI-compatible API at /v1, "
                                    "/health. Several runs are chosen by name (the folder name).")
    sv.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: '127.0.0.1')")
    sv.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: 8000)")
    sv.add_argument("--api-key", default=os.environ.get("GPTLAB_API_KEY"),
                    help="require Authorization: Bearer KEY on /v1 and this key on the page (default: $GPTLAB_API_KEY, else none)")
    add_config_flags(sv, Limits, "limits")
    sv.add_argument("--checkpoint", default="best", help="best, last or a .safetensors file (default: 'best')")
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: 'auto')")
    sv.add_argument("--quantize", default="none", metavar="KIND",
                    help="weights to decode with: none (float32 as trained), bf16, or int8 per channel (default: 'none')")
    sv.add_argument("--chainlit", action="store_true",
                    help="also serve a Chainlit chat at /chainlit (pip install 'gptlab[chainlit]')")

    ui = sub.add_parser("ui", help="one web page for everything: data, training (live), runs, generate, share",
                        description="Open the app: upload text, prepare it, train and watch it live, compare runs, "
                                    "generate, share. Training jobs run as separate processes, one at a time.")
    ui.add_argument("--runs", default="runs", metavar="DIR", help="the runs folder (default: 'runs')")
    ui.add_argument("--data", default="data", metavar="DIR",
                    help="the data folder: prepared data, and uploads in DIR/uploads (default: 'data')")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: '127.0.0.1')")
    ui.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: 8000)")
    ui.add_argument("--api-key", default=os.environ.get("GPTLAB_API_KEY"),
                    help="require this key on the page and Authorization: Bearer KEY on /v1 and /ui/api "
                         "(default: $GPTLAB_API_KEY, else none)")
    ui.add_argument("--max-upload-mb", type=float, default=50.0, help="largest text file accepted, in MB (default: 50)")
    ui.add_argument("--device", default="auto", help="where generation runs: auto, cpu, cuda, cuda:N or mps (default: 'auto')")


def cmd_prepare(args: argparse.Namespace) -> int:
    from gptlab.data import prepare

    tokenizer = args.tokenizer or "char"
    if args.tokenizer_from:
        from gptlab.hf.tokenizers import tokenizer_of

        tokenizer = tokenizer_of(args.tokenizer_from)
    out = prepare(args.inputs, tokenizer=tokenizer, out=args.out, val_fraction=args.val_fraction,
                  workers=args.workers, keep_crlf=args.keep_crlf, tokenizer_from=args.tokenizer_from or "")
    print(f"prepared {out}; train with: gptlab train --data {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import signal

    from gptlab import distributed

    for lend in ("SIGUSR1", "SIGUSR2"):  # core-lending requests (cores.CoreShare) are harmless before it listens
        if hasattr(signal, lend):
            signal.signal(getattr(signal, lend), signal.SIG_IGN)
    from gptlab.config import ModelConfig, TrainConfig
    from gptlab.pipeline import run_training, training_settings

    overrides = config_overrides(args, ModelConfig, TrainConfig)
    training_settings(args.preset, args.config, args.resume, overrides)  # every bad setting is reported here
    if (args.nproc, args.nnodes, args.rdzv_endpoint) != (None, None, None) and not distributed.launched():
        return distributed.launch(args.nproc, args.argv, args.nnodes, args.rdzv_endpoint)
    run_training(args.inputs, overrides, args.preset, args.config, args.resume, args.overwrite, args.quiet)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gptlab.config import ModelConfig, get_preset

    if args.preset:
        preset = get_preset(args.preset)
        model = ModelConfig(**preset["model"])
        vocab = model.vocab_size or 65
        info = {
            "preset": preset["name"], "about": preset["about"], "arch": model.arch, "n_layer": model.n_layer,
            "n_head": model.n_head,
            "n_embd": model.n_embd, "block_size": model.block_size, "vocab_size": vocab,
            "vocab_from_data": model.vocab_size == 0, "params": model.num_params(vocab),
            "train": preset["train"],
        }
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        print(f"preset {info['preset']}: {info['about']}")
        print(f"  {model.describe()}, dropout {model.dropout}, bias {model.bias}")
        note = " (vocabulary comes from the data; 65 = tiny Shakespeare char)" if model.vocab_size == 0 else ""
        print(f"  vocabulary {vocab:,}{note}")
        print(f"  parameters {info['params']:,}")
        print("  training: " + ", ".join(f"{k}={v}" for k, v in preset["train"].items()))
        return 0
    if not args.run:
        raise GptlabError("give a run folder (gptlab info runs/x) or --preset NAME")
    from gptlab.rundir import run_summary

    info = run_summary(args.run)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    m = info["model"]
    best = f"{info['best_val_loss']:.4f}" if info["best_val_loss"] is not None else "n/a"
    print(f"run {info['run']}")
    print(f"  model      {info['params']:,} parameters: {ModelConfig(**m).describe()}, vocab {m['vocab_size']:,}")
    print(f"  tokenizer  {info['tokenizer'].get('type', '?')}")
    print(f"  data       {info['data']}")
    print(f"  trained    {info['steps']:,} steps, {info['tokens_seen']:,} tokens seen, {info['elapsed_sec']:,.1f}s")
    print(f"  val loss   best {best}")
    for name, path in info["files"].items():
        print(f"  {name:<18} {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import warnings
    from dataclasses import replace

    from gptlab.config import SampleConfig

    settings = config_overrides(args, SampleConfig)
    if args.greedy:
        if "temperature" in settings:
            raise GptlabError("give --greedy or --temperature, not both")
        settings["temperature"] = 0.0
    settings["stop"] = tuple(settings.get("stop", ()))
    config = SampleConfig(**settings)  # every bad value is reported here, before torch loads
    if args.stream and config.num_samples > 1:
        raise GptlabError("--stream prints one sample as it is made; drop --num-samples or --stream")
    if args.copy_ngram < 1:
        raise GptlabError(f"--copy-ngram must be an integer >= 1, got {args.copy_ngram}")
    from gptlab.generation import load, unescape

    config = replace(config, stop=tuple(unescape(s) for s in config.stop))
    prompt = unescape(args.prompt)
    if args.prompt_file:
        if args.prompt:
            raise GptlabError("give --prompt or --prompt-file, not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GptlabError(f"cannot read --prompt-file {args.prompt_file} ({e}); give a UTF-8 text file") from None

    with warnings.catch_warnings():  # a warning (a cropped prompt) is one line on stderr
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr, flush=True)
        tm = load(args.run, args.checkpoint, args.device, quantize=args.quantize)
        if args.check_copying:  # find the training text before spending time on samples
            from gptlab.data import load_tokens

            train_tokens = load_tokens(tm.training_data(), "train")
        if args.stream:
            sys.stdout.write(prompt)
            pieces = []
            for piece in tm.stream(prompt, config):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            texts = ["".join(pieces)]
        else:
            texts = tm.generate(prompt, config)
            print(("\n" + "-" * 40 + "\n").join(prompt + text for text in texts))
    if args.check_copying:
        from gptlab.copycheck import check_copying

        n = args.copy_ngram
        print(f"--- copy check: {n}-token n-grams found verbatim in the {len(train_tokens):,}-token training text ---")
        for number, report in enumerate(check_copying(texts, tm.tokenizer, train_tokens, n), 1):
            print(f"sample {number}: {report.copied_share:.1%} of {report.total_chars:,} characters copied; "
                  f"longest copied span {report.longest_chars:,} characters ({report.longest_tokens:,} tokens): "
                  f"{report.longest_text[:120]!r}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gptlab.config import SampleConfig

    settings = config_overrides(args, SampleConfig)
    settings.setdefault("max_new_tokens", 256)
    settings["stop"] = tuple(settings.get("stop", ()))
    config = SampleConfig(**settings)  # every bad value is reported here, before torch loads
    from gptlab.generation import load

    tm = load(args.run, args.checkpoint, args.device, quantize=args.quantize)
    if not tm.chats:
        raise GptlabError(f"{args.run} was not fine-tuned for chat; fine-tune it first: gptlab train --init-from "
                          f"{args.run} --chat conversations.jsonl --out runs/chat (or sample it with gptlab sample)")
    chat_loop(tm, config, args.system)
    return 0


def chat_loop(tm: Any, config: Any, system: str = "") -> None:
    """Read a message, stream the reply, remember both; /reset forgets, /exit or end of input quits."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset starts over, /exit quits, Ctrl-C stops a reply.", flush=True)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            print("(a new conversation)", flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        if not interactive:
            print(f"you> {line}", flush=True)
        sys.stdout.write("assistant> ")
        pieces = []
        try:
            for _, piece, _ in tm.chat_events(messages, config):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except GptlabError as e:  # an unknown character, a conversation too long: say so and go on
            messages.pop()
            print(f"\nerror: {e}", flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def cmd_eval(args: argparse.Namespace) -> int:
    if args.stride < 0 or args.batch_size < 0:
        raise GptlabError("--stride and --batch-size must be zero (automatic) or positive")
    from gptlab.evaluate import evaluate
    from gptlab.generation import load

    tm = load(args.run, args.checkpoint, args.device, quantize=args.quantize)
    result = evaluate(tm, args.data, stride=args.stride, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    print(f"{result.source}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f}, "
          f"bits per byte {result.bits_per_byte:.4f} ({result.tokens:,} tokens, {result.bytes:,} bytes, "
          f"{result.windows:,} windows)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    if args.kind == "loss":
        from gptlab.report import plot_losses
        from gptlab.rundir import read_run_config

        read_run_config(args.run)  # a clear error when it is not a run folder
        path = plot_losses(args.run)
        if path is None:
            raise GptlabError(f"{args.run} has no metrics.csv rows yet; train it first")
        print(f"wrote {path}")
        return 0
    try:
        temperatures = tuple(float(t) for t in args.temperatures.split(","))
    except ValueError:
        raise GptlabError(f"--temperatures must be numbers separated by commas, e.g. 0.1,1,5; got {args.temperatures!r}") from None
    if any(not t > 0 for t in temperatures):
        raise GptlabError(f"--temperatures must each be > 0, got {args.temperatures!r}")
    if args.top < 1:
        raise GptlabError(f"--top must be an integer >= 1, got {args.top}")
    from gptlab.generation import load, unescape
    from gptlab.report import plot_temperature

    tm = load(args.run, args.checkpoint, args.device)
    path = plot_temperature(tm, unescape(args.prompt), args.out, temperatures, args.top)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gptlab.hf.export import export

    out = export(args.run, args.out, args.format, args.checkpoint, args.overwrite, args.outtype)
    if args.format == "gguf":
        print(f"wrote {out}; run it with `llama-cli -m {out}`, or in Ollama with "
              f"`ollama create NAME -f {out.with_suffix('.Modelfile')}`")
    elif args.format == "space":
        print(f"wrote {out}; try it with `python {out / 'app.py'}`, then upload it with "
              f"`gptlab push {out} --repo-id USER/NAME --space`")
    else:
        print(f"wrote {out}; load it with transformers: pipeline('text-generation', '{out}')")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from gptlab.hf.hub import push

    url, files = push(args.folder, args.repo_id, private=args.private, space=args.space, dry_run=args.dry_run)
    total = sum(size for _, size in files)
    if args.dry_run:
        for path, size in files:
            print(f"{size:>14,}  {path}")
        print(f"dry run: would upload {len(files)} files ({total:,} bytes) to {url}"
              f"{' (private)' if args.private else ''}; nothing was sent")
    else:
        print(f"uploaded {len(files)} files ({total:,} bytes) to {url}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gptlab.serve.limits import Limits

    limits = Limits(**config_overrides(args, Limits))
    from gptlab.serve.app import serve

    serve(args.runs, host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          checkpoint=args.checkpoint, device=args.device, chainlit=args.chainlit, quantize=args.quantize)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from gptlab.ui.app import ui

    ui(args.runs, args.data, host=args.host, port=args.port, api_key=args.api_key, max_upload_mb=args.max_upload_mb,
       device=args.device)
    return 0


def cmd_help(args: argparse.Namespace) -> int:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if args.topic is None:
        parser.print_help()
    elif args.topic in commands:
        commands[args.topic].print_help()
    else:
        raise GptlabError(f"no command {args.topic!r}; the commands are {', '.join(c for c in commands if c != 'help')}")
    return 0


COMMANDS = {"help": cmd_help, "prepare": cmd_prepare, "train": cmd_train, "info": cmd_info,
            "sample": cmd_sample, "eval": cmd_eval, "plot": cmd_plot, "serve": cmd_serve, "ui": cmd_ui, "chat": cmd_chat,
            "export": cmd_export, "push": cmd_push}


def attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--time -5s` as `--time=-5s`: a value that starts with a dash still belongs to its flag.

    argparse reads it as another flag and says "expected one argument"; attached, the value reaches
    its own check, whose message says what is wrong with it.
    """
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = commands.get(argv[0]) if argv else None
    if command is None:
        return argv
    flags = command._option_string_actions
    out: list[str] = []
    i = 0
    while i < len(argv):
        action = flags.get(argv[i])
        takes_value = action is not None and action.nargs is None and not isinstance(
            action, (argparse._StoreConstAction, argparse.BooleanOptionalAction))
        following = argv[i + 1] if i + 1 < len(argv) else None
        if takes_value and following is not None and following.startswith("-") and following not in flags \
                and following not in ("-", "--"):
            out.append(f"{argv[i]}={following}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a service manager, a script's timeout) ends a command as Ctrl-C does.

    The same clean-up runs (temporary files removed, worker processes stopped, a training run saved)
    and the same one line is printed; training and serving install their own handlers on top.
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gptlab` console script."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(attach_dash_values(parser, argv))
    args.argv = argv  # what `--nproc` runs again under torchrun
    try:
        with terminate_as_interrupt():
            return COMMANDS[args.command](args)
    except GptlabError as e:
        from gptlab.distributed import is_main

        say = is_main()  # under torchrun every rank fails alike; one line is enough
        if isinstance(e, TrainingInterrupted):
            if say:
                print(f"gptlab {args.command}: {e}", file=sys.stderr)
            return 130
        if say:
            print(f"gptlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
