"""`pipeline architectures`: every family with its tasks and targets; an unsupported model_type is one line."""

from __future__ import annotations

import json

from tests.helpers import assert_one_line_error, run_cli


def test_lists_every_family_with_its_tasks_and_targets() -> None:
    from pipeline.models.registry import ARCHITECTURES

    result = run_cli("architectures")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert set(rows) == set(ARCHITECTURES)
    for name, arch in ARCHITECTURES.items():
        assert f"tasks: {', '.join(arch.tasks)}" in rows[name]
        assert "targets: cpu, trt" in rows[name]
    assert "token-classification" in rows["deberta-v2"]


def test_an_unsupported_model_type_is_one_line_naming_it_and_the_supported_list(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "funnel", "hidden_size": 32}))
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"embeddings.weight": np.zeros((4, 32), np.float32)}, str(tmp_path / "model.safetensors"))
    result = run_cli("architectures", "--model", str(tmp_path))
    assert_one_line_error(result, 2, "model_type 'funnel'", "not supported", "bert", "deberta-v2", "modernbert")
    build = run_cli("build", "--model", str(tmp_path), "--stop-after", "export", "-o", str(tmp_path / "out"))
    assert_one_line_error(build, 2, "model_type 'funnel'", "supported: ")
