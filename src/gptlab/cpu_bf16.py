"""bf16 on a CPU: what the chip reports, what a short measurement says, and a cache of the answer.

The CPU's flags are not enough to decide whether to train in bf16 autocast: bf16 matmuls run 2.2x
float32 on a Zen 4 (a GPT-2 124M step 1.85x), 140-630x slower on an AVX2-only Zen 3, and 0.6x on an
AVX512-BF16 Xeon without AMX. So:
- without AVX512-BF16, AMX or Arm BF16 that torch can use (its vector kernels and oneDNN must
  support bf16 too), float32, and nothing is measured;
- with them, a probe of a few hundred ms times one MLP block's forward and backward at the model's
  width, float32 and bf16 autocast alternately on one thread, fastest of each; bf16 needs 1.1x,
  because a closer call could be noise. Small models can be faster in float32 even there: the
  casts autocast adds cost more than their matmuls save;
- the measurement is kept per machine (CPU model, bf16 flags, torch's kernels, core count, torch
  version) and width in cpu.json in gptlab's cache folder ($GPTLAB_HOME or ~/.cache/gptlab),
  written whole (a temporary file renamed into place). A missing, corrupt or unwritable cache only
  means measuring again;
- GPTLAB_CPU_BF16=1 or 0 skips both and says yes or no, for tests and for users who know.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptlab import distributed
from gptlab.cores import intra_op_threads
from gptlab.errors import GptlabError
from gptlab.fsutil import gptlab_home

CPU_BF16_ENV = "GPTLAB_CPU_BF16"
# /proc/cpuinfo's names for bf16 matrix instructions, strongest first, and how messages name them
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}
BF16_MIN_SPEEDUP = 1.1  # auto picks bf16 only when it is clearly faster: a closer call could be noise
PROBE_WIDTH = 384  # the width measured when the caller does not give the model's
PROBE_MAX_WIDTH = 768  # wider blocks are as matmul-bound as GPT-2's, and would take longer to time
PROBE_FLOPS = 2e9  # float32 work in one timed repetition: 10-30 ms on one core
PROBE_SECONDS = 0.25  # repetitions stop once this much time is spent (after PROBE_MIN_PAIRS pairs)
PROBE_MIN_PAIRS, PROBE_MAX_PAIRS = 3, 12
CACHE_FILE = "cpu.json"
CACHE_FORMAT = 1


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and "flags" in fields:
            break  # every core repeats the same block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _onednn_bf16() -> bool:
    """Whether oneDNN, which runs torch's bf16 matmuls on a CPU, supports bf16 here."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a oneDNN-less torch build
        return torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class CpuBf16:
    """What the CPU and torch report about bf16, before anything is measured."""

    model: str
    flags: tuple[str, ...]  # the bf16 flags present, strongest first
    capability: str  # the vector instruction set torch's own kernels use: DEFAULT, AVX2, AVX512, ...
    onednn_bf16: bool

    @property
    def native(self) -> bool:
        # A flag alone is not enough: torch must be able to use it (ATEN_CPU_CAPABILITY=default turns
        # its vector kernels off, and a torch without oneDNN has no fast bf16 matmul at all).
        return bool(self.flags) and self.onednn_bf16 and self.capability != "DEFAULT"

    @property
    def label(self) -> str:
        return BF16_FLAGS[self.flags[0]] if self.flags else "no bf16 instructions"

    def why_not_native(self) -> str:
        if not self.flags:
            return "this CPU has no AVX512-BF16 or AMX: bf16 matmuls would run >100x slower than float32"
        if not self.onednn_bf16:
            return f"{self.label}, but this torch build's oneDNN cannot use it"
        return f"{self.label}, but torch runs its {self.capability} kernels here (see ATEN_CPU_CAPABILITY)"

    def machine_key(self) -> str:
        """What identifies this machine's measurements: chip, bf16 support, cores and torch."""
        flags = " ".join(self.flags) or "no bf16 flags"
        return f"{self.model} | {flags} | {self.capability} | {os.cpu_count()} cores | torch {torch.__version__}"


