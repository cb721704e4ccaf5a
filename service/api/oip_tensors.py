"""Open Inference Protocol v2 tensors (:mod:`service.api.v2`'s wire format): an inference request parsed into
its BYTES inputs (JSON tensors, or Triton's binary tensor data extension), the outputs it asks for, and the output
tensors made from a pass's head outputs (:func:`infer_outputs`)."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np
import torch

from mask_store.format import BundleHeader
from service.errors import InputInvalid

_LEN = struct.Struct("<I")

MAX_DATA_DEPTH = 8  # a tensor's "data" may nest by its shape; deeper is refused (no recursion)


def _flatten(data: Any) -> list:
    """The elements of a tensor's nested ``data`` lists, in order, without recursion.

    Raises:
        InputInvalid: nested deeper than :data:`MAX_DATA_DEPTH`.
    """
    out, stack = [], [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= MAX_DATA_DEPTH:
                raise InputInvalid(f"tensor data nested more than {MAX_DATA_DEPTH} levels deep")
            stack.extend((x, depth + 1) for x in reversed(item))
        else:
            out.append(item)
    return out


def _bytes_elements(raw: bytes, name: str) -> list[str]:
    """Triton's binary BYTES tensor: each element a uint32 little-endian length, then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InputInvalid(f"input {name!r}: binary BYTES data ends inside an element's length")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InputInvalid(f"input {name!r}: binary BYTES element of {n} bytes runs past the data")
        out.append(_text(raw[pos:pos + n], name))
        pos += n
    return out


def _short(value: Any, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a large request back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputInvalid(f"input {name!r} holds bytes that are not UTF-8 text") from None
    if not isinstance(value, str):
        raise InputInvalid(f"input {name!r} holds {type(value).__name__} values; BYTES inputs hold text")
    return value


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, list[str]]]:
    """The JSON part of an inference request and its BYTES inputs by name (text per element).

    Raises:
        InputInvalid: malformed JSON or binary framing, a datatype other than BYTES, a shape that does not
            hold its data, an input named twice.
    """
    if header_length is not None:
        # ASCII digits only: str.isdigit() also takes "²" or "٣", which int() refuses (a ValueError: 500)
        if not re.fullmatch(r"[0-9]{1,19}", header_length) or int(header_length) > len(body):
            raise InputInvalid(f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
                               f"{len(body)} bytes")
        head, binary = body[:int(header_length)], body[int(header_length):]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError):
        raise InputInvalid("the inference request is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InputInvalid('the inference request needs "inputs": a list of tensors')
    tensors: dict[str, list[str]] = {}
    pos = 0
    for k, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InputInvalid(f"inputs[{k}] is not a tensor with a name")
        name = t["name"]
        if name in tensors:
            raise InputInvalid(f"input {name!r} is given twice")
        if t.get("datatype") != "BYTES":
            raise InputInvalid(f"input {name[:100]!r} has datatype {_short(t.get('datatype'))}; text inputs are BYTES")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0 or pos + size > len(binary):  # noqa: E721 - bool is refused
                raise InputInvalid(f"input {name[:100]!r}: binary_data_size {_short(size)} does not fit the "
                                   f"binary data")
            values = _bytes_elements(binary[pos:pos + size], name)
            pos += size
        else:
            values = [_text(v, name) for v in _flatten(t.get("data", []))]
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # noqa: E721
            raise InputInvalid(f"input {name[:100]!r} has shape {_short(shape)}; expected a list of sizes")
        count = 1
        for d in shape:
            count *= d
        if count != len(values):
            raise InputInvalid(f"input {name!r}: shape {_short(shape)} holds {count} elements, the data {len(values)}")
        tensors[name] = values
    if pos != len(binary):
        raise InputInvalid(f"{len(binary) - pos} bytes of binary data are not claimed by any input")
    return doc, tensors


def requested_outputs(task: str, outputs: Any, available: list[str]) -> list[str]:
    """The output names an inference request asks for, in its order (absent or empty: every output).

    Each is answered once: a name given twice is refused, so a reply is bounded by the task's outputs.

    Raises:
        InputInvalid: ``outputs`` is not a list of ``{"name": <string>}`` objects, names an output the task does
            not have, or names one twice.
    """
    if outputs is None:
        return list(available)
    if not isinstance(outputs, list):
        raise InputInvalid(f'"outputs" is a list of {{"name": ...}} tensors, not {type(outputs).__name__}')
    wanted = []
    for k, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InputInvalid(f'outputs[{k}] is not a tensor with a "name" string')
        if o["name"] not in available:
            raise InputInvalid(f"task {task!r} has no output {o['name'][:100]!r}; it has {available}")
        if o["name"] in wanted:
            raise InputInvalid(f"output {o['name']!r} is named twice in outputs; name each output once")
        wanted.append(o["name"])
    return wanted or list(available)


def pass_logits(header: BundleHeader, logits: torch.Tensor, encoded) -> tuple[BundleHeader, torch.Tensor]:
    """The answer an inference asks of the engine (:attr:`service.forward.PredictOptions.formatter`): the header
    its pass used and the pass's head outputs, float32 ``[rows, num_outputs]``; formatted here, not by ``/v1``'s
    decoding."""
    return header, logits


def infer_outputs(header: BundleHeader, logits: torch.Tensor) -> tuple[dict[str, list], dict[str, list[int]]]:
    """The OIP output tensors of one pass, from its head outputs: ``(data, shapes)``, each keyed by output name.

    Args:
        header: the bundle header the pass used.
        logits: its head outputs, float32 ``[n, num_outputs]`` (n >= 1).
    Returns:
        ``data``: ``label`` (classification: the arg-max label per row; regression: None per row, never sent: the
        task has no ``label`` output), ``score`` (classification: that label's softmax probability; regression:
        the value) and ``logits`` (row-major, ``n * num_outputs`` floats); ``shapes``: ``label`` and ``score``
        ``[n]``, ``logits`` ``[n, num_outputs]``.
    """
    n, width = logits.shape
    if header.problem_type == "regression":
        labels, scores = [None] * n, [float(v) for v in logits[:, 0].tolist()]
    else:
        labels, scores = [], []
        for row in torch.softmax(logits, dim=-1).tolist():
            best = int(np.argmax(row))  # the first of equal probabilities, as /v1's label
            labels.append(header.labels[best])
            scores.append(row[best])
    data = {"label": labels, "score": scores, "logits": logits.reshape(-1).tolist()}
    return data, {"label": [n], "score": [n], "logits": [n, width]}
