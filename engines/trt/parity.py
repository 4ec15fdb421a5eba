"""Outputs of a TensorRT engine through Polygraphy's TensorRT runner (GPU hosts only).

Polygraphy imports TensorRT lazily itself; nothing here runs where TensorRT is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def engine_outputs(engine_path: Path, batches: Sequence[dict[str, np.ndarray]],
                   output_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    results = []
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        for batch in batches:
            outputs = runner.infer(feed_dict=batch)
            results.append({name: np.asarray(outputs[name], dtype=np.float32) for name in output_names})
    return results
