"""What a stage reads of the build configuration, recorded while it runs.

The runner hands each stage's `run()` a read-through view of the BuildConfig that notes every
setting it touches (`calibration.samples`; a whole section when it calls a method on it, such as
`model_dump`). The list goes into stage.json, and a test proves each recorded setting is in the
stage's cache key: a setting that changes a stage's output but not its key would reuse a stale output.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ConfigReads:
    """A read-only view of a pydantic config that records the dotted names of what is read."""

    __slots__ = ("_target", "_prefix", "_log")

    def __init__(self, target: BaseModel, log: set[str], prefix: str = "") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name in type(self._target).model_fields:
            path = f"{self._prefix}{name}"
            if isinstance(value, BaseModel):
                return ConfigReads(value, self._log, f"{path}.")
            self._log.add(path)
            return value
        # A method or property of the section itself (model_dump, to_dict, ...): it may read all of it.
        self._log.add(self._prefix.rstrip(".") or "*")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"stages must not change the build configuration (tried to set {self._prefix}{name})")

    def __repr__(self) -> str:
        return f"ConfigReads({self._target!r})"


def unwrap(config: Any) -> Any:
    """The configuration behind a view (for code that needs the pydantic object itself)."""
    return object.__getattribute__(config, "_target") if isinstance(config, ConfigReads) else config
