"""gptlab export --format space: a folder that runs as a Hugging Face Space on its own copy of gptlab."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gptlab import cli

from .conftest import free_port

if importlib.util.find_spec("gradio") is None:
    pytest.skip("a Space needs gradio", allow_module_level=True)
GRADIO_VERSION = importlib.metadata.version("gradio")

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 90.0

# Runs the Space's app.py as Spaces do (`python app.py`), with the repo's src taken off sys.path (the
# editable install puts it there), and says which gptlab the app imported once it launches.
WRAPPER = """
import os, runpy, sys
repo_src = os.path.realpath(sys.argv[2])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != repo_src]
import gradio
launch = gradio.Blocks.launch
def report_then_launch(self, *args, **kwargs):
    import gptlab
    on_path = any(os.path.realpath(p or ".") == repo_src for p in sys.path)
    print("GPTLAB", gptlab.__file__, "REPO_SRC_ON_PATH", on_path, flush=True)
    return launch(self, *args, **kwargs)
gradio.Blocks.launch = report_then_launch
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def space(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported by the real CLI in a subprocess."""
    out = tmp_path_factory.mktemp("space") / "tiny-space"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "gptlab", "export", str(tiny_run), "--format", "space", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert f"gptlab push {out} --repo-id USER/NAME --space" in r.stdout
    return out


def test_space_holds_the_app_the_run_files_and_gptlab_and_nothing_pickled(space, tiny_run):
    model = space / "models" / "tiny"
    for name in ("app.py", "requirements.txt", "README.md"):
        assert (space / name).is_file(), name
    assert sorted(p.name for p in model.iterdir()) == \
        ["best.safetensors", "config.json", "loss.png", "metrics.csv", "tokenizer.json"]
    assert (model / "best.safetensors").read_bytes() == (tiny_run / "best.safetensors").read_bytes()

    package = REPO / "src" / "gptlab"
    ours = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    vendored = sorted(p.relative_to(space / "gptlab").as_posix() for p in (space / "gptlab").rglob("*") if p.is_file())
    assert vendored == ours
    assert all((space / "gptlab" / rel).read_bytes() == (package / rel).read_bytes() for rel in ours)

    everything = [p for p in space.rglob("*") if p.is_file()]
    assert not [p for p in everything if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin", ".pyc", ".ckpt")]
    # The training machine's folders stay there: config.json keeps only their names.
    train = json.loads((model / "config.json").read_text())["train"]
    assert (train["data"], train["out"]) == (Path(json.loads((tiny_run / "config.json").read_text())["train"]["data"]).name, "tiny")
    assert not [p for p in everything if p.suffix in (".json", ".md", ".py", ".txt") and str(tiny_run.parent) in p.read_text()]


def test_space_readme_header_and_requirements(space):
    readme = (space / "README.md").read_text()
    header, body = readme.split("\n---\n", 1)
    assert header.startswith("---\n") and "\n---\n" not in body.split("## Samples")[0]  # one YAML header
    for line in ("sdk: gradio", f'sdk_version: "{GRADIO_VERSION}"', "app_file: app.py", "pinned: false",
                 "license: mit", 'title: "tiny-space"', "colorFrom: indigo", "colorTo: gray"):
        assert line in header.splitlines(), line
    assert "emoji: " in header and "library_name" not in readme
    assert "# tiny-space" in body and "best validation loss" in body and "## Samples" in body
    assert "](models/tiny/loss.png)" in body and 'api_name="/generate"' in body

    tomllib = pytest.importorskip("tomllib")
    floors = {r.split(">=")[0].split("==")[0]: r for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    lines = (space / "requirements.txt").read_text().split()
    assert lines == [floors[name] for name in ("torch", "numpy", "tiktoken", "tokenizers", "safetensors")] + \
        [f"gradio=={GRADIO_VERSION}"]


def test_the_space_runs_on_its_own_gptlab_and_generates(space, tmp_path):
    from gradio_client import Client

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wrapper = tmp_path / "run_space.py"
    wrapper.write_text(WRAPPER)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "PYTHON"))}
    env.update(PYTHONPATH=str(space), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    log = tmp_path / "space.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(wrapper), str(space / "app.py"), str(REPO / "src")], cwd=elsewhere,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.poll() is None, "the Space exited:\n" + log.read_text()
            assert time.monotonic() < end, "the Space did not answer:\n" + log.read_text()
            try:
                if httpx.get(f"{url}/config", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        printed = log.read_text()
        assert f"GPTLAB {space / 'gptlab' / '__init__.py'} REPO_SRC_ON_PATH False" in printed, printed

        client = Client(url + "/", verbose=False, analytics_enabled=False, download_files=False)
        # As the Space's README shows it: by parameter name, the rest at the page's defaults.
        text = client.predict(prompt="ROMEO:", max_new_tokens=20, stop="", seed=1, api_name="/generate")
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20

        # The model tab's loss plot is served although the app runs from another folder.
        props = [c.get("props", {}) for c in httpx.get(f"{url}/config", timeout=5).json()["components"]]
        plot = next(p["value"] for p in props if p.get("label") == "Training and validation loss")
        assert plot["path"].endswith("loss.png") and httpx.get(plot["url"], timeout=5).status_code == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def test_push_space_dry_run_lists_the_space_but_not_what_running_it_left(space, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (space / "gptlab" / "__pycache__").mkdir(exist_ok=True)
    (space / "gptlab" / "__pycache__" / "export.cpython-311.pyc").write_bytes(b"\0")
    (space / ".gradio").mkdir(exist_ok=True)
    (space / ".gradio" / "certificate.pem").write_text("x")
    code, out, err = run_cli(capsys, "push", space, "--repo-id", "u/n", "--space", "--dry-run")
    assert code == 0, err
    listed = [line.split()[-1] for line in out.splitlines()[:-1]]
    for name in ("app.py", "requirements.txt", "README.md", "models/tiny/best.safetensors", "models/tiny/config.json",
                 "models/tiny/tokenizer.json", "models/tiny/loss.png", "gptlab/__init__.py", "gptlab/serve/page.py"):
        assert name in listed, name
    assert not [name for name in listed if "__pycache__" in name or ".gradio" in name]
    assert out.rstrip().endswith("to https://huggingface.co/spaces/u/n; nothing was sent")


def test_push_says_when_space_and_folder_disagree(space, tiny_run, tmp_path, capsys):
    hf_like = tmp_path / "model"
    hf_like.mkdir()
    (hf_like / "README.md").write_text("# a model\n")
    cases = [
        (["push", space, "--repo-id", "u/n", "--dry-run"], "holds a Space (app.py); add --space to upload it as one"),
        (["push", hf_like, "--repo-id", "u/n", "--space", "--dry-run"],
         "has no app.py, so it is not a Space; export one with `gptlab export RUN --format space`"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_space_export_refuses_a_non_empty_folder_and_needs_gradio(tiny_run, tmp_path, capsys, monkeypatch):
    import importlib.metadata

    out = tmp_path / "space"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", tiny_run, "--format", "space", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "already exists and is not empty; pass --overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"

    real_version = importlib.metadata.version

    def no_gradio(name):
        if name == "gradio":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", no_gradio)
    code, _, err = run_cli(capsys, "export", tiny_run, "--format", "space", "--out", tmp_path / "new")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--format space needs gradio installed here" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space"]


def test_a_llama_space_with_qk_norm_runs_on_its_own_gptlab(char_data, tmp_path, one_thread):
    """The Space runs gptlab, not transformers: a Llama-style run, even one with --qk-norm, serves as it trains."""
    from gptlab.config import resolve_config
    from gptlab.generation import load
    from gptlab.hf.export import export
    from gptlab.train import train

    from .conftest import TINY_MODEL

    run = tmp_path / "qk"
    model_cfg, cfg = resolve_config(overrides=dict(
        **TINY_MODEL, arch="llama", n_kv_head=1, qk_norm=True, data=str(char_data), out=str(run), batch_size=8,
        max_iters=5, eval_interval=5, eval_iters=1, num_samples=1, sample_tokens=10, warmup_iters=1,
    ))
    train(model_cfg, cfg, quiet=True)
    space = export(run, tmp_path / "qk-space", fmt="space")
    readme = (space / "README.md").read_text()
    assert "- llama\n" in readme and "- gpt2" not in readme and "A Llama-style language model" in readme
    assert "2 query heads sharing 1 key/value head," in readme and "QK-norm" in readme

    ours = load(run, device="cpu").generate("ROMEO:", temperature=0.0, max_new_tokens=20)[0]
    probe = ("import sys, gptlab; from gptlab.generation import load; "
             "print(gptlab.__file__); print(load(sys.argv[1], device='cpu').generate('ROMEO:', temperature=0.0, "
             "max_new_tokens=20)[0], end='')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(space), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", probe, str(space / "models" / "qk")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    where, text = r.stdout.split("\n", 1)
    assert where == str(space / "gptlab" / "__init__.py") and text == ours
