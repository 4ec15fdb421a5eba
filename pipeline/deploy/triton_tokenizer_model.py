"""Triton Python-backend model: text in, token ids out (copied as `<model>_tokenizer/1/model.py`).

It runs inside Triton's Python backend, not in Quantpipe: it imports nothing of Quantpipe,
needs `transformers` and `numpy` in the backend's Python environment, and loads the
tokenizer saved beside it. Each request is padded to its own longest text (truncated at
`max_length`, the build's calibration length, a model parameter), not to `max_length`: a short
request costs what its tokens cost. Triton's dynamic batcher then batches requests of the same
length; the ids' data types are read from this model's own output config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TEXT_INPUT = "TEXT"
NUMPY_TYPES = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from transformers import AutoTokenizer

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / str(args["model_version"]) / "tokenizer"
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_length = int(config["parameters"]["max_length"]["string_value"])
        self.outputs = {item["name"]: NUMPY_TYPES[item["data_type"]] for item in config["output"]}

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="np")
        return {name: np.asarray(encoded[name], dtype=dtype) for name, dtype in self.outputs.items()}

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT).as_numpy().reshape(-1)
            texts = [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in raw]
            tensors = [pb_utils.Tensor(name, array) for name, array in self.encode(texts).items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
