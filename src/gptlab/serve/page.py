"""The Gradio page: a prompt, the sampling settings, text that streams in, a chat, and each model's card.

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
- A chat model (one fine-tuned with `gptlab train --init-from RUN --chat FILE.jsonl`) gets a Chat
  tab: a `gr.ChatInterface` whose history, after the system prompt when one is given, is the list of
  messages the run's chat template encodes. It shares the Generate tab's path to the queue
  (`stream_samples`), so the ceilings, Busy, Stop and errors behave the same; it makes one reply per
  turn, so it has no Samples control, and the reply ends at the template's end of turn. Replies show
  as plain text, as the model wrote them: a small model's stray `*` or `_` would otherwise turn into
  emphasis.
- When no model on the page chats, there is no Chat tab at all, rather than one saying how to
  fine-tune: this page is what a served model's visitors see (e.g. on a Space), who cannot fine-tune
  it, and its trainer is told how by `gptlab chat` and /v1/chat/completions. The page and its Gradio
  API then stay as they were. With chat and plain models in the dropdown, the tab stays (Gradio 6
  does not hide or show a tab after the page loads) and its content follows the selected model: the
  chat, or a line saying this model does not chat and how one is made.
- Analytics are off before Gradio is imported, and the default theme's fonts are served locally, so
  the page makes no request beyond the server it came from.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
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
CHAT_START = {"max_new_tokens": 256}
NOT_CHAT = ("This model was not fine-tuned for chat: pick a chat model above. One is made with "
            "`gptlab train --init-from RUN --chat FILE.jsonl`.")
EXAMPLES = ("ROMEO:", "JULIET:\nO Romeo, Romeo!", "Once upon a time", "The meaning of life is")


def _gradio() -> Any:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


def controls(limits: Limits, start: dict[str, int] | None = None,
             leave_out: tuple[str, ...] = ()) -> list[tuple[str, str, dict[str, Any]]]:
    """The sampling controls, top to bottom: (SampleConfig field, gradio component, its settings).

    Made from SAMPLE_FIELD_NAMES (which fields, their labels) and SAMPLE_PAGE_CONTROLS (ranges, unset
    values), with the field's own default and the last clause of its help as the hint below it.
    `start`: where the ceiling sliders start (PAGE_START by default); `leave_out`: fields not shown.
    """
    start = PAGE_START if start is None else start
    out = []
    for name, names in SAMPLE_FIELD_NAMES.items():
        if names["page"] is None or name in leave_out:
            continue
        hint = SampleConfig.__dataclass_fields__[name].metadata.get("help", "").rsplit("; ", 1)[-1]
        look = SAMPLE_PAGE_CONTROLS.get(name, {})
        if name in CEILINGS:  # the server's own ceiling is the slider's end
            top = getattr(limits, CEILINGS[name])
            out.append((name, "Slider", dict(minimum=1, maximum=top, step=1, value=min(start.get(name, 1), top))))
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


def sampling_inputs(limits: Limits, start: dict[str, int] | None = None,
                    leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The sampling controls made in the current Blocks context, by SampleConfig field (see `controls`)."""
    gr = _gradio()
    return {field: getattr(gr, kind)(label=SAMPLE_FIELD_NAMES[field]["page"], **options)
            for field, kind, options in controls(limits, start, leave_out)}


async def stream_text(served: ServedModel, prompt: str, settings: dict[str, Any], limits: Limits) -> AsyncIterator[str]:
    """The Generate tab's text: the prompt and each sample so far, every UPDATE_EVERY seconds; errors as gr.Error."""
    prompt = prompt or ""
    async with aclosing(stream_samples(served, prompt, settings, limits)) as samples:
        async for texts in samples:
            yield SEPARATOR.join(prompt + t for t in texts)


async def stream_reply(served: ServedModel, messages: list[dict[str, str]], settings: dict[str, Any],
                       limits: Limits) -> AsyncIterator[str]:
    """The Chat tab's reply to `messages` so far, every UPDATE_EVERY seconds; errors as gr.Error."""
    async with aclosing(stream_samples(served, messages, settings, limits)) as samples:
        async for texts in samples:
            yield texts[0]


async def stream_samples(served: ServedModel, prompt: str | list[dict[str, str]], settings: dict[str, Any],
                         limits: Limits) -> AsyncIterator[list[str]]:
    """Each sample's text so far after `prompt` (text, or chat messages), every UPDATE_EVERY seconds and at the end.

    Goes through the model's `GenerationQueue`, as the API does; a Stop (the event cancelled) cancels
    the job, which ends at its next token. Errors come as one-line gr.Error.
    """
    gr = _gradio()
    # A conversation counts against --max-prompt-chars by all of its text.
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    try:
        config = page_config(text, settings, limits)
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
                yield list(texts)
        yield list(texts)
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

    async def chat(message: str, history: list[dict[str, Any]], name: str, system: str,
                   *values: Any) -> AsyncIterator[str]:
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": m["role"], "content": _text(m["content"])} for m in history] + \
            [{"role": "user", "content": message}]
        async for text in stream_reply(by_name.get(name) or first, messages, dict(zip(chat_settings, values)), limits):
            yield text

    def describe(name: str) -> tuple[str, str | None]:
        served = by_name.get(name) or first
        plot = served.loss_plot
        return served.card(), str(plot) if plot else None

    def chat_shown(name: str) -> tuple[Any, Any]:
        chats = (by_name.get(name) or first).model.chats
        return gr.Row(visible=chats), gr.Markdown(visible=not chats)

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
        chat_settings: dict[str, Any] = {}
        if any(m.model.chats for m in models):
            with gr.Tab("Chat", elem_id="chat-tab"):
                not_chat = gr.Markdown(NOT_CHAT, visible=not first.model.chats)
                with gr.Row(visible=first.model.chats) as chat_row:
                    talk = gr.Column(scale=3)
                    with gr.Column(scale=2, elem_id="chat-settings"):
                        system = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt",
                                            placeholder="Optional: how the assistant should behave")
                        chat_settings = sampling_inputs(limits, CHAT_START, leave_out=("num_samples",))
                # The settings reach `chat` by field name in the `/chat` API too, as they reach `generate`.
                chat.__signature__ = _signature(chat, [*chat_settings])  # type: ignore[attr-defined]
                with talk:  # made after its inputs, shown left of them
                    chatbot = gr.Chatbot(label="Conversation", render_markdown=False, elem_id="chatbot",
                                         placeholder="Say something to the model")
                    talking = gr.ChatInterface(chat, chatbot=chatbot, additional_inputs=[model, system, *chat_settings.values()],
                                               api_name="chat", concurrency_limit=None, autofocus=False, fill_height=False)
                    talking.textbox.elem_id = "chat-input"  # a name to find it by: its placeholder changes after a turn
            model.change(chat_shown, model, [chat_row, not_chat], api_visibility="private")
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


def _signature(fn: Any, names: list[str]) -> inspect.Signature:
    """`fn`'s signature with its *args spelled out as `names`."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_POSITIONAL]
    return inspect.Signature([*params, *(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names)])


def _text(content: Any) -> str:
    """A chat message's text: the Chatbot gives its content as a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _encodes(served: ServedModel, prompt: str) -> bool:
    try:
        served.prompt_tokens(prompt)
        return True
    except GptlabError:
        return False
