"""The page of `gptlab ui`: Data, Train (live), Runs, Generate and Share tabs over one `Studio`.

Design choices:
- Every handler is a thin call into `Studio` (the same verbs /ui/api has); a GptlabError becomes a
  gr.Error with its one line, so a bad file or setting is a message on the page, never a traceback.
- The live view polls the run folder once a second (`gr.Timer`): status, tokens/s, elapsed and
  ETA, the loss chart (train and val at each evaluation, and the running train loss between them)
  and the latest sample. The chart is redrawn only when a new point arrived.
- Charts are Gradio's own interactive plots (zoom, hover), fed with tables of points.
- Uploads arrive through Gradio's upload route, capped by --max-upload-mb, and are copied into the
  app's uploads folder under a safe name (`Workspace.save_upload`); the file name the browser sent
  is only ever a hint for that name.
- Generation runs in this process on the core the training job leaves (see `ui/jobs.py`), through
  the same queue and code as `gptlab serve`'s page and API.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.serve.page import sampling_inputs, stream_text
from gptlab.ui.studio import Studio

AUTO = "auto (gptlab picks)"
CUSTOM = "custom"
TOKENIZERS = ("char", "byte", "gpt2", "bpe")
POLL_SEC = 1.0
LOSS_COLUMNS = {"step": float, "tokens seen": float, "loss": float, "series": str}
COMPARE_COLUMNS = {"step": float, "val loss": float, "run": str}
RUN_COLUMNS = ["run", "data", "tokenizer", "parameters", "steps", "best val", "time", "status"]


def _gradio() -> Any:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_stats(stats: dict[str, Any]) -> str:
    """The Data tab's summary of the chosen uploads."""
    tokens = stats["tokens"]

    def count(entry: dict[str, Any]) -> str:
        if entry.get("count") is None:
            return entry.get("note") or "when prepared"
        return ("about " if entry.get("about") else "") + f"{entry['count']:,}"

    return "\n".join([
        f"**{', '.join(stats['uploads'])}**: {stats['bytes']:,} bytes, {stats['chars']:,} characters, "
        f"{stats['distinct_chars']:,} distinct characters, {stats['lines']:,} lines",
        "",
        "| tokenizer | tokens |", "|---|---|",
        *[f"| {name} | {count(entry)} |" for name, entry in tokens.items()],
    ])


def describe_status(status: dict[str, Any]) -> str:
    """The Train tab's live line: status, step, speed, time, and what to do next."""
    name, state = status["name"], status["status"]
    start, progress, evals = status.get("start") or {}, status.get("progress") or {}, status.get("evals") or []
    best = min((e["val_loss"] for e in evals if e.get("val_loss") is not None), default=None)
    parts = [f"**{name}: {state}**"]
    if state == "queued":
        parts.append(f"place {status.get('position', 0)} in the queue")
    step = progress.get("step", evals[-1]["step"] if evals else None)
    if step is not None:
        total = start.get("total_steps")
        parts.append(f"step {step:,}" + (f" of {total:,}" if total else ""))
    if progress.get("tokens_per_sec") and state == "running":
        parts.append(f"{progress['tokens_per_sec']:,.0f} tokens/s")
    if progress.get("elapsed_sec") is not None:
        parts.append(f"elapsed {_duration(progress['elapsed_sec'])}")
    if state == "running" and progress.get("eta_sec") is not None:
        parts.append(f"ETA {_duration(progress['eta_sec'])}")
    if best is not None:
        parts.append(f"best val loss {best:.4f}")
    parts.append(f"{len(evals)} evaluations")
    line = " · ".join(parts)
    if state == "stopped":
        line += "\n\nStopped and saved: **Resume** continues exactly where it stopped."
    elif state == "finished":
        line += "\n\nFinished: sample it on the **Generate** tab, or share it."
    elif state == "failed":
        ending = status.get("ending") or {}
        line += f"\n\nThe job failed{': ' + ending['error'] if ending.get('error') else ''}. Last lines of its log:" \
                f"\n```\n{status.get('log') or '(no output)'}\n```"
    return line


