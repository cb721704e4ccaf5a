"""Request inputs as the engine takes them: every protocol's texts (``/v1`` predict and fan-out, ``/v2`` inference,
text-embeddings-inference's routes) checked against the request limits and turned into ``(text_a, text_b)`` rows
(:data:`service.forward.Rows`), in one place."""

from __future__ import annotations

from service.api.schemas import PredictIn, TextPairIn
from service.errors import InputInvalid


def request_rows(body: PredictIn, max_inputs: int, max_chars: int) -> tuple[tuple[str, str | None], ...]:
    """``(text_a, text_b or None)`` per input of ``body``: a text, a one-text list, a ``[text_a, text_b]`` pair or
    Hugging Face's ``{"text", "text_pair"}`` object; a lone text or object (not in a list) is one input.

    Raises:
        InputInvalid: no inputs, more than ``max_inputs``, a list of other than 1 or 2 texts, an empty or blank
            text, one over ``max_chars`` characters, or one holding an unpaired UTF-16 surrogate.
    """
    items = body.inputs if isinstance(body.inputs, list) else [body.inputs]
    if not items:
        raise InputInvalid("inputs is empty: send at least one text")
    if len(items) > max_inputs:
        raise InputInvalid(f"{len(items)} inputs, more than the limit of {max_inputs} per request")
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, TextPairIn):
            texts = [item.text] if item.text_pair is None else [item.text, item.text_pair]
        else:
            texts = [item] if isinstance(item, str) else item
        if len(texts) not in (1, 2):
            raise InputInvalid(f"inputs[{i}] has {len(texts)} texts; send a text or a [text_a, text_b] pair")
        for t in texts:
            if not t.strip():
                raise InputInvalid(f"inputs[{i}] holds an empty text")
            check_encodable(t, i)
            if len(t) > max_chars:
                raise InputInvalid(f"inputs[{i}] is {len(t)} characters, more than the limit of {max_chars}")
        rows.append((texts[0], texts[1] if len(texts) == 2 else None))
    return tuple(rows)


def check_encodable(text: str, i: int) -> None:
    """Raise :class:`InputInvalid` if ``text`` (``inputs[i]``) is not UTF-8 encodable: JSON may carry lone UTF-16
    surrogates (``"\\ud800"``), which no tokenizer takes (a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputInvalid(f"inputs[{i}] holds an unpaired UTF-16 surrogate {text[exc.start]!r} at character "
                           f"{exc.start}: it is not Unicode text") from None
