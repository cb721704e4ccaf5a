"""Forward: tokenize once, plan length-classed mixed-task batches, run each as one segmented pass, decode.

A request of one task is a mixed batch of one: every pass, on every tier,
goes through :class:`Forward.run`. Rows are tokenized once per call (each
task's rows truncated to its own ``max_seq_length``, single texts or pairs as
the task takes them); the token counts give each row's length class, and
rows are grouped by length class first, then by task (a batch is padded to
its longest row, so mixing a 10-token and a 128-token row would make the
short one cost 128 tokens). Each batch holds at most ``max_batch_size`` rows
(and at most the tier's ``max_tasks`` tasks) and runs as ONE pass of the
engine's tier (:mod:`service.tiers`), which applies each segment's task mask.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from backbone import Backbone
from mask_store.format import BundleHeader
from service.errors import InputInvalid
from service.tasks import LoadedTask

Rows = Sequence[tuple[str, str | None]]
"""``(text_a, text_b)`` per row, ``text_b`` None for single sentences."""

#: length class of every row of up to 2**5 = 32 tokens (see :func:`length_class`)
SHORT_ROW_CLASS = 5

@dataclass(frozen=True)
class PredictOptions:
    """How a request's rows are tokenized and its head outputs turned into predictions.

    Named as Hugging Face ``pipeline("text-classification")`` and text-embeddings-inference name them.

    Attributes:
        truncate: cut a row longer than the task's ``max_seq_length`` tokens (True), or refuse it with
            :class:`InputInvalid` giving its token count and the limit (False).
        truncation_direction: which end loses tokens: "right" (the tail, the tokenizer's default) or
            "left" (the head; a pair loses them from its longer text, the tokenizer's ``longest_first``).
        function_to_apply: classification scores from the logits ``z``: "softmax" (``exp z / Σ exp z``),
            "sigmoid" (``1 / (1 + exp -z)`` per label) or "none" (the logits themselves); None: softmax.
        raw_scores: the logits instead of probabilities (TEI's name for ``function_to_apply="none"``).
        ranked: add ``"top"``, the labels sorted by score, highest first (``top_k`` of them; None: all).
        top_k: how many labels ``"top"`` holds when ``ranked`` (None: every label).
        with_logits: add ``"logits"``, the head's raw outputs (a list of floats), to each prediction.
        formatter: a protocol's own answer from the pass's head outputs, in place of :func:`decode`'s prediction
            dicts (``/v1``'s): called as ``formatter(header, logits, encoded)`` once the pass is done, ``header``
            the bundle header the pass used, ``logits`` float32 ``[rows, num_outputs]`` on the CPU, ``encoded``
            the rows' :class:`Encoded`; what it returns is the request's answer. The options above that shape
            predictions do not apply then.
    """

    truncate: bool = True
    truncation_direction: Literal["right", "left"] = "right"
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None
    raw_scores: bool = False
    ranked: bool = False
    top_k: int | None = None
    with_logits: bool = False
    formatter: Callable[[BundleHeader, torch.Tensor, Sequence[Encoded]], Any] | None = None

    @property
    def function(self) -> str:
        """The function applied to classification logits: "softmax", "sigmoid" or "none"."""
        return "none" if self.raw_scores else self.function_to_apply or "softmax"

    def classification_only(self) -> list[str]:
        """The options set here that only a classification task can honour (request field names)."""
        return [name for name, on in (("top_k", self.ranked), ("raw_scores", self.raw_scores),
                                      ("function_to_apply", self.function_to_apply is not None)) if on]

    def for_regression(self) -> "PredictOptions":
        """These options without the classification-only ones (a fan-out's regression tasks)."""
        return replace(self, ranked=False, top_k=None, raw_scores=False, function_to_apply=None)


DEFAULT_OPTIONS = PredictOptions()


@dataclass(frozen=True)
class PredictRequest:
    """One predict call: ``inputs`` holds ``(text_a, text_b)`` pairs, ``text_b`` None for single sentences."""

    task: str
    inputs: tuple[tuple[str, str | None], ...]
    options: PredictOptions = DEFAULT_OPTIONS


@dataclass
class Encoded:
    """One tokenized row: token ids, (when the tokenizer makes them) token type ids, and whether the
    row was cut to its task's ``max_seq_length``."""

    ids: list[int]
    types: list[int] | None
    truncated: bool = False


def check_rows(header: BundleHeader, rows: Rows) -> None:
    """Raise :class:`InputInvalid` unless ``rows`` are sentence pairs exactly when the task takes pairs."""
    pairs = [r[1] is not None for r in rows]
    if header.text_pairs and not all(pairs):
        raise InputInvalid(f"task {header.task!r} takes sentence pairs: send inputs as [[text_a, text_b], ...]")
    if not header.text_pairs and any(pairs):
        raise InputInvalid(f"task {header.task!r} takes single texts: send inputs as [text, ...]")


def length_class(tokens: int) -> int:
    """``ceil(log2(tokens))``, at least ``SHORT_ROW_CLASS``: rows of up to 32 tokens share one class;
    longer rows share a class with rows within a factor of 2 of their length."""
    return max(SHORT_ROW_CLASS, (tokens - 1).bit_length())


def decode(header: BundleHeader, out: torch.Tensor, options: PredictOptions = DEFAULT_OPTIONS,
           encoded: Sequence[Encoded] | None = None) -> list[dict]:
    """Head outputs ``[rows, num_outputs]`` float32 → one prediction dict per row.

    Regression: ``{"value"}``. Classification: ``{"label", "score", "scores"}``: the arg-max label, its
    score and every label's score, the scores being ``options.function`` of the logits (softmax
    probabilities by default; the arg-max is the same under all three); with ``options.ranked`` also ``"top"``, ``[{"label", "score"}, ...]``
    sorted by score, highest first, ``options.top_k`` long (None or more than the labels: all), as
    ``pipeline(top_k=...)`` answers. ``options.with_logits`` adds ``"logits"`` (raw head outputs);
    a row of ``encoded`` that was truncated adds ``"truncated": True``.

    With ``options.formatter`` set, its answer instead: ``options.formatter(header, out, encoded)``.
    """
    if options.formatter is not None:
        return options.formatter(header, out, encoded if encoded is not None else [])
    if header.problem_type == "regression":
        result = [{"value": float(v)} for v in out.squeeze(-1).tolist()]
    else:
        fn = options.function
        scores = torch.softmax(out, dim=-1) if fn == "softmax" else torch.sigmoid(out) if fn == "sigmoid" else out
        result = []
        for row in scores.tolist():
            best = int(np.argmax(row))
            pred = {"label": header.labels[best], "score": row[best],
                    "scores": {lab: p for lab, p in zip(header.labels, row)}}
            if options.ranked:
                order = sorted(range(len(row)), key=lambda k: -row[k])[:options.top_k]
                pred["top"] = [{"label": header.labels[k], "score": row[k]} for k in order]
            result.append(pred)
    for k, pred in enumerate(result):
        if options.with_logits:
            pred["logits"] = out[k].tolist()
        if encoded is not None and encoded[k].truncated:
            pred["truncated"] = True
    return result


class Forward:
    """Runs mixed-task batches on a tier.

    Args:
        backbone: the backbone (its tokenizer).
        tier: the engine's tier (:mod:`service.tiers`): runs each pass.
        max_batch_size: rows per pass.

    Not thread-safe: the caller runs one :meth:`run` at a time (a torch tier's masked layers hold the
    pass's segment table).
    """

    def __init__(self, backbone: Backbone, tier, max_batch_size: int):
        self._tokenizer_lock = threading.Lock()  # HF tokenizers set truncation state per call: one at a time
        self.backbone = backbone
        self.tier = tier
        self.max_batch_size = max_batch_size

    def tokenize(self, header: BundleHeader, rows: Rows, options: PredictOptions = DEFAULT_OPTIONS) -> list[Encoded]:
        """Token ids of ``rows`` as ``header``'s task takes them, cut to its ``max_seq_length`` at
        ``options.truncation_direction`` (the tokenizer's ``truncation_side``); a row that lost tokens is
        marked ``truncated``.

        Raises:
            InputInvalid: ``options.truncate`` is False and a row is longer than ``max_seq_length`` tokens
                (the message gives the row, its token count and the limit).
        """
        a = [r[0] for r in rows]
        b = [r[1] for r in rows] if header.text_pairs else None
        limit = header.max_seq_length
        tok = self.backbone.tokenizer
        with self._tokenizer_lock:
            side = tok.truncation_side
            tok.truncation_side = options.truncation_direction
            try:
                enc = tok(a, b, truncation=options.truncate, max_length=limit)
                ids = enc["input_ids"]
                # a row cut to the limit has exactly `limit` tokens; only those are tokenized again, whole
                full = [k for k, x in enumerate(ids) if len(x) == limit] if options.truncate else []
                whole = tok([a[k] for k in full], [b[k] for k in full] if b else None,
                            truncation=False)["input_ids"] if full else []
            finally:
                tok.truncation_side = side
        if not options.truncate:
            for k, x in enumerate(ids):
                if len(x) > limit:
                    raise InputInvalid(f"inputs[{k}] is {len(x)} tokens, more than the limit of {limit} of task "
                                       f"{header.task!r} (send \"truncate\": true to cut it)")
        cut = {k for k, w in zip(full, whole) if len(w) > limit}
        types = enc.get("token_type_ids")
        return [Encoded(x, types[k] if types is not None else None, k in cut) for k, x in enumerate(ids)]

    def encode(self, items: Sequence[tuple[str, Rows]], entries: dict[str, LoadedTask],
               options: Sequence[PredictOptions] | None = None) -> list[list[Encoded]]:
        """Tokenize every item's rows, once, as its task takes them, with the item's ``options`` (None: the
        defaults) (callable outside the pass lock; the caller has checked the rows against each header,
        :func:`check_rows`). Raises as :meth:`tokenize`."""
        opts = options or [DEFAULT_OPTIONS] * len(items)
        return [self.tokenize(entries[task].header, rows, o) for (task, rows), o in zip(items, opts)]

    @torch.inference_mode()
    def run(self, items: Sequence[tuple[str, Rows]], entries: dict[str, LoadedTask],
            encoded: list[list[Encoded]], forms: dict[str, dict] | None = None) -> list[torch.Tensor]:
        """Head outputs for the rows of several tasks, with as few passes as possible.

        Args:
            items: ``(task, rows)`` pairs (a task may appear in several items: one segment).
            entries: the resident entry of every task named by ``items``.
            encoded: :meth:`encode`'s result for ``items``.
            forms: each task's promoted form (:meth:`service.tiers.base.Tier.promote`; None: promoted where needed).

        Returns:
            One float32 ``[len(rows), num_outputs]`` tensor per item, in the order of ``items``.
        """
        by_task: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()  # task -> [(item, row)]
        for i, (task, rows) in enumerate(items):
            by_task.setdefault(task, []).extend((i, j) for j in range(len(rows)))
        results = [torch.empty(len(rows), entries[task].header.num_outputs) for task, rows in items]
        max_tasks = self.tier.max_tasks or len(by_task)
        klass = [[length_class(len(e.ids)) for e in enc] for enc in encoded]
        flat = sorted(((task, i, j) for task, refs in by_task.items() for i, j in refs),
                      key=lambda r: klass[r[1]][r[2]])  # stable: by task within a class
        batch: list[tuple[str, int, int]] = []
        for ref in flat:
            new_task = not batch or batch[-1][0] != ref[0]
            if batch and (len(batch) == self.max_batch_size
                          or klass[ref[1]][ref[2]] != klass[batch[-1][1]][batch[-1][2]]
                          or (new_task and len({t for t, _, _ in batch}) == max_tasks)):
                self._run_batch(batch, encoded, entries, results, forms)
                batch = []
            batch.append(ref)
        if batch:
            self._run_batch(batch, encoded, entries, results, forms)
        return results

    def _run_batch(self, batch: list[tuple[str, int, int]], encoded: list[list[Encoded]],
                   entries: dict[str, LoadedTask], results: list[torch.Tensor], forms: dict[str, dict] | None) -> None:
        """Forward ``batch`` (``(task, item, row)`` refs sorted by task) and scatter into ``results``."""
        segs: list[tuple[str, list[tuple[int, int]]]] = []
        for task, i, j in batch:
            if not segs or segs[-1][0] != task:
                segs.append((task, []))
            segs[-1][1].append((i, j))
        outs = self._pass([(task, entries[task]) for task, _ in segs],
                          [[encoded[i][j] for i, j in refs] for _, refs in segs], forms)
        for (_, refs), out in zip(segs, outs):
            for (i, j), row in zip(refs, out):
                results[i][j] = row

    def _pad(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        """Model inputs int64 ``[batch, T]`` on the CPU, padded to the longest row."""
        tok = self.backbone.tokenizer
        seq_len = max(len(r.ids) for r in rows)
        left = getattr(tok, "padding_side", "right") == "left"
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

        def padded(seqs: list[list[int]], value: int) -> torch.Tensor:
            fill = [[value] * (seq_len - len(x)) for x in seqs]
            return torch.tensor([f + x if left else x + f for x, f in zip(seqs, fill)], dtype=torch.long)

        inputs = {"input_ids": padded([r.ids for r in rows], pad_id),
                  "attention_mask": padded([[1] * len(r.ids) for r in rows], 0)}
        if all(r.types is not None for r in rows):
            inputs["token_type_ids"] = padded([r.types for r in rows], 0)
        return inputs

    def _pass(self, segs: list[tuple[str, LoadedTask]], rows: list[list[Encoded]],
              forms: dict[str, dict] | None = None) -> list[torch.Tensor]:
        """ONE forward pass over the rows of several tasks (one segment per task, distinct tasks).

        Returns:
            float32 ``[len(rows[s]), num_outputs]`` on the CPU per segment.
        """
        seq_starts = [0]
        for r in rows:
            seq_starts.append(seq_starts[-1] + len(r))
        inputs = self._pad([e for r in rows for e in r])
        pooled = self.tier.pooled(segs, forms, inputs, seq_starts)  # [batch, hidden] float32 on the CPU
        return [nn.functional.linear(pooled[seq_starts[i]:seq_starts[i + 1]], e.head_weight, e.head_bias)
                for i, (_, e) in enumerate(segs)]
