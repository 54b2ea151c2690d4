"""Bad inputs through the real `gptlab` command: exit code 2, one line on stderr, nothing half-written.

Every case runs `python -m gptlab ...` as a subprocess in its own empty working folder, with
GPTLAB_DATA_MIRROR pointing at the shared data folder beside the checkout and GPTLAB_HOME at a
temporary folder, and checks:

- the exit code is 2;
- stderr is exactly one non-empty line, and that line names the problem (the file, the flag, ...);
- no "Traceback" in stdout or stderr;
- no temporary file (`*.tmp`, `.*.tmp`, `*.part`) is left anywhere in the working folder, and none of
  the outputs (train.bin, val.bin, meta.json, *.safetensors, train_state.pt) were created.

Starting the CLI costs about two seconds (importing torch), so one tiny real run and all the
single-command cases are started at once on a thread pool (one worker per CPU core) and each test
then checks its own result. The multi-step scenarios (an --out that already holds a run, a full
disk) work on copies of that tiny run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = DATA_MIRROR / "tinyshakespeare.txt"

pytestmark = pytest.mark.skipif(not CORPUS.is_file(), reason=f"needs tiny Shakespeare at {CORPUS}")

CHUNK = 4 << 20  # gptlab reads text in 4 MiB blocks; one case puts a bad character across the first cut
OUTPUTS = ("train.bin", "val.bin", "meta.json", "best.safetensors", "last.safetensors", "train_state.pt")
TINY = (  # a run that trains in a second or two on a CPU
    "--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
    "--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--num-samples", "1", "--sample-tokens", "5",
)


# --------------------------------------------------------------------------------------------------
# running the CLI and checking a failure


@dataclass
class Outcome:
    """What one `gptlab` command did."""

    argv: list[str]
    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    before: frozenset[Path] = frozenset()  # files laid out before the command ran


def gptlab(cwd: Path, *args: str, **popen_kw) -> Outcome:
    """Run `python -m gptlab ARGS` in `cwd` with an isolated home and the offline data mirror."""
    home = cwd / ".gptlab-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTLAB_")}
    env.update(
        GPTLAB_DATA_MIRROR=str(DATA_MIRROR),
        GPTLAB_HOME=str(home),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",  # several CLIs run at once; one thread each keeps them from fighting
        MPLCONFIGDIR=str(home / "matplotlib"),
    )
    argv = [sys.executable, "-m", "gptlab", *args]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **popen_kw)
    return Outcome(argv, cwd, proc.returncode, proc.stdout, proc.stderr)


def leftovers(folder: Path) -> list[str]:
    """Temporary files anywhere under `folder` (what an interrupted write would leave)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".part")))


def assert_clean_failure(out: Outcome, expect: tuple[str, ...], absent: tuple[str, ...] = OUTPUTS) -> str:
    """Exit 2, one line on stderr containing every string in `expect`, no traceback, nothing half-written."""
    shown = f"\n$ {' '.join(out.argv[2:])}\n--- stdout ---\n{out.stdout}--- stderr ---\n{out.stderr}"
    assert "Traceback" not in out.stdout + out.stderr, shown
    assert out.returncode == 2, shown
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be exactly one non-empty line{shown}"
    line = lines[0]
    for word in expect:
        assert word in line, f"{word!r} not in the error line{shown}"
    assert leftovers(out.cwd) == [], shown
    created = sorted(str(p.relative_to(out.cwd)) for name in absent for p in out.cwd.rglob(name) if p not in out.before)
    assert created == [], f"files created by a failed command: {created}{shown}"
    return line


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in `folder` (not recursive)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# the single-command cases


@dataclass
class Case:
    """One bad command: the files it starts from, what the error line must say, what it must not create.

    `{data}` in an argument or a file's text is replaced by the shared prepared data folder.
    """

    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    files: dict[str, bytes | str] = field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    absent: tuple[str, ...] = OUTPUTS
    bug: str | None = None  # a known product bug: the case is a strict xfail until it is fixed


