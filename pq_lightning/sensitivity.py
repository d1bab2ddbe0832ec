"""The sensitivity file: per-Linear Fisher statistics measured by the probe (no Lightning).

One safetensors file holds, for every tracked Linear ``<name>``:

* ``<name>.diag_out`` ``[out]`` and ``<name>.diag_in`` ``[in]`` (float64): the per-output-channel and
  per-input-channel sums of the per-token Fisher diagonal, each a mean over tokens;
* ``<name>.h_trace`` ``[1]`` (float64): the per-token empirical Fisher trace ``Σ_t ‖g_t‖²‖x_t‖² / N``;
* ``<name>.output_error.<format>`` ``[1]`` (float64): ``½ Σ_t Σ_o g_{t,o}² (y_t − ŷ_t)_o² / N``.

The safetensors metadata header carries one JSON document (key :data:`META_KEY`) with the run's
``meta`` (model and data fingerprints, token count, formats, estimator settings, package version,
creation time) and each Linear's shape. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file

META_KEY = "pq_lightning.sensitivity"
FILE_VERSION = 1


@dataclass
class LinearSensitivity:
    """Fisher statistics of one Linear (all means over the counted tokens)."""

    name: str
    shape: tuple[int, int]
    h_trace: float
    diag_out: torch.Tensor
    diag_in: torch.Tensor
    output_error: dict[str, float] = field(default_factory=dict)
    weight_numel: int = 0

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        if not self.weight_numel:
            self.weight_numel = self.shape[0] * self.shape[1]

    def diag(self) -> torch.Tensor:
        """The rank-one approximation ``diag_out ⊗ diag_in / h_trace`` of the per-element diagonal."""
        if self.h_trace <= 0:
            return torch.zeros(self.shape, dtype=torch.float64)
        return torch.outer(self.diag_out.double(), self.diag_in.double()) / self.h_trace


@dataclass
class Sensitivity:
    """The probe's result: one :class:`LinearSensitivity` per tracked Linear, plus run metadata."""

    linears: dict[str, LinearSensitivity]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.meta.get("n_tokens", 0))

    @property
    def formats(self) -> list[str]:
        return list(self.meta.get("formats", []))

    def __getitem__(self, name: str) -> LinearSensitivity:
        return self.linears[name]

    def __len__(self) -> int:
        return len(self.linears)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("pq-lightning")
    except Exception:  # not installed as a distribution (e.g. a source checkout on sys.path)
        return "unknown"


def default_meta(**extra: Any) -> dict[str, Any]:
    """The metadata every sensitivity file carries besides what the caller adds."""
    import datetime

    meta: dict[str, Any] = {
        "file_version": FILE_VERSION,
        "package_version": _package_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta


def save_sensitivity(sens: Sensitivity, path: str | os.PathLike[str]) -> Path:
    """Write ``sens`` to ``path`` (safetensors + JSON metadata header), atomically. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict[str, Any]] = {}
    for name, lin in sens.linears.items():
        tensors[f"{name}.diag_out"] = lin.diag_out.detach().to("cpu", torch.float64).contiguous()
        tensors[f"{name}.diag_in"] = lin.diag_in.detach().to("cpu", torch.float64).contiguous()
        tensors[f"{name}.h_trace"] = torch.tensor([lin.h_trace], dtype=torch.float64)
        for fmt, value in lin.output_error.items():
            tensors[f"{name}.output_error.{fmt}"] = torch.tensor([value], dtype=torch.float64)
        shapes[name] = {
            "shape": list(lin.shape),
            "weight_numel": int(lin.weight_numel),
            "formats": list(lin.output_error),
        }
    meta = dict(sens.meta)
    meta.setdefault("file_version", FILE_VERSION)
    header = {META_KEY: json.dumps({"meta": meta, "linears": shapes}, sort_keys=True, default=str)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_sensitivity(path: str | os.PathLike[str], *, model_fingerprint: str | None = None) -> Sensitivity:
    """Read a file written by :func:`save_sensitivity`.

    Args:
        path: the ``.safetensors`` file.
        model_fingerprint: when given, the file must have been measured on a model with this
            fingerprint (:func:`pq_lightning.models.model_fingerprint`); otherwise ValueError.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no sensitivity file at {path}; run the Fisher probe first (FisherProbe callback)"
        )
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if META_KEY not in header:
            raise ValueError(
                f"{path} is a safetensors file but not a pq-lightning sensitivity file (no {META_KEY!r} metadata)"
            )
        doc = json.loads(header[META_KEY])
        meta = doc["meta"]
        if int(meta.get("file_version", 0)) > FILE_VERSION:
            raise ValueError(
                f"{path} was written by a newer pq-lightning (file version {meta.get('file_version')}); upgrade to read it"
            )
        if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
            raise ValueError(
                f"sensitivity file was measured on another model: {path} has model fingerprint "
                f"{meta.get('model_fingerprint')!r}, the model given has {model_fingerprint!r}; re-run the probe "
                "on this model (FisherProbe) or pass the matching sensitivity file."
            )
        linears = {}
        for name, info in doc["linears"].items():
            linears[name] = LinearSensitivity(
                name=name,
                shape=tuple(info["shape"]),
                h_trace=float(f.get_tensor(f"{name}.h_trace")[0]),
                diag_out=f.get_tensor(f"{name}.diag_out"),
                diag_in=f.get_tensor(f"{name}.diag_in"),
                output_error={
                    fmt: float(f.get_tensor(f"{name}.output_error.{fmt}")[0]) for fmt in info["formats"]
                },
                weight_numel=int(info["weight_numel"]),
            )
    return Sensitivity(linears=linears, meta=meta)
