"""Quantpipe: export, calibrate, quantize and verify transformers for deployment.

The Python API (pipeline/api/): `pipeline.build(...)`, `pipeline.verify(build_dir)`, `pipeline.load(build_dir)`
and `pipeline.BuildResult`, imported on first use so that `import pipeline` stays light.

`pipeline.build` is also the name of the subpackage that holds the build runner (pipeline/build/); Python
sets that subpackage as this package's attribute whenever it is imported, so the subpackage itself is made
callable: `pipeline.build(...)` is always `pipeline.api.build(...)`, and `pipeline.build.runner` still works.
"""

import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = ("build", "verify", "load", "BuildResult")
__all__ = ["__version__", *_API]


class _CallableBuildPackage(types.ModuleType):
    """The pipeline.build subpackage, callable as the API's build()."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import pipeline.api

        return pipeline.api.build(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "build" and type(value) is types.ModuleType:
            value.__class__ = _CallableBuildPackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "build":
        import pipeline.build  # the subpackage (empty __init__): made callable above

        return sys.modules["pipeline.build"]
    if name in _API:
        import pipeline.api  # lazy: the API imports the whole pipeline

        return getattr(pipeline.api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
