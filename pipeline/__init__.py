"""Quantpipe: export, calibrate, quantize and verify transformers for deployment."""

__version__ = "0.1.0"
