"""`pipeline bench-peers-llm` on the tiny Llama build: rows, ratios to FP32, and a peer that is missing or real."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import run_cli


def test_the_llm_peer_benchmark_measures_the_build_its_fp32_graph_and_llama_cpp(tiny_llm_build, tmp_path) -> None:
    from tests.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    out = tmp_path / "peers"
    done = run_cli("bench-peers-llm", str(tiny_llm_build.build_dir), "--gguf", str(gguf), "--threads", "1",
                   "--new-tokens", "4", "--rounds", "1", "--chunks", "1", "--peer", "llama.cpp", "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "peers_llm.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    ours, fp32 = rows[f"quantpipe 4-bit {tiny_llm_build.build_dir.name} (pipeline.load)"], rows["quantpipe FP32 graph"]
    assert ours["decode_tokens_per_s"] > 0 and ours["prefill_tokens_per_s"] > 0 and len(ours["first_tokens"]) == 4
    assert fp32["perplexity_vs_fp32"] == 0.0
    # The same held-out chunk scores as the build's own parity does: the 4-bit graph within the build's gate.
    from pipeline.parity.policy import DEFAULT_MAX_PERPLEXITY_INCREASE

    gate = tiny_llm_build.manifest["config"]["verify"]["max_perplexity_increase"] or DEFAULT_MAX_PERPLEXITY_INCREASE
    assert abs(ours["perplexity_vs_fp32"]) <= gate
    llama = rows["llama.cpp (llama-cpp-python, same GGUF)"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert llama["unavailable"].startswith("not installed")
    else:
        assert llama["unavailable"] is None and llama["perplexity"] > 1
    assert all(row["isa"] == result["host"]["isa"] and row["cpu_model"] for row in result["rows"])
    assert "| quantpipe FP32 graph |" in (out / "peers_llm.md").read_text()


def test_an_unknown_peer_is_refused_in_one_line(tiny_llm_build, tmp_path) -> None:
    done = run_cli("bench-peers-llm", str(tiny_llm_build.build_dir), "--peer", "vllm", "-o", str(tmp_path))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "vllm" in done.stderr


def test_no_contender_always_follows_the_same_one() -> None:
    from pipeline.bench.peers_llm import round_order

    contenders = ["ours", "other build", "fp32", "llama.cpp", "genai"]
    orders = [round_order(contenders, turn) for turn in range(15)]  # the README's runs use 15 rounds
    assert all(sorted(order) == sorted(contenders) for order in orders)
    assert orders == [round_order(contenders, turn) for turn in range(15)]  # the same order in every run
    follows = {(before, after) for order in orders for before, after in zip(order, order[1:])}
    for name in contenders:  # within the rounds, each contender comes right after every other one at least once
        assert {before for before, after in follows if after == name} == set(contenders) - {name}
