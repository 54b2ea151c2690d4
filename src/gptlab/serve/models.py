"""The runs a server holds: each loaded once, with its name, its model card and its generation queue."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generation import Finish, TextModel
from gptlab.rundir import LOSS_PLOT, RunFiles, check_run, run_summary
from gptlab.serve.limits import GenerationQueue, Limits


@dataclass
class ServedModel:
    """One loaded run, shared by the page and the API."""

    name: str
    model: TextModel
    queue: GenerationQueue
    summary: dict[str, Any] = field(default_factory=dict)
    created: int = 0

    @property
    def loss_plot(self) -> Path | None:
        """The run's loss.png, when it has one."""
        run_dir = self.model.run_dir
        path = run_dir / LOSS_PLOT if run_dir is not None else None
        return path if path is not None and path.is_file() else None

    def card(self) -> str:
        """A short Markdown description: size, tokenizer, best val loss, training time."""
        s = self.summary
        if not s:
            c = self.model.config
            return f"**{self.name}**: {c.describe()}"
        m = s["model"]
        best = f"{s['best_val_loss']:.4f}" if s.get("best_val_loss") is not None else "n/a"
        return "\n".join([
            f"### {self.name}",
            f"- **size**: {s['params']:,} parameters: {self.model.config.describe()}",
            f"- **context**: {m['block_size']:,} tokens",
            f"- **tokenizer**: {s['tokenizer'].get('type', '?')}, vocabulary {m['vocab_size']:,}",
            f"- **best val loss**: {best}",
            f"- **training**: {s['steps']:,} steps, {s['tokens_seen']:,} tokens seen, {_duration(s['elapsed_sec'])}",
            f"- **run folder**: `{s['run']}`",
        ])

    def prompt_tokens(self, prompt: str | list[dict[str, str]]) -> int:
        """How many tokens `prompt` (text, or chat messages) is; a GptlabError when it cannot be encoded."""
        if not isinstance(prompt, str):
            return len(self.model.chat_ids(prompt))
        return len(self.model.encode_prompt(prompt))

    def check_memory(self, config: SampleConfig, prompt_tokens: int) -> None:
        """A SettingError (num_samples) when generating `config` after a prompt this long would not fit in memory."""
        from gptlab.engine import check_memory

        check_memory(self.model.model, config, min(prompt_tokens, self.model.config.block_size))

    def batch_stats(self) -> dict[str, int]:
        """What its batch engine is decoding (rows, requests, waiting) and has decoded (steps, widest)."""
        stats = getattr(self.model.engine, "stats", None)
        return {f"batch_{k}": v for k, v in stats().items()} if stats is not None else {}

    def close(self) -> None:
        """Stop its generations (each ends with an error) and its decoder."""
        self.queue.shutdown()
        close = getattr(self.model.engine, "close", None)
        if close is not None:
            close()

    def work(self, prompts: Sequence[str | list[dict[str, str]]],
             config: SampleConfig) -> Iterator[tuple[int, str, Finish | None]]:
        """(choice index, piece, finish) for every prompt (text, or chat messages) in turn, `config.num_samples` each."""
        for number, prompt in enumerate(prompts):
            events = self.model.events(prompt, config) if isinstance(prompt, str) else \
                self.model.chat_events(prompt, config)
            for row, piece, finish in events:
                yield number * config.num_samples + row, piece, finish


def model_names(runs: Sequence[str | Path]) -> list[str]:
    """A short name per run: its folder name, or the path as given when two folders share a name."""
    paths = [Path(r) for r in runs]
    names = [p.resolve().name for p in paths]
    return [n if names.count(n) == 1 else p.as_posix().rstrip("/") for n, p in zip(names, paths)]


def check_runs(runs: Sequence[str | Path], checkpoint: str = "best") -> list[tuple[str, RunFiles]]:
    """Each run's name and its opened files, after checking every folder is a whole run (before any weights load)."""
    if not runs:
        raise GptlabError("give at least one run folder to serve (gptlab serve runs/NAME)")
    opened = [check_run(run, checkpoint) for run in runs]
    names = model_names(runs)
    if len(set(names)) != len(names):
        raise GptlabError("the same run folder is given twice; give each run once")
    return list(zip(names, opened))


def load_models(runs: Sequence[str | Path], limits: Limits, checkpoint: str = "best", device: str = "auto",
                checked: list[tuple[str, RunFiles]] | None = None, quantize: str | None = None) -> list[ServedModel]:
    """Load every run once, each with its own generation queue (`checked`: what `check_runs` returned;
    `quantize`: the weights to decode with, see gptlab/quantize.py)."""
    from gptlab.generation import load

    checked = checked or check_runs(runs, checkpoint)
    served = []
    for (name, files), run in zip(checked, runs):
        tm = load(run, checkpoint, device, files=files, quantize=quantize).batched(limits.batch_rows(), limits.decoder_threads(len(runs)))
        config_path = Path(run) / "config.json"
        served.append(ServedModel(
            name=name, model=tm, summary=run_summary(run, files), created=int(config_path.stat().st_mtime),
            queue=GenerationQueue(limits.concurrency, limits.queue_size, name),
        ))
    return served


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