def detect_cpu_bf16() -> CpuBf16:
    """This CPU's bf16 support as /proc/cpuinfo and torch report it."""
    fields = _cpuinfo()
    present = set((fields.get("flags") or fields.get("Features") or "").split())  # x86 or Arm
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return CpuBf16(model, tuple(f for f in BF16_FLAGS if f in present), capability, _onednn_bf16())


def forced_cpu_bf16() -> bool | None:
    """What $GPTLAB_CPU_BF16 forces: True (1), False (0), or None when unset or empty (detect and measure)."""
    value = os.environ.get(CPU_BF16_ENV, "")
    if value == "":
        return None
    if value not in ("0", "1"):
        raise GptlabError(f"{CPU_BF16_ENV} must be 1 (train in bf16 autocast on a CPU) or 0 (float32), got {value!r}; "
                          "unset it to let gptlab measure")
    return value == "1"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions torch can use (or $GPTLAB_CPU_BF16 says so)."""
    forced = forced_cpu_bf16()
    return detect_cpu_bf16().native if forced is None else forced


@dataclass(frozen=True)
class Bf16Probe:
    """One measurement: how much faster a block trains under bf16 autocast than in float32."""

    speedup: float  # float32 time over bf16-autocast time (above 1: bf16 is faster)
    float32_ms: float
    bfloat16_ms: float
    width: int
    measured_at: str  # UTC, ISO 8601


def measure_bf16_speedup(width: int) -> Bf16Probe:
    """Time one MLP block's forward and backward at `width` in float32 and under bf16 autocast, alternately.

    A CPU training step is mostly its linear layers' matmuls, forward and backward, at the model's
    width, plus what autocast adds: casting the weights every step and running GELU in bf16. One
    block (width -> 4 x width -> width) has all of it, and its speed ratio follows a GPT step's
    (on an AVX512-BF16 Xeon without AMX: 0.65-0.8x here, 0.55-0.68x for GPT steps 64 to 768 wide).
    Small widths are measured as they are, because there the casts, not the matmuls, decide.

    It runs on one thread: the ratio is the kernels', and one thread keeps it clear of a thread
    pool's start-up (two threads ran 100x slower in a fresh process on a 2-core VM) and of whatever
    else runs on the other cores, so the same figure holds for every thread count.
    """
    generator = torch.Generator().manual_seed(0)  # its own: training's random stream stays untouched
    tokens = min(512, max(64, round(PROBE_FLOPS / (48 * width * width))))  # 48 w^2 FLOPs per token
    x = torch.randn(tokens, width, generator=generator).requires_grad_()
    w1 = (torch.randn(4 * width, width, generator=generator) * 0.02).requires_grad_()
    w2 = (torch.randn(width, 4 * width, generator=generator) * 0.02).requires_grad_()

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # a fresh one, as each step enters
            y = F.linear(F.gelu(F.linear(x, w1)), w2)
        y.float().square().mean().backward()
        x.grad = w1.grad = w2.grad = None
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.enable_grad(), intra_op_threads(1):
        step(False), step(True)  # warm-up: oneDNN builds its kernels on first use
        start = time.perf_counter()
        pairs = 0
        while pairs < PROBE_MAX_PAIRS and (pairs < PROBE_MIN_PAIRS or time.perf_counter() - start < PROBE_SECONDS):
            # alternate, the order flipped each pair, so a slow spell of a shared machine hits both alike
            for bf16 in (False, True) if pairs % 2 == 0 else (True, False):
                times[bf16].append(step(bf16))
            pairs += 1
    # the fastest repetition of each: what the CPU does when nothing else gets in the way
    f32, bf16 = min(times[False]), min(times[True])
    return Bf16Probe(speedup=round(f32 / bf16, 3), float32_ms=round(f32 * 1e3, 3), bfloat16_ms=round(bf16 * 1e3, 3),
                     width=width, measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def cache_path() -> Path | None:
    """The measurement cache, cpu.json in gptlab's cache folder ($GPTLAB_HOME or ~/.cache/gptlab); None without a home."""
    try:
        return gptlab_home() / CACHE_FILE
    except RuntimeError:  # no home folder to be found
        return None


