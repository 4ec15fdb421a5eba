"""Third-party libraries' own output: routed through `logging` in our format, kept out of ours by default.

Neural Compressor installs its own stream handler and format (`2026-12-01 10:00:00 [INFO][quantize.py:12]
...`) and does not propagate; `quiet_libraries` takes that handler off, so its records reach the root
logger like every other library's, where `configure_logging` decides: warnings and errors on stderr
(INFO with -v/--verbose), everything in `--log-file`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

# torchao, once installed, is imported by transformers on every model load (and by peft). torchao 0.18 prints
# through two loggers, both at import: its own ("Failed to load .../torchao/_C_mxfp8...so": CUDA kernels,
# torchao/__init__.py) and torch's pytree logger (register_constant on its Enum configs,
# torch/utils/_pytree.py, in torch's "W1202 ..." format). Both are plain `logging`, silenced here. Hugging Face's
# `kernels` (0.19, a dependency of transformers 5.25) warns on every bitsandbytes load that it skips a hub trust check
# because the hub is offline, which it always is here.
LIBRARIES = ("onnx_neural_compressor", "transformers", "onnxruntime", "torch.onnx", "peft", "bitsandbytes", "torchao",
             "torch.utils._pytree", "kernels")
STDERR_FORMAT = "%(name)s %(levelname)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
_HANDLER_MARK = "_quantpipe"


_LEVEL = [logging.WARNING]  # what third-party loggers let through; configure_logging changes it


def route_library_logger(name: str) -> None:
    """A library logger with its own handler (Neural Compressor's): handlers off, records to the root
    logger in our format, at the configured level. Call after the library's logger module is imported."""
    library = logging.getLogger(name)
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.propagate = True
    library.setLevel(_LEVEL[0])


def quiet_libraries() -> None:
    """Silence transformers' and the quantizers' own log formats; weights never come from a hub."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never a hub
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    level = logging.ERROR if _LEVEL[0] > logging.INFO else _LEVEL[0]
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    if "onnx_neural_compressor.logger" in sys.modules:
        route_library_logger("onnx_neural_compressor")
    if level < logging.ERROR:  # verbose: transformers' records through the root logger, printed once
        transformers_logging.set_verbosity(level)
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()


def configure_logging(verbose: bool = False, log_file: Optional[Path] = None, quiet: bool = False) -> None:
    """stderr: warnings and errors (INFO with verbose; errors only with quiet); log_file: every record at
    DEBUG, the progress lines included. Called once by the CLI; a Python user configures logging their way."""
    from pipeline.core.progress import LOGGER as PROGRESS_LOGGER

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    for handler in [h for h in PROGRESS_LOGGER.handlers if getattr(h, _HANDLER_MARK, False)]:
        PROGRESS_LOGGER.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(STDERR_FORMAT))
    setattr(console, _HANDLER_MARK, True)
    root.addHandler(console)
    root.setLevel(logging.DEBUG if log_file else console.level)
    _LEVEL[0] = logging.INFO if verbose or log_file else logging.WARNING
    quiet_libraries()
    if log_file is not None:
        try:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            from pipeline.core.errors import InputError

            raise InputError(f"--log-file {log_file}: {exc.strerror or exc}") from None
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
        PROGRESS_LOGGER.addHandler(handler)
        PROGRESS_LOGGER.setLevel(logging.DEBUG)
