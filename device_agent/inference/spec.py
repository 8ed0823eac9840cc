"""What a loaded model is: the installed release (``ModelSpec``) and its tensors (``ModelInfo``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleet_protocol import FileRole, ModelRuntime

__all__ = ["DYNAMIC", "ModelInfo", "ModelSpec", "TensorSpec"]

# A dimension a model leaves open (batch, usually), as KServe v2 metadata writes it.
DYNAMIC = -1


@dataclass(frozen=True)
class ModelSpec:
    """One installed release, ready to load: its identity (for results) and its files."""

    name: str
    version: str
    release: int
    runtime: ModelRuntime
    sha256: str  # of the weights file, as the manifest signs it
    weights: Path
    # FileRole value ("labels", "tokenizer", "config", ...) -> path on this device.
    files: Mapping[str, Path] = field(default_factory=dict)

    @property
    def labels(self) -> Path | None:
        """The labels file, one class name per line, if the release has one."""
        return self.files.get(FileRole.LABELS.value)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model."""

    name: str
    dtype: str  # a numpy dtype name: float32, int64, uint8, ...
    shape: tuple[int, ...]  # DYNAMIC (-1) where the model accepts any size

    def describe(self) -> str:
        """``image float32[-1, 3, 32, 32]``, for error messages."""
        return f"{self.name} {self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class ModelInfo:
    """What the worker found in the loaded model; the KServe v2 metadata comes from it."""

    runtime: ModelRuntime
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    # Class names from the labels file (empty without one).
    labels: tuple[str, ...] = ()
    # GGUF: the context size the model was loaded with.
    context_tokens: int | None = None
