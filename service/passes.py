"""Passes: a predict request prepared once (checked against its task, the task loaded and promoted, its rows
tokenized) and mixed-task passes run on the engine's tier under the pass lock, then decoded.

The stage between admission / batching (:mod:`service.admission`, :mod:`service.batcher`) and the forward
(:mod:`service.forward`, which runs one pass per length-classed batch on the tier, :mod:`service.tiers`). Task
loads, promotions, the store's freshness checks and tokenization run outside the pass lock.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backbone import Backbone
from mask_store.format import BundleHeader
from service import tracing
from service.batcher import ClientGone
from service.errors import InputInvalid
from service.forward import DEFAULT_OPTIONS, Forward, PredictOptions, PredictRequest, Rows, check_rows, decode
from service.tasks import LoadedTask, TaskTable


@dataclass(frozen=True)
class Prepared:
    """A predict request after :meth:`Passes.prepare`: its options, and what its pass needs, resolved once — the
    task's resident entry (whose header decodes the answer), its tier form, and its rows' tokens."""

    options: PredictOptions
    entry: LoadedTask
    form: Any
    encoded: list



def check_request(req: PredictRequest, header: BundleHeader) -> None:
    """Raise :class:`InputInvalid` unless ``req``'s inputs fit ``header``'s task (single texts or pairs) and a
    regression task is not asked for classification-only options."""
    check_rows(header, req.inputs)
    wrong = req.options.classification_only() if header.problem_type == "regression" else []
    if wrong:
        raise InputInvalid(f"task {req.task!r} is a regression task (it answers a value): {', '.join(wrong)} "
                           f"{'applies' if len(wrong) == 1 else 'apply'} only to classification tasks; a "
                           f"regression task takes truncate and truncation_direction")



class Passes:
    """Runs prepared requests and mixed-task passes for one engine.

    Args:
        backbone: the backbone (hidden size, config and tokenizer limits for :meth:`embed`).
        tasks: the engine's task table.
        tier: the engine's tier (:mod:`service.tiers`).
        forward: tokenizes and runs the length-classed batches on ``tier``.
        max_batch_size: rows per pass.

    Thread-safe: passes are serialised by :attr:`lock` (a torch tier's shared modules hold the active pass's segment
    table); everything else runs outside it.
    """

    def __init__(self, backbone: Backbone, tasks: TaskTable, tier, forward: Forward, max_batch_size: int):
        self.backbone = backbone
        self.tasks = tasks
        self.tier = tier
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.lock = threading.Lock()  # the pass lock: one forward pass at a time

    def mixed(self, items: Sequence[tuple[str, Rows]], count: bool = True,
              options: Sequence[PredictOptions] | None = None) -> tuple[list[torch.Tensor], list[BundleHeader], list]:
        """Head outputs float32 ``[len(rows), num_outputs]`` per item, the header each was computed with and its
        rows' tokens (``count`` as in :meth:`resolve`; ``options`` one per item, None: the defaults).

        Raises:
            as :meth:`service.engine.Engine.logits_mixed`.
        """
        entries, forms = self.resolve(items, count)
        rows = sum(len(r) for _, r in items)
        with tracing.span("supermask.tokenize", rows=rows):
            encoded = self.forward.encode(items, entries, options)  # tokenized outside the pass lock too
        with self.lock, tracing.span("supermask.forward", rows=rows, tasks=len(entries)):
            outs = self.forward.run(items, entries, encoded, forms)
        return outs, [entries[task].header for task, _ in items], encoded

    def resolve(self, items: Sequence[tuple[str, Rows]], count: bool = True
                ) -> tuple[dict[str, LoadedTask], dict[str, Any]]:
        """Each named task's resident entry (loaded on a miss) and its tier form (promoted on a miss), after checking
        each item's rows against the entry's header. Outside the pass lock: a cold load or a promotion stalls no
        pass of other tasks.

        ``count``: record cache hits / misses (False for the second lookup of a request :meth:`prepare` counted).
        """
        entries: dict[str, LoadedTask] = {}
        for task, rows in items:
            if task not in entries:
                entries[task] = self.tasks.get(task, count=count)
            check_rows(entries[task].header, rows)
        forms = {t: self.tier.promote(t, e) for t, e in entries.items()}
        return entries, forms

    def predict_mixed(self, items: Sequence[tuple[str, Rows]], count: bool = True,
                      options: Sequence[PredictOptions | None] | None = None) -> list[list[dict]]:
        """:meth:`mixed` decoded: one prediction list per item, each with the header its pass used (``options`` one
        per item, None: the defaults)."""
        opts = [o or DEFAULT_OPTIONS for o in options] if options is not None else [DEFAULT_OPTIONS] * len(items)
        outs, headers, encoded = self.mixed(items, count, opts)
        return [decode(h, out, o, enc) for h, out, o, enc in zip(headers, outs, opts, encoded)]

    def run_prepared(self, items: Sequence[tuple[str, Rows]], prepared: Sequence[Prepared],
                     cancelled: Callable[[], bool] | None = None) -> list[list[dict]]:
        """:meth:`predict_mixed` (decoded predictions per item) for requests :meth:`prepare` checked, resolved and
        tokenized: their passes reuse that work. A task whose bundle was replaced since (the store's version of it,
        one ``stat`` or ``HEAD``), or whose items were prepared from different bundles, is resolved and tokenized
        again, so that every item is answered wholly by the bundle the store holds when its pass runs.

        ``cancelled``: asked once the pass lock is held; True skips the pass (raises :class:`ClientGone`).
        """
        entries: dict[str, LoadedTask] = {}
        for (task, _), p in zip(items, prepared):
            entries.setdefault(task, p.entry)
        mixed_bundles = any(p.entry is not entries[task] for (task, _), p in zip(items, prepared))
        if mixed_bundles or any(e.version is not None and self.tasks.store.version(t) != e.version
                                for t, e in entries.items()):  # replaced since prepared: resolved again
            return self.predict_mixed(items, count=False, options=[p.options for p in prepared])
        forms = {task: p.form for (task, _), p in zip(items, prepared)}
        encoded = [p.encoded for p in prepared]
        rows = sum(len(r) for _, r in items)
        with self.lock, tracing.span("supermask.forward", rows=rows, tasks=len(entries)):
            if cancelled is not None and cancelled():
                raise ClientGone(f"the client left while {rows} rows waited for a pass")
            outs = self.forward.run(items, entries, encoded, forms)
        return [decode(p.entry.header, out, p.options, p.encoded) for p, out in zip(prepared, outs)]

    def prepare(self, req: PredictRequest, keep: bool | None = None) -> Prepared:
        """Check ``req``'s inputs against its task, load the task (a miss), have the tier promote it (``keep`` as
        :meth:`service.tiers.base.Tier.promote`), and tokenize its rows: everything its pass needs, done once,
        outside the pass lock.

        Raises:
            as :meth:`predict`; InputInvalid: with ``truncate`` off, a row longer than the task's limit.
        """
        entry = self.tasks.get(req.task)
        check_request(req, entry.header)
        form = self.tier.promote(req.task, entry, keep)
        with tracing.span("supermask.tokenize", rows=len(req.inputs)):
            encoded = self.forward.tokenize(entry.header, req.inputs, req.options)
        return Prepared(req.options, entry, form, encoded)

    def fanout_plan(self, tasks: Sequence[str]) -> dict[str, bool]:
        """Which of a fan-out's tasks to keep hot: those already hot, then the others in order while the hot cache's
        budget holds them beside the fan-out's hot ones; the rest are built for this pass only (``False``), so a
        fan-out wider than the hot tier never evicts its own tasks to promote its others (no thrashing: the same
        fan-out again finds the kept ones hot). Empty without a hot cache. Loads the tasks (they are needed next).
        """
        hot = self.tier.hot
        if hot is None:
            return {}
        size = {}
        for t in dict.fromkeys(tasks):
            try:
                size[t] = hot.task_bytes(self.tasks.get(t, count=False))
            except Exception:  # noqa: BLE001 - its own prepare raises it, in request order
                continue
        room = hot.capacity_bytes - sum(n for t, n in size.items() if t in hot.tasks)
        plan = {}
        for t in size:
            if t in hot.tasks:
                continue
            plan[t] = size[t] <= room
            room -= size[t] if plan[t] else 0
        return plan

    def embed(self, task: str | None, rows: Rows, *, truncate: bool = True,
              truncation_direction: str = "right") -> torch.Tensor:
        """Sentence embeddings: the mean-pooled last hidden states of the backbone (``task`` None: no mask, as
        sentence-transformers' ``Pooling(mean)`` over the int8 backbone) or of the backbone through ``task``'s
        supermask (the vectors its head reads: ``embed(t, x) @ W_head.T + b_head`` is :meth:`service.engine.Engine.logits`).

        Rows are tokenized as :meth:`service.forward.Forward.tokenize` does (single texts, or pairs where
        ``text_b`` is set), cut to the task's ``max_seq_length`` (no task: the backbone's position embeddings,
        at most the tokenizer's ``model_max_length``), and run as passes of at most ``max_batch_size`` rows of
        the engine's tier (:meth:`service.tiers.base.Tier.pooled`), under the pass lock.

        No task is served as a task named ``<backbone>`` (not a valid task name) with no masks and no head, built
        once: like a task it takes a hot-tier entry or a device slot, and appears in their metrics under that name.

        Returns:
            float32 ``[len(rows), hidden]`` on the CPU, not normalised.
        Raises:
            TaskNotFound, BundleInvalid, BackboneMismatch, TaskTooLarge: as :meth:`service.engine.Engine.logits`. InputInvalid:
            ``truncate`` False and a row longer than the limit (its token count in the message).
        """
        if not rows:
            return torch.empty(0, self.backbone.hidden_size)
        if task is None:
            entry = getattr(self, "_backbone_entry", None)
            if entry is None:  # no masks, no head: every tier computes the plain backbone (built once)
                hidden = self.backbone.hidden_size
                entry = self._backbone_entry = LoadedTask(None, {}, torch.empty(0, hidden), torch.empty(0))
            limit = min(getattr(self.backbone.model.config, "max_position_embeddings", 512),
                        getattr(self.backbone.tokenizer, "model_max_length", 512))
            name = "<backbone>"  # not a valid task name: never one of the store's
        else:
            entry, name = self.tasks.get(task), task
            limit = entry.header.max_seq_length
        pairs = any(b is not None for _, b in rows)
        shape = types.SimpleNamespace(task=name, text_pairs=pairs, max_seq_length=limit)  # what tokenize reads
        options = PredictOptions(truncate=truncate, truncation_direction=truncation_direction)
        encoded = self.forward.tokenize(shape, rows, options)
        form = self.tier.promote(name, entry)
        out = []
        with torch.inference_mode():
            for start in range(0, len(encoded), self.max_batch_size):
                chunk = encoded[start:start + self.max_batch_size]
                inputs = self.forward._pad(chunk)
                with self.lock:
                    out.append(self.tier.pooled([(name, entry)], {name: form}, inputs, [0, len(chunk)]))
        return torch.cat(out)
