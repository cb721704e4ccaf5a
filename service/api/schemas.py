"""Request and response bodies (pydantic)."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, Field

TextOrPair = Union[str, list[str]]


class PredictIn(BaseModel):
    """``{"inputs": ["text", ...]}`` or ``{"inputs": [["text a", "text b"], ...]}``."""

    inputs: list[TextOrPair] = Field(description="Texts, or [text_a, text_b] pairs for pair tasks.")


class PredictionPublic(BaseModel):
    """Classification: label, score (its probability) and every label's probability; regression: value."""

    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    value: float | None = None


class PredictPublic(BaseModel):
    task: str
    predictions: list[PredictionPublic]


class TaskPublic(BaseModel):
    """Facts from a stored bundle's header."""

    name: str
    problem_type: str
    labels: list[str]
    text_pairs: bool
    max_seq_length: int
    format_version: int = Field(description="Bundle format: 2 (header checksum), or 1 (legacy: no header "
                                "checksum; still served, re-save it with a current release to upgrade).")
    sparsity: float = Field(description="Fraction of pruned (zero) weights over all masked matrices.")
    masked_matrices: int
    masked_weights: int
    bytes: int = Field(description="Bundle file size in bytes.")
    resident: bool = Field(description="Whether the task is loaded in the cache now.")
    tier: str = Field(description="hot (CPU: weights materialised in the compute precision), warm (loaded: "
                      "packed mask bits or sparse forms + head) or cold (only in the store).")
    backbone_fingerprint: str
    metrics: dict[str, Any]
    training: dict[str, Any] | None = None
    created_at: str


class TasksPublic(BaseModel):
    tasks: list[TaskPublic]
    count: int


class ReadyPublic(BaseModel):
    status: str


class HealthPublic(BaseModel):
    status: str = Field(description="ok, or degraded when corrupt stored bundles were quarantined.")
    quarantined: list[str] = Field(default_factory=list, description="Tasks whose stored bundle was found corrupt.")
    backbone: str
    backbone_fingerprint: str
    tasks: int
    resident_tasks: int
    device: str
    precision: str = Field(description="CPU compute precision (fp32, bf16, int8), or 'device' on the GPU tier.")
    hot_tasks: int | None = Field(None, description="Tasks in the CPU hot tier (bf16 / int8 only).")


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorPublic(BaseModel):
    error: ErrorBody
