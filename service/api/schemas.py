"""Request and response bodies (pydantic)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TextPairIn(BaseModel):
    """One input as Hugging Face ``pipeline("text-classification")`` takes it: ``{"text": ..., "text_pair": ...}``
    (``text_pair`` absent or null: a single text)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    text_pair: str | None = None


TextOrPair = Union[str, list[str], TextPairIn]


class PredictIn(BaseModel):
    """``{"inputs": ["text", ...]}`` or ``{"inputs": [["text a", "text b"], ...]}``, with options named as
    Hugging Face ``pipeline("text-classification")`` and text-embeddings-inference name them. Unknown fields
    are refused (422 naming them)."""

    # strict: a value of another JSON type is refused, as the schema says (lax pydantic took 0 for false)
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"inputs": ["a charming and often affecting journey", "dull, flat and lifeless"]},
        {"inputs": ["an astonishing film"], "top_k": 2, "truncate": False}]})

    inputs: Union[list[TextOrPair], str, TextPairIn] = Field(
        description="Texts, or [text_a, text_b] pairs (or {\"text\", \"text_pair\"} objects) for pair tasks; one text "
        "or one object alone is one input (answered by one prediction, as TEI and pipeline() take it).")
    top_k: int | None = Field(None, ge=1, description="Add `top`: the labels sorted by score, highest first, this "
                              "many of them; null: every label. Absent: no `top`. Classification only.")
    raw_scores: bool = Field(False, description="Scores are the logits instead of probabilities (as "
                             "function_to_apply: none). Classification only.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="How scores are made from the logits: softmax (the default), sigmoid (per label) or none "
        "(the logits). Classification only.")
    truncate: bool = Field(True, description="Cut an input longer than the task's max_seq_length tokens (the "
                           "prediction then says truncated: true); false: refuse it with 422, giving its token count.")
    truncation_direction: Literal["right", "left"] = Field(
        "right", description="Which end of an over-long input is cut: right (its tail) or left (its head).")

    @model_validator(mode="after")
    def _consistent(self) -> "PredictIn":
        if self.raw_scores and self.function_to_apply not in (None, "none"):
            raise ValueError(f"raw_scores: true asks for the logits, function_to_apply: {self.function_to_apply!r} "
                             f"for {self.function_to_apply} of them; send one of the two")
        return self

    def option_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``service.forward.PredictOptions`` (``ranked``: top_k was sent)."""
        return {"truncate": self.truncate, "truncation_direction": self.truncation_direction,
                "function_to_apply": self.function_to_apply, "raw_scores": self.raw_scores,
                "ranked": "top_k" in self.model_fields_set, "top_k": self.top_k}


class FanOutIn(PredictIn):
    """A predict body with ``tasks``: every task answers every input, from one mixed-task forward call."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"inputs": ["the book was read by me"], "tasks": ["SST-2", "CoLA"]},
        {"inputs": [["A man is playing a guitar.", "A man plays guitar."]], "tasks": "*"}]})

    tasks: list[str] | Literal["*"] = Field(description='Task names, or "*" for every stored task that takes '
                                            "these inputs (single texts or pairs), at most SUPERMASK_MAX_FANOUT_TASKS.")


class LabelScore(BaseModel):
    label: str
    score: float


class PredictionPublic(BaseModel):
    """Classification: label, score and every label's score (probabilities unless raw_scores /
    function_to_apply say otherwise), with top_k the labels ranked; regression: value. ``truncated``
    is true when the input was cut to the task's max_seq_length (absent otherwise)."""

    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    top: list[LabelScore] | None = None
    value: float | None = None
    truncated: bool | None = None


class PredictPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"task": "SST-2", "predictions": [{"label": "positive", "score": 0.97,
                                           "scores": {"negative": 0.03, "positive": 0.97}}]},
        {"task": "STS-B", "predictions": [{"value": 4.6}]}]})

    task: str
    predictions: list[PredictionPublic]


class FanOutPublic(BaseModel):
    """One result per task, in the order of the request's ``tasks`` (``"*"``: by name)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"task": "SST-2", "predictions": [{"label": "negative", "score": 0.81,
                                           "scores": {"negative": 0.81, "positive": 0.19}}]},
        {"task": "CoLA", "predictions": [{"label": "acceptable", "score": 0.74,
                                          "scores": {"unacceptable": 0.26, "acceptable": 0.74}}]}]}]})

    results: list[PredictPublic]


_TASK_EXAMPLE = {"name": "SST-2", "problem_type": "single_label_classification", "labels": ["negative", "positive"],
                 "text_pairs": False, "max_seq_length": 64, "format_version": 2, "sparsity": 0.0275,
                 "masked_matrices": 36, "masked_weights": 10616832, "bytes": 1342085, "resident": True,
                 "tier": "hot", "backbone_fingerprint": "9c1d…", "metrics": {"accuracy": 0.89},
                 "created_at": "2026-11-30T12:00:00+00:00"}


class TaskPublic(BaseModel):
    """Facts from a stored bundle's header."""

    model_config = ConfigDict(json_schema_extra={"examples": [_TASK_EXAMPLE]})

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
    model_config = ConfigDict(json_schema_extra={"examples": [{"tasks": [_TASK_EXAMPLE], "count": 1}]})

    tasks: list[TaskPublic]
    count: int


class ReadyPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})

    status: str


class HealthPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ok", "quarantined": [], "backbone": "all-MiniLM-L6-v2", "backbone_fingerprint": "9c1d…",
         "tasks": 6, "resident_tasks": 2, "device": "cpu", "precision": "int8", "runtime": "onnxruntime",
         "hot_tasks": 2}]})

    status: str = Field(description="ok, or degraded when corrupt stored bundles were quarantined.")
    quarantined: list[str] = Field(default_factory=list, description="Tasks whose stored bundle was found corrupt.")
    backbone: str
    backbone_fingerprint: str
    tasks: int
    resident_tasks: int
    device: str
    precision: str = Field(description="CPU compute precision (fp32, bf16, int8), or 'device' on the GPU tier.")
    runtime: str = Field("torch", description="What runs the passes: torch, or onnxruntime (the int8 CPU tier).")
    hot_tasks: int | None = Field(None, description="Tasks in the CPU hot tier (bf16 / int8 only).")
    tiers: dict[str, dict] = Field(default_factory=dict, description=(
        "Per residency tier (warm: the host task cache; hot: the CPU hot tier, where there is one): tasks, bytes, "
        "capacity_bytes, evictions since start; the hot tier also names its pinned tasks."))


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorPublic(BaseModel):
    error: ErrorBody


class OipError(BaseModel):
    """The Open Inference Protocol's error body, under ``/v2``."""

    error: str


class TeiError(BaseModel):
    """text-embeddings-inference's ``ErrorResponse``, on its routes (``/predict``, ``/embed``, ``/info``,
    ``/health``)."""

    error: str
    error_type: Literal["unhealthy", "backend", "overloaded", "validation", "tokenizer"]
