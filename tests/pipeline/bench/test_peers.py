"""`pipeline bench-peers`: every contender measured in one run, scored against sentence-transformers' FP32."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.bench import peers
from pipeline.cli.main import cli
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def peers_run(default_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    # The build a second time as an "other build" of the same model (as a --smoothquant build would be given).
    result = CliRunner().invoke(cli, ["bench-peers", str(default_build.build_dir), str(default_build.build_dir),
                                      "--peers", "ort-by-hand",
                                      "--batch", "1,4", "--seq", "32", "--runs", "2", "--warmup", "1",
                                      "--sentences", "24", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output, default_build.build_dir


def test_every_contender_is_timed_and_scored_against_the_fp32_reference(peers_run):
    payload, output, build_dir = peers_run
    rows = {row["name"]: row for row in payload["results"]}
    other = f"quantpipe:{build_dir.name}"
    assert set(rows) == {"quantpipe", "fp32", "quantpipe-plain-session", "ort-by-hand", other}
    assert rows[other]["cosine_mean"] == rows["quantpipe"]["cosine_mean"]
    for row in rows.values():
        assert row["available"] and set(row["p50_ms"]) == {"1x32", "4x32"} and min(row["p50_ms"].values()) > 0
    # The FP32 graph is the model as sentence-transformers computes it: the reference is not our own code.
    assert rows["fp32"]["cosine_min"] > 0.99999
    # INT8 graphs are close to it and not equal to it (the score can tell them apart).
    for name in ("quantpipe", "ort-by-hand"):
        assert 0.95 < rows[name]["cosine_mean"] < 0.99999
    # A plain session of the same file computes the same embeddings (only its speed may differ).
    assert abs(rows["quantpipe-plain-session"]["cosine_mean"] - rows["quantpipe"]["cosine_mean"]) < 1e-4
    assert payload["host"]["isa"] in output and payload["host"]["cpu_model"] in output
    assert payload["lead"]["fastest_peer"] == "ort-by-hand" and payload["sentences"] == 24


def test_out_of_domain_sentences_alternate_tweets_and_reviews():
    sentences = peers.out_of_domain_sentences(6)
    assert len(sentences) == 6 and len(set(sentences)) == 6
    assert sentences[0].startswith("Somehow I was blessed")  # the first tweet of the shipped file
    assert all("\t" not in s for s in sentences)


def test_the_cosine_is_the_normalized_dot_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = [float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(peers.cosines(a, b), expected, rtol=1e-12)


def test_a_peer_that_is_not_installed_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError

    def make():
        import openvino  # noqa: F401

    made = peers.timed_setup("openvino-nncf", make, {})
    assert isinstance(made, peers.Unavailable) and "not installed" in made.reason and "openvino" in made.reason


def test_an_unknown_peer_a_folder_that_is_no_build_and_an_llm_build_are_refused(tiny_llm_build, tmp_path):
    for args, message in (([str(tmp_path), "--peers", "tensorflow-lite"], "unknown peer tensorflow-lite"),
                          ([str(tmp_path)], "manifest"),
                          ([str(tiny_llm_build.build_dir)], "CPU embedding builds")):
        result = run_cli("bench-peers", *args, "-o", str(tmp_path / "peers.json"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "peers.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
                    reason="OpenVINO and NNCF are the optional peers extra (pip install quantpipe[peers])")
def test_openvino_nncf_is_made_from_the_same_model_and_scored(default_build, tmp_path):
    out = tmp_path / "peers.json"
    result = CliRunner().invoke(cli, ["bench-peers", str(default_build.build_dir), "--peers", "openvino-nncf",
                                      "--batch", "2", "--seq", "32", "--runs", "2", "--warmup", "1",
                                      "--sentences", "16", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(out.read_text())["results"] if r["name"] == "openvino-nncf")
    assert row["available"] and 0.95 < row["cosine_mean"] < 0.99999 and row["size_mb"] > 1
