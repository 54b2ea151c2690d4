"""Serving trained runs: a Gradio page and an OpenAI-compatible HTTP API from one process.

    gptlab serve runs/shakespeare                 # http://127.0.0.1:8000/ : the page; /v1/... : the API

    from gptlab.serve import Limits, build_app, build_page, load_models
    models = load_models(["runs/shakespeare"], Limits())
    build_page(models).launch()                   # the page alone (e.g. a Hugging Face Space)

Modules: `limits` (ceilings and the per-model generation queue), `models` (loaded runs and their
cards), `openai_api` (the /v1 routes), `page` (the Gradio Blocks), `app` (the FastAPI app and
`serve`). fastapi, uvicorn and gradio are imported only here, so the rest of gptlab runs without them.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so `gptlab serve` can check its flags and its port before torch loads.
_WHERE = {"build_app": "app", "serve": "app", "Busy": "limits", "GenerationQueue": "limits", "Limits": "limits",
          "ServedModel": "models", "load_models": "models", "build_page": "page"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gptlab.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gptlab.serve.{_WHERE[name]}"), name)
