from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.parity.eval_data import read_labelled
from pipeline.parity.metrics import label_accuracy

CONFIG = {"id2label": {"0": "NEGATIVE", "1": "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}}


def test_reads_json_lines_and_tab_lines_with_label_names(tmp_path: Path) -> None:
    path = tmp_path / "eval.txt"
    path.write_text('{"text": "a fine film", "label": "POSITIVE"}\n0\ta dull film\n\n1\tgreat\tfun\n', encoding="utf-8")
    texts, labels = read_labelled(path, CONFIG)
    assert texts == ["a fine film", "a dull film", "great\tfun"]
    assert labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("line, needle", [
    ("7\tout of range", "out of range"),
    ("NEUTRAL\tunknown name", "neither an index nor a label"),
    ("no separator", "expected JSON lines"),
    ('{"text": "no label"}', "'text' and 'label'"),
])
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "eval.txt"
    path.write_text("1\tok\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=needle) as error:
        read_labelled(path, CONFIG)
    assert f"{path}:2" in error.value.message


def test_label_accuracy_of_both_graphs() -> None:
    labels = np.array([0, 1, 1, 0])
    reference = np.array([[2.0, 1.0], [0.0, 3.0], [0.1, 0.2], [1.0, 0.0]])
    candidate = np.array([[2.0, 1.0], [0.0, 3.0], [0.3, 0.2], [0.0, 1.0]])
    result = label_accuracy(reference, candidate, labels)
    assert result["accuracy_reference"] == 1.0 and result["accuracy_candidate"] == 0.5
    assert result["accuracy_drop"] == 0.5 and result["labelled_samples"] == 4
