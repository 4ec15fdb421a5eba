"""Third-party libraries' own output: kept out of ours."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Silence transformers' and the quantizers' own log formats; weights never come from a hub."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never a hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    for name in ("onnx_neural_compressor", "transformers", "onnxruntime", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
