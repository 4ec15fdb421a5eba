"""Backends, one per target. Heavy or optional imports (tensorrt) happen inside functions."""
