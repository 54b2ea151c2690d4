"""The Gradio page: a prompt, the sampling settings, text that streams in, and each model's card.

Design choices:
- `build_page` needs only loaded models, so the same Blocks serve under `gptlab serve` (mounted
  beside the API, sharing its models and queues) or alone, e.g. as a Hugging Face Space
  (`build_page(load_models(["runs/x"], Limits())).launch()`).
- The sampling controls are made from config.py's tables, SAMPLE_FIELD_NAMES (which fields, and
  their labels) and SAMPLE_PAGE_CONTROLS (ranges, unset values): a new SampleConfig field with
  entries there appears on the page, in the API (as an extra parameter) and on the command line
  with no change here. Each reaches the handler as a keyword of its field's name (so also in the
  `/generate` API of gradio_client) and becomes a SampleConfig in `serve/params.py`, the
  translation the API shares. A bad value is reported with the control's label.
- Generation goes through the model's `GenerationQueue`, as the API's does: one ceiling for both.
  Gradio's own per-event limit is off (concurrency_limit=None) so it does not queue in front of it.
- Several samples stream side by side into one box, each shown with its prompt and separated by an
  "=== Next Sequence ===" line. Updates are sent at most every 50 ms.
- Stop cancels the Gradio event; the handler's `finally` cancels the job, which ends at its next token.
- Analytics are off before Gradio is imported, and the default theme's fonts are served locally, so
  the page makes no request beyond the server it came from.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptlab.config import SAMPLE_FIELD_NAMES, SAMPLE_PAGE_CONTROLS, SampleConfig, SettingError
from gptlab.errors import GptlabError
from gptlab.serve.limits import Busy, Limits
from gptlab.serve.models import ServedModel
from gptlab.serve.params import page_config

SEPARATOR = "\n\n=== Next Sequence ===\n\n"
UPDATE_EVERY = 0.05  # seconds between updates of the streamed text
# Settings whose slider ends at a ceiling of the server, and where those sliders start.
CEILINGS = {"max_new_tokens": "max_new_tokens_limit", "num_samples": "max_n"}
PAGE_START = {"max_new_tokens": 200}
EXAMPLES = ("ROMEO:", "JULIET:\nO Romeo, Romeo!", "Once upon a time", "The meaning of life is")


def _gradio() -> Any:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


def controls(limits: Limits) -> list[tuple[str, str, dict[str, Any]]]:
    """The sampling controls, top to bottom: (SampleConfig field, gradio component, its settings).

    Made from SAMPLE_FIELD_NAMES (which fields, their labels) and SAMPLE_PAGE_CONTROLS (ranges, unset
    values), with the field's own default and the last clause of its help as the hint below it.
    """
    out = []
    for name, names in SAMPLE_FIELD_NAMES.items():
        if names["page"] is None:
            continue
        hint = SampleConfig.__dataclass_fields__[name].metadata.get("help", "").rsplit("; ", 1)[-1]
        look = SAMPLE_PAGE_CONTROLS.get(name, {})
        if name in CEILINGS:  # the server's own ceiling is the slider's end
            top = getattr(limits, CEILINGS[name])
            out.append((name, "Slider", dict(minimum=1, maximum=top, step=1, value=min(PAGE_START.get(name, 1), top))))
        elif str(SampleConfig.__dataclass_fields__[name].type).startswith("tuple"):
            out.append((name, "Textbox", dict(value="", lines=2, placeholder="one per line; \\n means a newline")))
        elif "unset" in look:
            unset = look["unset"]
            meaning = hint.split(" = ", 1)[-1] if " = " in hint else "off"
            out.append((name, "Number", dict(value=unset, precision=0, minimum=unset, info=f"{unset} = {meaning}")))
        else:
            low, high, step = look["range"]
            out.append((name, "Slider", dict(minimum=low, maximum=high, step=step,
                                             value=getattr(SampleConfig, name), info=hint)))
    return out


def sampling_inputs(limits: Limits) -> dict[str, Any]:
    """The sampling controls made in the current Blocks context, by SampleConfig field."""
    gr = _gradio()
    return {field: getattr(gr, kind)(label=SAMPLE_FIELD_NAMES[field]["page"], **options)
            for field, kind, options in controls(limits)}


async def stream_text(served: ServedModel, prompt: str, settings: dict[str, Any], limits: Limits) -> AsyncIterator[str]:
    """The page's generation: the prompt and each sample so far, every UPDATE_EVERY seconds; errors as gr.Error.

    Goes through the model's `GenerationQueue`, as the API does; a Stop (the event cancelled) cancels
    the job, which ends at its next token.
    """
    gr = _gradio()
    prompt = prompt or ""
    try:
        config = page_config(prompt, settings, limits)
        served.check_memory(config, served.prompt_tokens(prompt))  # unknown characters are named here
        job = served.queue.submit(lambda: served.work([prompt], config))
    except SettingError as e:
        raise gr.Error(e.message_for("page")) from None
    except GptlabError as e:
        raise gr.Error(str(e)) from None
    except Busy as e:
        raise gr.Error(f"{e} (in about {e.retry_after} s)") from None
    texts = [""] * config.num_samples
    shown = 0.0
    try:
        async for index, piece, _ in job:
            texts[index] += piece
            now = time.monotonic()
            if now - shown >= UPDATE_EVERY:
                shown = now
                yield SEPARATOR.join(prompt + t for t in texts)
        yield SEPARATOR.join(prompt + t for t in texts)
    except GptlabError as e:
        raise gr.Error(str(e)) from None
    finally:
        job.cancel()


def build_page(models: Sequence[ServedModel], limits: Limits | None = None, title: str = "gptlab",
               api_help: str | None = None) -> Any:
    """A Gradio Blocks page for `models` (launch it, or mount it with `gr.mount_gradio_app`)."""
    gr = _gradio()
    limits = limits or Limits()
    if not models:
        raise GptlabError("give at least one model to show on the page")
    by_name = {m.name: m for m in models}
    first = models[0]
    examples = [p for p in EXAMPLES if _encodes(first, p)]

    async def generate(name: str, prompt: str, **settings: Any) -> AsyncIterator[str]:
        async for text in stream_text(by_name.get(name) or first, prompt, settings, limits):
            yield text

    def describe(name: str) -> tuple[str, str | None]:
        served = by_name.get(name) or first
        plot = served.loss_plot
        return served.card(), str(plot) if plot else None

    with gr.Blocks(title=f"{title}: {', '.join(by_name)}", analytics_enabled=False) as page:
        gr.Markdown(f"## {title}: sample a GPT you trained")
        model = gr.Dropdown(list(by_name), value=first.name, label="Model", visible=len(models) > 1)
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Leave empty to start from nothing",
                                        elem_id="prompt")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    output = gr.Textbox(label="Generated text", lines=16, max_lines=40, buttons=["copy"],
                                        interactive=False, elem_id="output")
                with gr.Column(scale=2):
                    settings = sampling_inputs(limits)
            if examples:
                gr.Examples([[e] for e in examples], inputs=[prompt], label="Example prompts")
        with gr.Tab("Model"):
            card_text, plot_path = describe(first.name)
            card = gr.Markdown(card_text)
            plot = gr.Image(plot_path, type="filepath", label="Training and validation loss", interactive=False,
                            buttons=["download", "fullscreen"])
            if api_help:
                gr.Markdown(api_help)
        event = run.click(generate, [model, prompt], output, inputs_kwargs=settings, api_name="generate",
                          concurrency_limit=None)
        stop_button.click(None, None, None, cancels=[event])
        model.change(describe, model, [card, plot], api_visibility="private")
    return page


def _encodes(served: ServedModel, prompt: str) -> bool:
    try:
        served.prompt_tokens(prompt)
        return True
    except GptlabError:
        return False
