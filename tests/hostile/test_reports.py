"""`pipeline report check` and `diff` on damaged or forged parity.json: schema first, then gates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.hostile.conftest import cli, one_line


@pytest.fixture(scope="module")
def report(tiny_build: Path) -> dict:
    return json.loads((tiny_build / "parity.json").read_text(encoding="utf-8"))


def _write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _metrics(data: dict) -> dict:
    return data["outputs"][data["primary_output"]]


# Structural damage: each one line, exit 2, in check and in diff.
STRUCTURAL = {
    "not-json": lambda d: "{not json",
    "deep-nesting": lambda d: "[" * 100_000 + "]" * 100_000,
    "top-level-list": lambda d: [d],
    "outputs-a-list": lambda d: {**d, "outputs": [1, 2]},
    "checks-not-a-list": lambda d: {**d, "checks": {"a": 1}},
    "metric-a-string": lambda d: _set(d, "cosine_mean", "0.99"),
    "metric-true": lambda d: _set(d, "cosine_mean", True),
    "metric-infinite": lambda d: json.dumps(_set(d, "cosine_mean", 1.0)).replace('"cosine_mean": 1.0', '"cosine_mean": Infinity'),
    "primary-output-missing": lambda d: {**d, "primary_output": "nope"},
    "threshold-wrong-relation": lambda d: {**d, "thresholds": [{**d["thresholds"][0], "relation": "<="}]},
    "threshold-minus-infinity": lambda d: json.dumps(d).replace('"threshold": 0.99', '"threshold": -Infinity', 1),
    "empty-file": lambda d: "",
    "schema-version-object": lambda d: {**d, "schema_version": {"$ref": "#"}},
}


def _set(data: dict, metric: str, value: object) -> dict:
    data = copy.deepcopy(data)
    _metrics(data)[metric] = value
    return data


@pytest.mark.parametrize("kind", sorted(STRUCTURAL))
def test_structural_damage_is_one_line_exit_2(report: dict, tmp_path: Path, kind: str) -> None:
    damaged = _write(tmp_path / "parity.json", STRUCTURAL[kind](copy.deepcopy(report)))
    good = _write(tmp_path / "good.json", report)
    one_line(cli("report", "check", str(damaged)), 2, str(damaged))
    one_line(cli("report", "diff", str(good), str(damaged)), 2, str(damaged))


def test_a_gate_on_a_metric_the_report_lacks_fails_naming_it(report: dict, tmp_path: Path) -> None:
    data = copy.deepcopy(report)
    _metrics(data).pop("snr_db", None)
    path = _write(tmp_path / "parity.json", data)
    line = one_line(cli("report", "check", str(path), "--min-snr-db", "10"), 4, "snr_db missing")
    assert "parity failed" in line


def test_a_recorded_gate_whose_metric_is_null_fails(report: dict, tmp_path: Path) -> None:
    data = copy.deepcopy(report)
    output = data["primary_output"]
    _metrics(data)["snr_db"] = None  # null: not measured
    data["thresholds"].append({"output": output, "metric": "snr_db", "threshold": 5.0, "relation": ">="})
    one_line(cli("report", "check", str(_write(tmp_path / "parity.json", data))), 4, "snr_db missing")


def test_a_threshold_on_an_unknown_output_fails(report: dict, tmp_path: Path) -> None:
    data = copy.deepcopy(report)
    data["thresholds"] = [{**data["thresholds"][0], "output": "ghost"}]
    one_line(cli("report", "check", str(_write(tmp_path / "parity.json", data))), 4, "ghost")


def test_a_report_with_no_gate_is_refused_unless_the_user_gives_one(report: dict, tmp_path: Path) -> None:
    data = copy.deepcopy(report)
    data["thresholds"], data["checks"] = [], []
    path = _write(tmp_path / "parity.json", data)
    one_line(cli("report", "check", str(path)), 2, "no gate")
    assert cli("report", "check", str(path), "--min-cosine", "0.5").returncode == 0