LATIN1 = b"First Citizen:\nWe are accounted poor citizens, the patricians good.\ncaf\xe9 au lait\n"
BINARY = b"First Citizen:\nBefore we proceed any further, hear me speak.\x00\x01\x02\n"
ACROSS_CHUNK = (b"All:\nSpeak, speak.\n" * (CHUNK // 19 + 1))[: CHUNK - 2] + b"\xe2\x82" + b"A and more text\n"
SMALL = b"To be, or not to be, that is the question.\n" * 20
TRUNCATED = b"First Citizen:\nYou are all resolved rather to die than to famish?\ncaf\xc3"

CASES = [
    # ---- input text -------------------------------------------------------------------------
    Case("prepare-missing-file", ("prepare", "nosuch.txt"), ("nosuch.txt", "not found")),
    Case("prepare-empty-file", ("prepare", "empty.txt"), ("empty.txt", "empty"), files={"empty.txt": b""}),
    Case("prepare-binary-file", ("prepare", "model.bin.txt"),
         ("model.bin.txt", "binary", f"offset {BINARY.index(0)}"), files={"model.bin.txt": BINARY}),
    Case("prepare-latin1-file", ("prepare", "latin1.txt"),
         ("latin1.txt", "UTF-8", f"offset {LATIN1.index(0xE9)}"), files={"latin1.txt": LATIN1}),
    Case("prepare-bad-utf8-across-4MiB-block", ("prepare", "big.txt"),
         ("big.txt", "UTF-8", f"offset {CHUNK - 2}"), files={"big.txt": ACROSS_CHUNK}),
    Case("prepare-file-ends-inside-a-character", ("prepare", "cut.txt"),
         ("cut.txt", "UTF-8", f"offset {TRUNCATED.index(0xC3)}"), files={"cut.txt": TRUNCATED}),
    Case("prepare-text-too-short-to-split", ("prepare", "one.txt", "--out", "prepared"), ("too short",),
         files={"one.txt": b"a"}),
    # ---- tokenizer and split ------------------------------------------------------------------
    Case("tokenizer-wordpiece", ("prepare", "small.txt", "--tokenizer", "wordpiece"), ("wordpiece",),
         files={"small.txt": SMALL}),
    Case("tokenizer-bpe-not-a-number", ("prepare", "small.txt", "--tokenizer", "bpe:abc"), ("bpe:abc",),
         files={"small.txt": SMALL}),
    Case("tokenizer-bpe-too-small", ("prepare", "small.txt", "--tokenizer", "bpe:10"), ("bpe:10", "258"),
         files={"small.txt": SMALL}),
    Case("val-fraction-above-one", ("prepare", "small.txt", "--val-fraction", "1.5"), ("--val-fraction", "between 0 and 1", "1.5"),
         files={"small.txt": SMALL}),
    # ---- corpus too short for one context window plus the next token ----------------------------
    Case("block-size-larger-than-val-split", ("train", "--data", "{data}", "--block-size", "4096"),
         ("val split", "--block-size")),
    # Training straight from text: the text is prepared (complete files in data/tiny-char, reused
    # next time), then training stops before any run folder is made.
    Case("text-shorter-than-one-context", ("train", "tiny.txt", "--block-size", "64"), ("val split", "--block-size"),
         files={"tiny.txt": b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5},
         absent=("best.safetensors", "last.safetensors", "train_state.pt", "config.json")),
    # ---- settings -----------------------------------------------------------------------------
    Case("unknown-preset", ("train", "--data", "{data}", "--preset", "gpt5"), ("gpt5", "cpu-tiny")),
    Case("n-embd-not-divisible-by-n-head", ("train", "--data", "{data}", "--n-embd", "30", "--n-head", "4"),
         ("--n-embd 30", "--n-head 4")),
    Case("learning-rate-zero", ("train", "--data", "{data}", "--lr", "0"), ("--learning-rate", "positive")),
    Case("learning-rate-negative", ("train", "--data", "{data}", "--learning-rate", "-0.001"),
         ("--learning-rate", "positive", "-0.001")),
    Case("batch-size-zero", ("train", "--data", "{data}", "--batch-size", "0"), ("--batch-size", "positive")),
    Case("batch-size-negative", ("train", "--data", "{data}", "--batch-size", "-4"), ("--batch-size", "positive", "-4")),
    Case("max-iters-zero", ("train", "--data", "{data}", "--max-iters", "0"), ("--max-iters", "positive")),
    Case("max-iters-negative", ("train", "--data", "{data}", "--max-iters", "-10"), ("--max-iters", "positive", "-10")),
    # ---- argparse -----------------------------------------------------------------------------
    Case("int-flag-not-a-number", ("train", "--data", "{data}", "--batch-size", "twelve"), ("--batch-size", "twelve")),
    Case("int-flag-given-a-float", ("train", "--data", "{data}", "--max-iters", "1.5"), ("--max-iters", "1.5")),
    Case("float-flag-not-a-number", ("train", "--data", "{data}", "--lr", "fast"), ("--lr", "fast")),
    Case("misspelt-flag", ("train", "--data", "{data}", "--n-layers", "2"), ("--n-layers",)),
    Case("no-command", (), ("COMMAND",)),
    # ---- several processes --------------------------------------------------------------------
    Case("nproc-zero", ("train", "--data", "{data}", "--nproc", "0"), ("--nproc", "positive", "0")),
    Case("nproc-not-a-number", ("train", "--data", "{data}", "--nproc", "two"), ("--nproc", "two")),
    Case("nnodes-without-rdzv-endpoint", ("train", "--data", "{data}", "--nproc", "2", "--nnodes", "2"),
         ("--nnodes", "--rdzv-endpoint")),
    # ---- config files -------------------------------------------------------------------------
    Case("config-not-json", ("train", "--data", "{data}", "--config", "settings.json"), ("settings.json", "JSON"),
         files={"settings.json": '{"n_layer": 2,\n"n_head": 2\n'}),
    Case("config-unknown-key", ("train", "--data", "{data}", "--config", "settings.json"),
         ("settings.json", "n_layers"), files={"settings.json": '{"n_layers": 2}\n'}),
    Case("config-section-not-an-object", ("train", "--data", "{data}", "--config", "settings.json"),
         ("settings.json", "model"), files={"settings.json": '{"model": [2, 2], "train": {}}\n'}),
    Case("config-value-of-wrong-type", ("train", "--data", "{data}", "--config", "settings.json"),
         ("learning",), files={"settings.json": '{"learning_rate": "fast"}\n'}),
    # ---- data and run folders -----------------------------------------------------------------
    Case("data-folder-without-meta", ("train", "--data", "loose"), ("loose", "meta.json"),
         files={"loose/train.bin": b"\0" * 64}),
    Case("data-folder-missing", ("train", "--data", "nosuch"), ("nosuch", "not found")),
    Case("resume-folder-without-run", ("train", "--resume", "empty-run"), ("--resume", "empty-run"),
         dirs=("empty-run",)),
    Case("resume-run-without-checkpoint", ("train", "--resume", "early"), ("early", "last.safetensors"),
         files={"early/config.json": json.dumps({"data": "{data}", "n_layer": 1, "n_head": 1, "n_embd": 16,
                                                 "block_size": 16, "batch_size": 4, "max_iters": 2})}),
    Case("info-folder-not-a-run", ("info", "notes"), ("notes", "config.json"), files={"notes/readme.md": b"hi\n"}),
    Case("info-nothing-given", ("info",), ("run folder", "--preset")),
]


def run_case(case: Case, cwd: Path, data: Path) -> Outcome:
    """Lay out the case's files in `cwd` and run its command there."""
    for name in case.dirs:
        (cwd / name).mkdir(parents=True)
    for name, content in case.files.items():
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content.replace("{data}", str(data)), encoding="utf-8")
        else:
            path.write_bytes(content)
    before = frozenset(p for p in cwd.rglob("*") if p.is_file())
    out = gptlab(cwd, *(arg.replace("{data}", str(data)) for arg in case.argv))
    out.before = before
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small prepared data folder (char tokenizer, 20 KB of tiny Shakespeare) for the whole module."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "shakespeare20k.txt").write_bytes(CORPUS.read_bytes()[:20_000])
    out = gptlab(root, "prepare", "shakespeare20k.txt", "--tokenizer", "char", "--out", "data")
    assert out.returncode == 0, out.stderr
    assert leftovers(root) == []
    return root / "data"


def train_tiny_run(root: Path, data: Path) -> Path:
    """Train a tiny real run in `root/run`; 64 wide, so its weights (~217 KB) outgrow a 50 KB file limit."""
    out = gptlab(root, "train", "--data", str(data), "--out", "run", *TINY, "--n-embd", "64", "--quiet")
    assert out.returncode == 0, out.stderr
    assert leftovers(root) == []
    return root / "run"


@pytest.fixture(scope="module")
def background(prepared: Path, tmp_path_factory: pytest.TempPathFactory):
    """Start the tiny run and every single-command case at once (each in its own folder); id -> Future."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    jobs = {"tiny-run": pool.submit(train_tiny_run, tmp_path_factory.mktemp("tiny-run"), prepared)}
    jobs.update({case.id: pool.submit(run_case, case, tmp_path_factory.mktemp(case.id), prepared) for case in CASES})
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def tiny_run(background: dict[str, concurrent.futures.Future]) -> Path:
    """The finished tiny run; a test copies it before changing anything."""
    return background["tiny-run"].result()


# --------------------------------------------------------------------------------------------------
# multi-step scenarios, each on a copy of the tiny run (this one overlaps the background cases)


def test_out_already_holds_a_different_run(prepared: Path, tiny_run: Path, tmp_path: Path) -> None:
    """Training into a run folder needs --resume or --overwrite; the old run is untouched until then."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = file_hashes(run)

    clash = gptlab(tmp_path, "train", "--data", str(prepared), "--out", "run", *TINY, "--n-embd", "32", "--quiet")
    assert_clean_failure(clash, ("run", "already holds a run", "--resume", "--overwrite"), absent=())
    assert file_hashes(run) == before

    again = gptlab(tmp_path, "train", "--data", str(prepared), "--out", "run", *TINY, "--n-embd", "32",
                   "--overwrite", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert json.loads((run / "config.json").read_text())["model"]["n_embd"] == 32
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# the single-command cases, one test each


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.bug, strict=True)] if c.bug else []) for c in CASES],
)
def test_bad_input(case: Case, background: dict[str, concurrent.futures.Future]) -> None:
    """The command fails with exit 2 and one line that names the problem, leaving nothing half-written."""
    assert_clean_failure(background[case.id].result(), case.expect, case.absent)


# --------------------------------------------------------------------------------------------------
# last, once every background command has finished (see preexec_fn below)


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX resource limits")
def test_disk_full_while_saving_keeps_the_last_checkpoint(
    tiny_run: Path, tmp_path: Path, background: dict[str, concurrent.futures.Future]
) -> None:
    """A write that fails (EFBIG under a file-size limit) is one line naming the file; the old checkpoint stays."""
    import resource

    from safetensors import safe_open

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    last = (run / "last.safetensors").read_bytes()
    before = file_hashes(run)
    limit = 50_000
    assert len(last) > limit, "the weights must be bigger than the file-size limit for this check to mean anything"

    # preexec_fn runs between fork and exec: wait until no other thread is starting processes.
    concurrent.futures.wait(background.values())
    full = gptlab(tmp_path, "train", "--resume", "run", "--max-iters", "4", "--quiet",
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = assert_clean_failure(full, (".safetensors",), absent=())
    assert re.search(r"\b(best|last)\.safetensors\b", line), line
    after = file_hashes(run)
    for name in ("last.safetensors", "best.safetensors", "train_state.pt"):
        assert after[name] == before[name], f"{name} changed although the save failed"
    with safe_open(str(run / "last.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and all(t.size for t in tensors.values())
