"""The Gradio page of `gptlab serve`, driven by `gradio_client` against a real server."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from gptlab.config import SAMPLE_FIELD_NAMES, SettingError
from gptlab.serve import Limits
from gptlab.serve.page import SEPARATOR
from gptlab.serve.params import page_config
from tests.servers import main_server, wait_idle

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_run):
    return main_server(tiny_run)


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url + "/", verbose=False, analytics_enabled=False, download_files=False)


def settings(prompt="ROMEO:", max_new_tokens=40, num_samples=1, temperature=0.8, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, stop="", seed=1):
    return (MODEL, prompt, max_new_tokens, num_samples, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)


def test_predict_continues_the_prompt(client):
    text = client.predict(*settings(), api_name="/generate")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40
    assert client.predict(*settings(), api_name="/generate") == text  # the seed holds on the page too


def test_empty_prompt_works(client):
    text = client.predict(*settings(prompt="", seed=None), api_name="/generate")
    assert len(text) == 40


def test_several_samples_are_separated(client):
    text = client.predict(*settings(num_samples=3, max_new_tokens=20), api_name="/generate")
    samples = text.split(SEPARATOR)
    assert len(samples) == 3
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 20 for s in samples)


def test_stop_strings_one_per_line(client):
    text = client.predict(*settings(max_new_tokens=400, stop="e\n\\n"), api_name="/generate")
    assert "e" not in text[len("ROMEO:"):] and "\n" not in text[len("ROMEO:"):]


def test_streaming_outputs_grow(client, server):
    job = client.submit(*settings(max_new_tokens=3000, seed=2), api_name="/generate")
    outputs = [out for out in job]
    assert len(outputs) >= 3, outputs
    for before, after in zip(outputs, outputs[1:]):
        assert after.startswith(before)
    assert len(outputs[-1]) == len("ROMEO:") + 3000
    wait_idle(server.url, MODEL)


def test_page_reports_bad_input(client):
    with pytest.raises(AppError, match="never saw"):
        client.predict(*settings(prompt="ROMEO\x01"), api_name="/generate")


def test_model_card_and_loss_plot(server):
    config = httpx.get(f"{server.url}/config").json()
    props = [c.get("props", {}) for c in config["components"]]
    card = next(p["value"] for p in props if "best val loss" in str(p.get("value", "")))
    assert "parameters" in card and "tokenizer" in card and "steps" in card
    plot = next(p["value"] for p in props if p.get("label") == "Training and validation loss")
    assert plot["path"].endswith("loss.png")
    assert httpx.get(plot["url"]).status_code == 200


def test_dropdown_appears_for_several_models(tmp_path, tiny_run):
    from gptlab.serve import Limits, build_page, load_models

    for name in ("a", "b"):
        shutil.copytree(tiny_run, tmp_path / name)
    models = load_models([tmp_path / "a", tmp_path / "b"], Limits(concurrency=1, queue_size=1))
    page = build_page(models)
    dropdowns = [b for b in page.blocks.values() if type(b).__name__ == "Dropdown"]
    assert len(dropdowns) == 1
    assert dropdowns[0].visible is True
    assert [c[0] for c in dropdowns[0].choices] == ["a", "b"]
    for m in models:
        m.queue.shutdown()


def test_cancelling_stops_the_generation(client, server):
    job = client.submit(*settings(max_new_tokens=20000, seed=3), api_name="/generate")
    deadline = time.monotonic() + 30
    while len(job.outputs()) < 2:
        assert time.monotonic() < deadline, "no streamed output"
        time.sleep(0.05)
    job.cancel()
    assert wait_idle(server.url, MODEL, timeout=5) < 5  # 20,000 tokens would take far longer


def test_controls_are_the_sample_fields_labelled_from_the_table(client):
    parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in parameters[:2]] == ["name", "prompt"]
    shown = {p["parameter_name"]: p["label"] for p in parameters[2:]}
    assert shown == {field: names["page"] for field, names in SAMPLE_FIELD_NAMES.items() if names["page"]}


def test_min_p_reaches_generation(client):
    # Min-p 1 keeps only the most likely token, so even a hot temperature gives the greedy text.
    greedy = client.predict(*settings(temperature=0), api_name="/generate")
    hot = [client.predict(*settings(temperature=2.0, min_p=1.0, seed=seed), api_name="/generate") for seed in (1, 2)]
    assert hot == [greedy, greedy]
    assert client.predict(*settings(temperature=2.0, seed=1), api_name="/generate") != greedy


def test_page_names_a_bad_setting_by_its_label(client):
    with pytest.raises(AppError, match=r"^Max new tokens must be an integer from 1 to 20,000 "
                                       r"\(this server's --max-new-tokens-limit\), got 2\.5$"):
        client.predict(*settings(max_new_tokens=2.5), api_name="/generate")


def test_bad_min_p_on_the_page_names_min_p():
    # The slider keeps a browser within [0, 1]; what reaches the handler is checked by SampleConfig.
    values = dict(max_new_tokens=10, min_p=1.5)
    with pytest.raises(SettingError) as e:
        page_config("ROMEO:", values, Limits())
    assert e.value.field == "min_p"
    assert e.value.message_for("page") == "Min-p must be in [0, 1] (0 = off), got 1.5"
    assert page_config("ROMEO:", {**values, "min_p": 0.25}, Limits()).min_p == 0.25
