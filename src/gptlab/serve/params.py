"""What the page's controls and the API's request fields mean as a SampleConfig: the one translation.

Design choices:
- Both front ends name SampleConfig's fields through `SAMPLE_FIELD_NAMES` (config.py): the page's
  controls come keyed by field, an API request by its parameter names. Nothing here knows a knob by
  name beyond the conventions below, so a new SampleConfig field passes through as it is.
- A bad value raises `SettingError` with the field; each front end words it with its own name for
  the field (`e.message_for("page")`, `e.message_for("api")`), and the API puts that name in `param`.
- The server's ceilings (`Limits`) are checked here, before SampleConfig, and named as the server's
  flags: the caller can ask for less, not raise them.
- The page's conventions: sliders send whole numbers as floats; top-k 0 and seed -1 (or an empty
  box) mean unset; stop strings are one per line, with \\n, \\t and \\\\ read as in `gptlab sample`.
- The API's are OpenAI's: null means the default, and the defaults are OpenAI's (temperature 1; max
  tokens per route), SampleConfig's for its extra knobs; stop is a string or a list of at most 16.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from gptlab.config import SAMPLE_FIELD_NAMES, SAMPLE_PAGE_CONTROLS, SampleConfig, SettingError
from gptlab.errors import GptlabError
from gptlab.generation import unescape
from gptlab.serve.limits import Limits

# Page controls whose value means "unset" (None in SampleConfig).
PAGE_UNSET = {name: look["unset"] for name, look in SAMPLE_PAGE_CONTROLS.items() if "unset" in look}

# Where OpenAI's default differs from SampleConfig's.
API_DEFAULTS = {"temperature": 1.0}

MAX_STOP_STRINGS = 16

_TYPES = {f.name: str(f.type) for f in fields(SampleConfig)}


def page_config(prompt: str, values: Mapping[str, Any], limits: Limits) -> SampleConfig:
    """The SampleConfig the page's controls describe (`values`: SampleConfig field -> control value)."""
    if len(prompt) > limits.max_prompt_chars:
        raise GptlabError(f"the prompt is {len(prompt):,} characters; this server takes at most "
                          f"{limits.max_prompt_chars:,}")
    settings = {}
    for name, value in values.items():
        kind = _TYPES[name]
        if kind.startswith("tuple"):  # a text box, one item per line
            value = tuple(unescape(line) for line in (value or "").splitlines() if line)
        elif value is None or (name in PAGE_UNSET and value == PAGE_UNSET[name]):
            value = None
        elif kind.startswith("int") and isinstance(value, float) and value.is_integer():
            value = int(value)
        settings[name] = value
    return _within(limits, settings)


def api_config(values: Mapping[str, Any], limits: Limits, default_max_tokens: int,
               extra_stop: tuple[str, ...] = ()) -> SampleConfig:
    """The SampleConfig an API request asks for (`values`: parameter name -> value; None = the default)."""
    settings: dict[str, Any] = {**API_DEFAULTS, "max_new_tokens": min(default_max_tokens, limits.max_new_tokens_limit)}
    for name, names in SAMPLE_FIELD_NAMES.items():
        param = names["api"]
        if param is not None and values.get(param) is not None:
            settings[name] = values[param]
    stop = settings.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise SettingError("stop", f"takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    settings["stop"] = stop + extra_stop
    return _within(limits, settings)


def _within(limits: Limits, settings: dict[str, Any]) -> SampleConfig:
    """SampleConfig(**settings), after the server's ceilings on tokens and samples."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    tokens = settings.get("max_new_tokens", SampleConfig.max_new_tokens)
    if not whole(tokens) or not 1 <= tokens <= limits.max_new_tokens_limit:
        raise SettingError("max_new_tokens", f"must be an integer from 1 to {limits.max_new_tokens_limit:,} "
                                             f"(this server's --max-new-tokens-limit), got {tokens!r}")
    n = settings.get("num_samples", SampleConfig.num_samples)
    if not whole(n) or not 1 <= n <= limits.max_n:
        raise SettingError("num_samples", f"must be an integer from 1 to {limits.max_n} (this server's --max-n), got {n!r}")
    return SampleConfig(**settings, max_new_tokens_limit=limits.max_new_tokens_limit)