def _shown(path: Path) -> str:
    """`path` with the home folder written as ~, as a user would type it."""
    with contextlib.suppress(RuntimeError, ValueError):
        return "~/" + str(path.relative_to(Path.home()))
    return str(path)


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's machines; {} when the file is missing, unreadable or not what gptlab writes (it is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("machines"), dict):
        return {}
    return data["machines"]


def _cached_probe(path: Path, machine: str, entry: str) -> Bf16Probe | None:
    """The measurement cached for `machine` and `entry`, or None (also when the entry is damaged)."""
    found = _read_cache(path).get(machine)
    try:
        probe = Bf16Probe(**found[entry])
        return probe if math.isfinite(probe.speedup) and probe.speedup > 0 else None
    except (KeyError, TypeError):
        return None


def _write_cache(path: Path, machine: str, entry: str, probe: Bf16Probe) -> str:
    """Add `probe` to the cache: '' when written, else why not (training goes on without the cache)."""
    machines = _read_cache(path)
    entries = machines.get(machine) if isinstance(machines.get(machine), dict) else {}
    machines[machine] = {**entries, entry: asdict(probe)}
    text = json.dumps({"format": CACHE_FORMAT, "machines": machines}, indent=1) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name of its own (two runs may start at once), renamed into place whole
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        return e.strerror or str(e)
    return ""


def bf16_speedup(width: int, cpu: CpuBf16 | None = None) -> tuple[Bf16Probe, str]:
    """bf16 autocast's speed over float32 at `width` on this CPU, from the cache or measured now; and where it is kept.

    Rank 0 measures first and the other ranks then read its answer: ranks timing at once would
    slow each other down, and could disagree.
    """
    cpu = cpu or detect_cpu_bf16()
    width = max(16, min(width, PROBE_MAX_WIDTH))
    entry = f"{width} wide"
    path = cache_path()
    with distributed.main_first():
        probe = _cached_probe(path, cpu.machine_key(), entry) if path else None
        if probe is not None:
            return probe, f"measured {probe.measured_at[:10]}, kept in {_shown(path)}"
        probe = measure_bf16_speedup(width)
        failed = _write_cache(path, cpu.machine_key(), entry, probe) if path else "no home folder"
    return probe, f"not cached: {failed}" if failed else f"cached in {_shown(path)}"


@dataclass(frozen=True)
class Bf16Choice:
    """Whether to train in bf16 autocast on this CPU, and why."""

    native: bool  # bf16 instructions torch can use (or forced on): an explicit --dtype bfloat16 runs
    use: bool  # what --dtype auto picks
    why: str
    speedup: float | None = None  # measured, when it was


def cpu_bf16_choice(width: int | None = None) -> Bf16Choice:
    """$GPTLAB_CPU_BF16 when set; else float32 without bf16 instructions; else what a measurement at `width` says."""
    forced = forced_cpu_bf16()
    if forced is not None:
        return Bf16Choice(forced, forced, f"forced by {CPU_BF16_ENV}={int(forced)}")
    cpu = detect_cpu_bf16()
    if not cpu.native:  # nothing to measure: float32, as fast as ever
        return Bf16Choice(False, False, cpu.why_not_native())
    probe, kept = bf16_speedup(width or PROBE_WIDTH, cpu)
    measured = f"bf16 autocast measured {probe.speedup:.2f}x float32 at width {probe.width}"
    if probe.speedup >= BF16_MIN_SPEEDUP:
        return Bf16Choice(True, True, f"{cpu.label}, {measured}; {kept}", probe.speedup)
    return Bf16Choice(True, False, f"{cpu.label}, but {measured} on this CPU (auto needs {BF16_MIN_SPEEDUP}x); {kept}",
                      probe.speedup)