def loss_points(status: dict[str, Any], x: str) -> Any:
    """The live chart's points: train and val loss at each evaluation, and the running train loss."""

    rows = []
    for e in status.get("evals") or []:
        for series, key in (("train", "train_loss"), ("val", "val_loss")):
            if e.get(key) is not None:
                rows.append({"step": e["step"], "tokens seen": e["tokens_seen"], "loss": e[key], "series": series})
    for e in status.get("points") or []:
        if e.get("train_loss") is not None:
            rows.append({"step": e["step"], "tokens seen": e["tokens_seen"], "loss": e["train_loss"],
                         "series": "train (running)"})
    return points_table(rows, LOSS_COLUMNS)


def points_table(rows: list[dict[str, Any]], columns: dict[str, type]) -> Any:
    """A table of chart points with typed columns (so the chart's axes are numeric)."""
    import pandas as pd

    return pd.DataFrame({name: pd.Series([r[name] for r in rows], dtype=kind) for name, kind in columns.items()})


def build_ui_page(studio: Studio, title: str = "gptlab ui") -> Any:
    """The Blocks of `gptlab ui` (mount it with `serve.app.mount_page`)."""
    gr = _gradio()
    import pandas as pd

    from gptlab.config import preset_names
    from gptlab.data import NAMED_DATASETS

    ws = studio.workspace

    def fail(e: GptlabError) -> Exception:
        return gr.Error(str(e))

    # ---- Data

    def uploads_update(selected: list[str] | None = None) -> Any:
        names = ws.uploads()
        keep = [n for n in (selected or []) if n in names]
        return gr.update(choices=names, value=keep)

    def add_files(files: list[Any] | None, selected: list[str]) -> tuple[Any, str]:
        saved, errors = [], []
        for f in files or []:
            path = Path(f if isinstance(f, str) else f.name)
            try:
                with open(path, "rb") as handle:
                    content = handle.read(ws.max_upload_bytes + 1)
                saved.append(ws.save_upload(getattr(f, "orig_name", None) or path.name, content).name)
            except GptlabError as e:
                errors.append(str(e))
        if errors and not saved:
            raise gr.Error(errors[0])
        note = f"added {', '.join(saved)}" + (f"; {len(errors)} refused: {errors[0]}" if errors else "")
        return uploads_update((selected or []) + saved), note

    def add_pasted(text: str, name: str, selected: list[str]) -> tuple[Any, str]:
        try:
            up = ws.save_text(text or "", name or "pasted")
        except GptlabError as e:
            raise fail(e) from None
        return uploads_update((selected or []) + [up.name]), f"added {up.name} ({up.chars:,} characters)"

    def add_dataset(name: str, selected: list[str]) -> tuple[Any, str]:
        from gptlab.data import fetch_named_dataset

        if name not in NAMED_DATASETS:
            raise gr.Error("pick a dataset from the list")
        try:
            path = fetch_named_dataset(name)
            up = ws.save_upload(name, path.read_bytes())
        except GptlabError as e:
            raise fail(e) from None
        return uploads_update((selected or []) + [up.name]), f"added {up.name} ({up.chars:,} characters)"

    def show_stats(selected: list[str]) -> tuple[str, str]:
        if not selected:
            return "Choose uploads to see what they hold.", ""
        try:
            stats = ws.text_stats(selected)
        except GptlabError as e:
            raise fail(e) from None
        return describe_stats(stats), stats["preview"]

    def tokenizer_spec(kind: str, size: float | None) -> str:
        if kind == "bpe":
            if size is None or size < 257 or size != int(size):
                raise gr.Error("a bpe vocabulary is a whole number above 256, e.g. 512")
            return f"bpe:{int(size)}"
        return kind

    def prepare(selected: list[str], kind: str, size: float | None,
                progress: Any = gr.Progress()) -> tuple[str, Any]:  # noqa: B008 (how Gradio asks for a progress bar)
        spec = tokenizer_spec(kind, size)
        try:
            out = ws.prepare(selected or [], spec, progress=lambda fraction, message: progress(fraction, desc=message))
        except GptlabError as e:
            raise fail(e) from None
        folders = [d["name"] for d in ws.data_folders()]
        return f"Prepared **{out.name}**: train on it on the **Train** tab.", gr.update(choices=folders, value=out.name)

    # ---- Train

    def plan_of(data: str, preset: str, n_layer: Any, n_head: Any, n_embd: Any, block_size: Any, arch: str,
                budget_kind: str, budget: Any, optimizer: str, lr: Any, eval_interval: Any, run: str) -> Any:
        # a cleared number box reads as 0 or None: both mean "the shape's own"
        settings: dict[str, Any] = {"learning_rate": lr or None, "eval_interval": eval_interval or None}
        if optimizer in ("adamw", "muon"):
            settings["optimizer"] = optimizer
        if preset == CUSTOM:
            settings.update(arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        chosen = None if preset in (AUTO, CUSTOM) else preset
        minutes, steps = (budget, None) if budget_kind == "minutes" else (None, budget)
        return studio.plan(data, run or None, chosen, minutes, steps, settings)

    def show_plan(*choices: Any) -> str:
        if not choices[0]:
            return "Prepare some text on the **Data** tab, then choose it here."
        try:
            plan = plan_of(*choices)
        except GptlabError as e:
            return f"⚠️ {e}"
        text = f"**{plan.run}**: {plan.params:,} parameters, {plan.shape}. Why: {plan.reason}."
        if plan.warning:
            text += f"\n\n⚠️ {plan.warning}"
        return text

    def start(*choices: Any) -> tuple[str, str]:
        if not choices[0]:
            raise gr.Error("choose prepared data first (Data tab)")
        try:
            plan = plan_of(*choices)
            status = studio.start(plan)
        except GptlabError as e:
            raise fail(e) from None
        return plan.run, describe_status(status)

    def control(verb: Any, nothing: str) -> Any:
        """A Stop or Resume handler for the run the Train tab shows."""
        def handle(run: str) -> str:
            if not run:
                raise gr.Error(nothing)
            try:
                return describe_status(verb(run))
            except GptlabError as e:
                raise fail(e) from None
        return handle

    stop = control(studio.stop, "no training to stop")
    resume = control(studio.resume, "no run to resume; pick one on the Runs tab")

    def poll(run: str, shown: int, x: str) -> tuple[Any, Any, Any, int]:
        if not run:
            return gr.skip(), gr.skip(), gr.skip(), shown
        try:
            status = studio.status(run)
        except GptlabError:
            return gr.skip(), gr.skip(), gr.skip(), shown
        count = len(status["evals"]) + len(status["points"])
        chart = gr.skip()
        if count != shown and count:  # (a chart first drawn empty never draws its lines: Gradio 6)
            chart = gr.update(value=loss_points(status, x), x=x)
        sample = status.get("sample")
        return describe_status(status), chart, sample if sample is not None else gr.skip(), count

    # ---- Runs

    def runs_table() -> Any:
        rows = []
        for r in ws.runs():
            best = r.get("best_val_loss")
            rows.append([r["name"], Path(r["data"]).name if r.get("data") else "", r.get("tokenizer") or "",
                         f"{r['params']:,}" if r.get("params") else "", r.get("steps") or 0,
                         f"{best:.4f}" if best is not None else "", _duration(r.get("elapsed_sec")),
                         r["status"]])
        return pd.DataFrame(rows, columns=RUN_COLUMNS)

    def refresh_runs(selected: list[str] | None, picked_now: str | None, model_now: str | None) -> tuple[Any, ...]:
        names = [r["name"] for r in ws.runs()]
        keep = [n for n in (selected or []) if n in names]
        return (runs_table(), gr.update(choices=names, value=keep), _pick(names, picked_now),
                _pick(list(studio.models), model_now))

    def compare(selected: list[str]) -> Any:  # None when empty: see `poll`
        from gptlab.rundir import read_metrics

        rows = []
        for name in selected or []:
            try:
                run_dir = studio.find("run", name)
            except GptlabError:
                continue
            for r in read_metrics(run_dir):
                if not math.isnan(r["val_loss"]):
                    rows.append({"step": r["step"], "val loss": r["val_loss"], "run": name})
        return points_table(rows, COMPARE_COLUMNS) if rows else None

    def delete(name: str, sure: bool, selected: list[str]) -> tuple[str, Any, Any, Any, Any, Any]:
        if not name:
            raise gr.Error("pick a run to delete")
        if not sure:
            raise gr.Error(f"tick 'yes, delete' to confirm deleting {name}")
        try:
            studio.delete(name)
        except GptlabError as e:
            raise fail(e) from None
        return (f"deleted {name}", gr.update(value=False), *refresh_runs(selected, None, None))

    # ---- Generate

    async def generate(name: str, prompt: str, **settings: Any) -> AsyncIterator[str]:
        if not name or name not in studio.models:
            raise gr.Error("no trained run to sample yet; train one on the Train tab")
        try:
            served = studio.models[name]
        except GptlabError as e:
            raise fail(e) from None
        async for text in stream_text(served, prompt, settings, studio.limits):
            yield text

    def card(name: str) -> str:
        if not name or name not in studio.models:
            return ""
        try:
            return studio.models[name].card()
        except GptlabError as e:
            return f"⚠️ {e}"

    # ---- Share

    def share(name: str, kind: str) -> str:
        if not name:
            raise gr.Error("pick a run to share")
        try:
            run_dir = studio.find("run", name)
            out = {"hf": studio.shelf.hf_zip, "space": studio.shelf.space_zip, "gguf": studio.shelf.gguf}[kind](run_dir)
        except GptlabError as e:
            raise fail(e) from None
        return str(out)

    def push(name: str, repo_id: str, token: str, kind: str, private: bool) -> str:
        if not name:
            raise gr.Error("pick a run to share")
        try:
            url = studio.shelf.push(studio.find("run", name), repo_id, token, "space" if kind.startswith("Space") else "hf",
                                    private)
        except GptlabError as e:
            raise fail(e) from None
        return f"Uploaded to [{url}]({url})"

    # ---- the page

    data_names = [d["name"] for d in ws.data_folders()]
    run_names = [r["name"] for r in ws.runs()]
    sampled = list(studio.models)
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}: from your text to a GPT you trained, in one page")
        current = gr.State("")
        shown_points = gr.State(-1)
        with gr.Tabs() as tabs:
            with gr.Tab("Data", id="data"):
                with gr.Row():
                    with gr.Column():
                        files = gr.File(label=f"Text files (.txt, up to {ws.max_upload_bytes / 1e6:g} MB each)",
                                        file_count="multiple", file_types=[".txt"], elem_id="upload-files")
                        with gr.Accordion("Or paste text", open=False):
                            pasted = gr.Textbox(lines=6, label="Text", elem_id="paste-text")
                            paste_name = gr.Textbox(value="pasted", label="Name", elem_id="paste-name")
                            add_paste = gr.Button("Add pasted text", elem_id="add-paste")
                        with gr.Row():
                            dataset = gr.Dropdown(list(NAMED_DATASETS), label="Or a named dataset", scale=3)
                            add_named = gr.Button("Add dataset", scale=1)
                        added = gr.Markdown(elem_id="added")
                    with gr.Column():
                        uploads = gr.CheckboxGroup(ws.uploads(), label="Uploads to use", elem_id="uploads")
                        stats = gr.Markdown("Choose uploads to see what they hold.", elem_id="data-stats")
                        preview = gr.Textbox(label="Preview", lines=6, max_lines=6, interactive=False)
                        with gr.Row():
                            tokenizer = gr.Dropdown(list(TOKENIZERS), value="char", label="Tokenizer",
                                                    elem_id="tokenizer")
                            bpe_size = gr.Number(512, label="BPE vocabulary (bpe only)", precision=0)
                        prepare_button = gr.Button("Prepare", variant="primary", elem_id="prepare")
                        prepared = gr.Markdown(elem_id="prepared")
            with gr.Tab("Train", id="train") as train_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        data_choice = gr.Dropdown(data_names, value=data_names[0] if data_names else None,
                                                  label="Prepared data", elem_id="train-data")
                        preset = gr.Dropdown([AUTO, *preset_names(), CUSTOM], value=AUTO, label="Shape",
                                             elem_id="preset")
                        with gr.Accordion("Custom shape", open=False):
                            arch = gr.Dropdown(["gpt2", "llama"], value="gpt2", label="Block")
                            with gr.Row():
                                n_layer = gr.Number(4, label="Layers", precision=0)
                                n_head = gr.Number(4, label="Heads", precision=0)
                                n_embd = gr.Number(128, label="Width", precision=0)
                                block_size = gr.Number(64, label="Context", precision=0)
                        with gr.Row():
                            budget_kind = gr.Radio(["minutes", "steps"], value="minutes", label="Budget in")
                            budget = gr.Number(1.0, label="Budget", elem_id="budget")
                        with gr.Row():
                            optimizer = gr.Dropdown(["(shape's own)", "adamw", "muon"], value="(shape's own)",
                                                    label="Optimizer")
                            lr = gr.Number(None, label="Learning rate (0: the shape's)")
                            eval_interval = gr.Number(None, label="Evaluate every N steps (0: the shape's)",
                                                      precision=0, elem_id="eval-interval")
                        run_name = gr.Textbox(label="Run name (blank: automatic)", elem_id="run-name")
                        plan = gr.Markdown(elem_id="plan")
                        with gr.Row():
                            start_button = gr.Button("Start", variant="primary", elem_id="start")
                            stop_button = gr.Button("Stop", variant="stop", elem_id="stop-training")
                            resume_button = gr.Button("Resume", elem_id="resume")
                    with gr.Column(scale=3):
                        status = gr.Markdown("Nothing is training.", elem_id="train-status")
                        x_axis = gr.Radio(["step", "tokens seen"], value="step", label="x axis")
                        chart = gr.LinePlot(None,
                                            x="step", y="loss", color="series", title="Loss", height=320,
                                            elem_id="loss-chart")
                        sample = gr.Textbox(label="Latest sample (at the last evaluation)", lines=8,
                                            interactive=False, elem_id="live-sample")
            with gr.Tab("Runs", id="runs") as runs_tab:
                table = gr.Dataframe(runs_table(), interactive=False, elem_id="runs-table")
                refresh = gr.Button("Refresh", elem_id="refresh-runs")
                with gr.Row():
                    with gr.Column():
                        compare_pick = gr.CheckboxGroup(run_names, label="Compare val curves", elem_id="compare")
                        compare_chart = gr.LinePlot(None, x="step", y="val loss", color="run", title="Validation loss",
                                                    height=300, elem_id="compare-chart")
                    with gr.Column():
                        picked = gr.Dropdown(run_names, label="Run", elem_id="runs-pick")
                        with gr.Row():
                            open_button = gr.Button("Open in Generate", elem_id="open-generate")
                            watch_button = gr.Button("Watch on Train", elem_id="watch")
                        sure = gr.Checkbox(False, label="yes, delete", elem_id="delete-sure")
                        delete_button = gr.Button("Delete run", variant="stop", elem_id="delete-run")
                        deleted = gr.Markdown()
            with gr.Tab("Generate", id="generate") as generate_tab:
                with gr.Row():
                    with gr.Column(scale=3):
                        model = gr.Dropdown(sampled, value=sampled[0] if sampled else None, label="Run",
                                            elem_id="gen-model")
                        prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Leave empty to start from nothing",
                                            elem_id="prompt")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate")
                            halt = gr.Button("Stop", variant="stop", elem_id="stop")
                        output = gr.Textbox(label="Generated text", lines=14, max_lines=40, interactive=False,
                                            elem_id="output")
                    with gr.Column(scale=2):
                        settings = sampling_inputs(studio.limits)
                        model_card = gr.Markdown(card(sampled[0]) if sampled else "")
            with gr.Tab("Share", id="share") as share_tab:
                share_run = gr.Dropdown(sampled, value=sampled[0] if sampled else None, label="Run",
                                        elem_id="share-run")
                with gr.Row():
                    hf_button = gr.Button("Hugging Face folder (zip)", elem_id="share-hf")
                    space_button = gr.Button("Space (zip)", elem_id="share-space")
                    gguf_button = gr.Button("GGUF for llama.cpp / Ollama", elem_id="share-gguf")
                download = gr.File(label="Download", interactive=False, elem_id="share-file")
                with gr.Accordion("Push to the Hugging Face Hub", open=False):
                    repo_id = gr.Textbox(label="Repository (user/name)")
                    token = gr.Textbox(label="Access token (used for this upload only, never stored)", type="password")
                    push_kind = gr.Radio(["Model", "Space"], value="Model", label="As a")
                    private = gr.Checkbox(False, label="private")
                    push_button = gr.Button("Push")
                    pushed = gr.Markdown()

        # Data
        files.upload(add_files, [files, uploads], [uploads, added]).then(
            show_stats, uploads, [stats, preview])
        add_paste.click(add_pasted, [pasted, paste_name, uploads], [uploads, added])
        add_named.click(add_dataset, [dataset, uploads], [uploads, added])
        uploads.change(show_stats, uploads, [stats, preview], show_progress="hidden")
        prepare_button.click(prepare, [uploads, tokenizer, bpe_size], [prepared, data_choice])
        # Train
        choices = [data_choice, preset, n_layer, n_head, n_embd, block_size, arch, budget_kind, budget, optimizer, lr,
                   eval_interval, run_name]
        for control in choices:
            control.change(show_plan, choices, plan, show_progress="hidden")
        page.load(show_plan, choices, plan, show_progress="hidden")
        start_button.click(start, choices, [current, status]).then(lambda: -1, None, shown_points)
        stop_button.click(stop, current, status)
        resume_button.click(resume, current, status)
        timer = gr.Timer(POLL_SEC)
        timer.tick(poll, [current, shown_points, x_axis], [status, chart, sample, shown_points],
                   show_progress="hidden", concurrency_limit=None)
        x_axis.change(lambda: -1, None, shown_points)
        # Runs
        listed = [table, compare_pick, picked, model]
        refresh.click(refresh_runs, [compare_pick, picked, model], listed)
        compare_pick.change(compare, compare_pick, compare_chart)
        open_button.click(lambda name: (gr.update(choices=list(studio.models), value=name), gr.Tabs(selected="generate")),
                          picked, [model, tabs])
        watch_button.click(lambda name: (name or "", -1, gr.Tabs(selected="train")), picked,
                           [current, shown_points, tabs])
        delete_button.click(delete, [picked, sure, compare_pick], [deleted, sure, table, compare_pick, picked, model])
        # Generate
        event = go.click(generate, [model, prompt], output, inputs_kwargs=settings, api_name="generate",
                         concurrency_limit=None)
        halt.click(None, None, None, cancels=[event])
        model.change(card, model, model_card, show_progress="hidden")
        # Share
        hf_button.click(lambda name: share(name, "hf"), share_run, download)
        space_button.click(lambda name: share(name, "space"), share_run, download)
        gguf_button.click(lambda name: share(name, "gguf"), share_run, download)
        push_button.click(push, [share_run, repo_id, token, push_kind, private], pushed)
        # Lists that other tabs change are refreshed when a tab opens.
        page.load(refresh_runs, [compare_pick, picked, model], listed)
        runs_tab.select(refresh_runs, [compare_pick, picked, model], listed, show_progress="hidden")
        train_tab.select(lambda d: gr.update(choices=[f["name"] for f in ws.data_folders()], value=d), data_choice,
                         data_choice, show_progress="hidden")
        generate_tab.select(lambda m: _pick(list(studio.models), m), model, model, show_progress="hidden")
        share_tab.select(lambda m: _pick(list(studio.models), m), share_run, share_run, show_progress="hidden")
    return page


def _pick(choices: list[str], current: str | None) -> Any:
    """A dropdown update keeping `current` when it is still a choice, else the first."""
    import gradio as gr

    return gr.update(choices=choices, value=current if current in choices else (choices[0] if choices else None))
