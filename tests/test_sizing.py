"""Data-sized defaults: `gptlab train FILE` with no preset picks a shape and a budget, and says why."""

from __future__ import annotations

import json
import subprocess
import sys

from gptlab.config import ModelConfig, get_preset
from gptlab.sizing import choose, memorisation_warning


def gptlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_the_shape_grows_with_the_corpus_on_a_cpu():
    small, middle, large = (choose(n, "cpu", set()) for n in (20_000, 300_000, 1_000_000))
    sizes = [ModelConfig(**c.model).num_params(65) for c in (small, middle, large)]
    assert sizes[0] < sizes[1] <= sizes[2]
    assert middle.model == get_preset("cpu-quick")["model"]
    assert large.model == get_preset("cpu-small")["model"]
    assert large.train["learning_rate"] == get_preset("cpu-small")["train"]["learning_rate"]
    assert all(c.train["time"] == "5m" for c in (small, middle, large))
    assert "1,000,000 training tokens" in large.reason and "5m" in large.reason


def test_a_short_cpu_budget_gets_the_quick_shape():
    long, short = choose(1_000_000, "cpu", {"time"}, 300.0), choose(1_000_000, "cpu", {"time"}, 43.0)
    assert long.model == get_preset("cpu-small")["model"]
    assert short.model == get_preset("cpu-quick")["model"]
    assert short.train["optimizer"] == "muon" and "time" not in short.train  # the user's own budget stands
    assert "under 2 minutes" in short.reason
    assert choose(20_000, "cpu", {"time"}, 43.0).model["n_embd"] == 64  # a tiny corpus keeps its tiny model
    assert choose(1_000_000, "cuda", {"time"}, 43.0).model == get_preset("char-small")["model"]  # GPUs are fast enough


def test_a_gpu_gets_a_bigger_model_and_its_own_budget():
    cpu, gpu = choose(1_000_000, "cpu", set()), choose(1_000_000, "cuda", set())
    assert ModelConfig(**gpu.model).num_params(65) > ModelConfig(**cpu.model).num_params(65)
    assert gpu.train["time"] == "10m"


def test_only_what_the_user_left_open_is_chosen():
    assert choose(1_000_000, "cpu", {"n_layer", "max_iters"}) is None
    length_only = choose(1_000_000, "cpu", {"n_embd"})
    assert length_only.model == {} and length_only.train == {"time": "5m"}
    shape_only = choose(1_000_000, "cpu", {"time", "learning_rate"})
    assert "time" not in shape_only.train and "learning_rate" not in shape_only.train
    assert shape_only.model["n_layer"] == get_preset("cpu-small")["model"]["n_layer"]


def test_memorisation_is_flagged_only_for_models_far_bigger_than_their_text():
    assert memorisation_warning(124_000_000, 300_000) is not None  # GPT-2 small on 1 MB of BPE text
    assert "memorise" in memorisation_warning(124_000_000, 300_000)
    assert memorisation_warning(2_700_000, 1_000_000) is None


def test_train_from_a_file_prints_what_it_picked_and_trains_that_shape(tmp_path, shakespeare_text):
    (tmp_path / "book.txt").write_text(shakespeare_text[:60_000], encoding="utf-8")
    r = gptlab("train", "book.txt", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
               "--num-samples", "0", "--out", "runs/book", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    picked = [line for line in r.stdout.splitlines() if line.startswith("picked")]
    assert len(picked) == 1 and "54,000 training tokens" in picked[0], r.stdout
    config = json.loads((tmp_path / "runs/book/config.json").read_text())
    expected = choose(54_000, "cpu", {"max_iters"}).model
    assert {k: config["model"][k] for k in expected} == expected
    assert config["train"]["max_iters"] == 2 and config["train"]["time"] == ""


def test_a_model_much_bigger_than_its_text_gets_a_warning(tmp_path, shakespeare_text):
    (tmp_path / "short.txt").write_text(shakespeare_text[:20_000], encoding="utf-8")
    r = gptlab("train", "short.txt", "--n-layer", "2", "--n-embd", "256", "--n-head", "4", "--block-size", "32",
               "--max-iters", "1", "--eval-iters", "1", "--num-samples", "0", "--out", "runs/short", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "memorise" in r.stderr and "18,000 training tokens" in r.stderr
