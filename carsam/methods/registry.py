"""The method registry: every PTQ method is a plug-in looked up by name.

A method's `apply(sam, calib, config, context)` quantizes `sam` in place using the calibration set and
returns the details worth recording (its settings, counts, per-unit losses). `quantized` says whether the
evaluated model must have every quantizer in QUANTIZED mode (asserted before evaluation);
`uses_model` is False only for the box-as-mask floor, which scores the prompt boxes themselves; `trains`
(a reconstruction method) makes the run save its quantized model by default (`output.save_model`).
`context` (`carsam.run_context.RunContext`) carries what the run lends the method: the stage-cache stores
(image embeddings, prepared models) and whether to show progress; a method gets no other state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts
    from carsam.run_context import RunContext

ApplyFn = Callable[["Sam", "CocoBoxPrompts", "RunConfig", "RunContext"], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method."""

    name: str
    apply: ApplyFn
    quantized: bool = True
    uses_model: bool = True
    trains: bool = False
    summary: str = ""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (names are unique)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method '{method.name}' is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called `name`; a ValueError lists the valid names otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(method_names())}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def _load_builtin() -> None:
    """Import the built-in methods (each registers itself) the first time the registry is read."""
    from carsam.methods import baselines, carsam, ptq4sam, qdrop, range_search  # noqa: F401
