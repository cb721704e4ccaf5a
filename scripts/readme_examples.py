"""Run the README's examples against a live server on the shipped bundles, and print (or write) their answers.

    .venv/bin/python scripts/readme_examples.py            # run every example, print command, status, answer
    .venv/bin/python scripts/readme_examples.py --write    # also put the answers under the commands in README.md

The server is this project's own app (``service.api.main.create_app``: the default backbone, the server's default
settings, ``SUPERMASK_ADMIN_TOKEN=change-me``) on a loopback port, its store a temporary copy of
``examples/masks``. What counts as an example (README.md, inside fenced blocks):

* ``bash`` blocks: every ``curl`` command (``\\`` continuations joined), run by bash from the repository root with
  ``localhost:8000`` / ``127.0.0.1:8000`` pointed at the server. The answer shown is the ``#`` comment lines
  right under it whose text starts with ``{`` or ``[`` (optionally after a status, ``# 422 {...}``; no status
  shown means 200), continued on ``#   `` lines. A command without one may say its statuses in its own trailing
  comment (``# 201 new, 200 replaced``, ``# 204``); else it must answer 200. ``DELETE`` commands run last, so the
  other examples see every shipped task. A command that expects success from a ``/v1/tasks/<task>`` not shipped
  (one the reader trains first) is not run, and says so.
* ``python`` blocks that call ``127.0.0.1:8000``: run as a script; each ``print(...)`` line's output is the comment
  on that line or the comment line right under it, in order.

:func:`check` is what ``tests/api/test_readme_examples.py`` asserts (run by the normal pytest suite, so by CI):
every curl example answers with the status and the JSON shape (keys, list lengths, value types) shown, every
python example prints the lines shown with numbers masked.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ADMIN_TOKEN = "change-me"
WIDTH = 118  # README code lines are kept to this many characters
_CONTINUED = "#   "  # a shown answer's continuation lines start with this
_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):8000")
_STATUS_MARK = "\n__README_STATUS__"
_FENCE = re.compile(r"^```(\w*)\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


@dataclass
class Example:
    """One README example. ``lines`` are 0-based line indices into the README: ``command`` (first, last) and
    ``shown`` (first, last + 1: the answer's comment lines; empty range when none is shown)."""

    kind: str  # "curl" or "python"
    code: str
    command: tuple[int, int]
    shown: tuple[int, int]
    shown_text: list[str] = field(default_factory=list)  # curl: the JSON text; python: one entry per print
    statuses: set[int] = field(default_factory=lambda: {200})
    indents: list[str] = field(default_factory=list)  # python: where each shown output goes (see _python_block)


def _scan(text: str) -> tuple[int | None, str | None]:
    """Bash quoting of ``text``: ``(index of an unquoted comment's ``#`` or None, the quote left open or None)``.
    Single quotes take everything literally; in double quotes a backslash escapes the next character."""
    quote, escaped = None, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quote == "'":
            quote = None if ch == "'" else quote
        elif ch == "\\":
            escaped = True
        elif quote == '"':
            quote = None if ch == '"' else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return i, None
    return None, quote


def _comment_of(line: str) -> str | None:
    """The bash comment of ``line`` (text after an unquoted `` #``), or None."""
    at, _ = _scan(line)
    return None if at is None else line[at + 1:].strip()


def _shown_json(comments: list[str]) -> tuple[int | None, str] | None:
    """``(status, json_text)`` of comment lines that show an answer (``{``/``[``, maybe after a status), else None."""
    if not comments:
        return None
    m = re.match(r"^(?:(\d{3}) )?([\[{].*)$", _join(comments).strip(), re.DOTALL)
    if not m:
        return None
    return (int(m.group(1)) if m.group(1) else None), m.group(2)


def parse(text: str) -> list[Example]:
    """Every example of the README ``text`` (see the module docstring), in README order."""
    lines = text.split("\n")
    out: list[Example] = []
    i, lang = 0, None
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            if lang is None:
                lang, start = fence.group(1) or "text", i + 1
            else:
                if lang == "python" and _ADDRESS.search("\n".join(lines[start:i])):
                    out.append(_python_block(lines, start, i))
                lang = None
            i += 1
            continue
        if lang == "bash" and lines[i].lstrip().startswith("curl "):
            first = i
            while lines[i].rstrip().endswith("\\") or _scan("\n".join(lines[first:i + 1]))[1]:
                i += 1  # a continued line, or a quoted argument that goes on
            code = "\n".join(lines[first:i + 1])
            j = i + 1
            while j < len(lines) and lines[j].startswith("#"):
                j += 1
            ex = Example("curl", code, (first, i), (i + 1, i + 1))
            shown = _shown_json(lines[i + 1:j])
            if shown is not None:
                status, ex.shown_text = shown[0], [shown[1]]
                ex.shown, ex.statuses = (i + 1, j), {status or 200}
            else:
                inline = _comment_of(lines[i]) or ""
                codes = re.findall(r"(?:^|,\s*)(\d{3})\b", inline)
                if codes:
                    ex.statuses = {int(c) for c in codes}
            out.append(ex)
        i += 1
    return out


def _python_block(lines: list[str], start: int, end: int) -> Example:
    """A python example: each ``print(`` line's output is its own trailing comment, or the next line's comment."""
    shown, indents = [], []
    for k in range(start, end):
        if "print(" not in lines[k]:
            continue
        inline = _comment_of(lines[k])
        nxt = lines[k + 1] if k + 1 < end else ""
        if inline is not None:
            shown.append(inline)
            indents.append(f"inline:{k}")
        elif nxt.lstrip().startswith("# "):
            shown.append(nxt.lstrip()[2:])
            indents.append(f"next:{k + 1}")
    return Example("python", "\n".join(lines[start:end]), (start, end - 1), (start, end), shown, indents=indents)


@dataclass
class Answer:
    status: int | None
    body: str  # curl: the response body; python: stdout
    outputs: list[str] = field(default_factory=list)  # python: stdout lines
    skipped: str | None = None  # why the example was not run (a task the shipped bundles do not hold)


TRAINED_IN_README = frozenset({"similarity"})
"""Tasks the README's reader trains before calling them ("Train your own task"): their examples are not run. Any
other task name a README example expects success from must be shipped, or the check fails (a typo is caught)."""

_TASK_IN_URL = re.compile(r"/v1/tasks/([A-Za-z0-9][A-Za-z0-9._-]*)")


def needs_other_task(ex: Example, shipped: set[str]) -> str | None:
    """Why ``ex`` cannot run against the shipped bundles: it expects success from a ``/v1/tasks/<task>`` the
    README's reader makes first (``supermask train`` in "Train your own task"); None when it can run."""
    m = _TASK_IN_URL.search(ex.code)
    if ex.kind != "curl" or m is None or m.group(1) in shipped or "-X PUT" in ex.code:
        return None
    if m.group(1) in TRAINED_IN_README and all(200 <= s < 300 for s in ex.statuses):
        return f"task {m.group(1)!r} is made earlier in the README, not shipped in examples/masks"
    return None


def run(ex: Example, base_url: str, timeout_s: float = 120.0) -> Answer:
    """Run one example against the server at ``base_url`` (bash / the current python, from the repo root)."""
    host = base_url.removeprefix("http://")
    code = _ADDRESS.sub(host, ex.code)
    if ex.kind == "curl":
        code = code.replace("curl ", f"curl -w '{_STATUS_MARK}%{{http_code}}' ", 1)
        done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{code}"], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout_s)
        body, _, status = done.stdout.rpartition(_STATUS_MARK)
        return Answer(int(status) if status.strip().isdigit() else None, body)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        return Answer(None, done.stdout + done.stderr)
    return Answer(0, done.stdout, done.stdout.rstrip("\n").split("\n"))


def shape(value):
    """The JSON shape of ``value``: dict keys and list lengths kept, each leaf replaced by its type name."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def masked(text: str) -> str:
    """``text`` with every number replaced by ``N`` and no whitespace (numpy pads its columns)."""
    return re.sub(r"\s+", "", _NUMBER.sub("N", text))


def check(ex: Example, answer: Answer) -> list[str]:
    """What differs between the README and the server's answer (empty: the example is right, or was skipped)."""
    if answer.skipped:
        return []
    if ex.kind == "python":
        if answer.status is None:
            return [f"python example failed:\n{answer.body}"]
        if len(answer.outputs) != len(ex.shown_text):
            return [f"printed {len(answer.outputs)} lines, README shows {len(ex.shown_text)}: {answer.outputs}"]
        return [f"printed {got!r}, README shows {want!r}" for got, want in zip(answer.outputs, ex.shown_text)
                if masked(got) != masked(want)]
    problems = []
    if answer.status not in ex.statuses:
        problems.append(f"status {answer.status}, README shows {sorted(ex.statuses)}: {answer.body[:300]}")
    if ex.shown_text:
        try:
            want = json.loads(ex.shown_text[0])
        except ValueError as exc:
            return problems + [f"the README's answer is not JSON ({exc}): {ex.shown_text[0][:200]}"]
        try:
            got = json.loads(answer.body)
        except ValueError:
            return problems + [f"the answer is not JSON: {answer.body[:200]}"]
        if shape(got) != shape(want):
            problems.append(f"answer shape differs from the README's:\n  server: {answer.body[:400]}\n"
                            f"  README: {ex.shown_text[0][:400]}")
    return problems


def wrap_json(text: str, status: int | None, width: int = WIDTH) -> list[str]:
    """Comment lines showing compact JSON ``text`` (``# `` first, ``#   `` after), broken after a comma outside
    strings or before a space inside one, so that :func:`_join` of the lines gives ``text`` back."""
    pieces, cur, in_string, escaped = [], "", False, False
    for ch in text:
        if in_string and ch == " " and cur:
            pieces.append(cur)  # a break before a space inside a string: the next line starts with it
            cur = ""
        cur += ch
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == ",":
            pieces.append(cur)
            cur = ""
    if cur:
        pieces.append(cur)
    lines, line = [], "# " + (f"{status} " if status not in (None, 200) else "")
    for p in pieces:
        if len(line) + len(p) > width and line.strip("# "):
            lines.append(line)
            line = _CONTINUED
        line += p
    lines.append(line)
    return lines


def _join(comments: list[str]) -> str:
    """The text of comment lines without their ``# `` / ``#   `` prefixes (one space of a continued line that
    starts inside a string is kept: it is the string's)."""
    out = []
    for k, c in enumerate(comments):
        if k == 0:
            out.append(c[2:] if c.startswith("# ") else c[1:])
        else:
            out.append(c[len(_CONTINUED):] if c.startswith(_CONTINUED) else c[1:].lstrip())
    return "".join(out)


def rewritten(text: str, results: list[tuple[Example, Answer]]) -> str:
    """README ``text`` with each shown answer replaced by the server's (curl: JSON; python: printed lines)."""
    lines = text.split("\n")
    for ex, ans in sorted(results, key=lambda r: -r[0].shown[0]):  # bottom-up: indices stay valid
        if ans.skipped:
            continue
        if ex.kind == "curl" and ex.shown_text and ans.status is not None:
            compact = json.dumps(json.loads(ans.body), separators=(",", ":"), ensure_ascii=False)
            lines[ex.shown[0]:ex.shown[1]] = wrap_json(compact, ans.status)
        elif ex.kind == "python" and ans.status is not None and len(ans.outputs) == len(ex.indents):
            for where, out in zip(ex.indents, ans.outputs):
                kind, k = where.split(":")
                k = int(k)
                if kind == "inline":
                    head = lines[k][:len(lines[k]) - len(lines[k].lstrip())] + lines[k].strip()
                    code = head[:head.rfind("#")].rstrip()
                    lines[k] = f"{code}   # {out}"
                else:
                    indent = lines[k][:len(lines[k]) - len(lines[k].lstrip())]
                    lines[k] = f"{indent}# {out}"
    return "\n".join(lines)


def serve_and_run(readme: Path = README, settings_overrides: dict | None = None
                  ) -> list[tuple[Example, Answer]]:
    """Start the app on a loopback port (store: a copy of examples/masks), run every example, stop it."""
    from service.api.main import create_app
    from service.settings import DEFAULT_EXAMPLES_DIR, Settings
    from tests.live_server import live_server

    examples = parse(readme.read_text())
    with tempfile.TemporaryDirectory(prefix="readme-store-") as store:
        shutil.copytree(DEFAULT_EXAMPLES_DIR, Path(store), dirs_exist_ok=True)
        settings = Settings(store_dir=Path(store), examples_dir=None, admin_token=ADMIN_TOKEN,
                            **(settings_overrides or {}))
        shipped = {p.stem for p in DEFAULT_EXAMPLES_DIR.glob("*.smask")}
        with live_server(create_app(settings), timeout_s=120.0) as url:
            order = sorted(examples, key=lambda e: "-X DELETE" in e.code)  # deletes last (stable otherwise)
            return [(ex, Answer(None, "", skipped=why) if (why := needs_other_task(ex, shipped)) else run(ex, url))
                    for ex in order]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--write", action="store_true", help="put the answers under the commands in the README")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    results = serve_and_run(args.readme)
    failed = 0
    for ex, ans in sorted(results, key=lambda r: r[0].command[0]):
        problems = check(ex, ans)
        failed += bool(problems)
        print(f"--- README line {ex.command[0] + 1} ({ex.kind}): "
              + (f"not run: {ans.skipped}" if ans.skipped else f"status {ans.status}"))
        print(ex.code)
        print(ans.body.rstrip()[:2000])
        for p in problems:
            print(f"!! {p}")
    if args.write:
        args.readme.write_text(rewritten(args.readme.read_text(), results))
        print(f"wrote the answers into {args.readme}")
    print(f"{len(results)} examples, {failed} differing from the README")
    return 1 if failed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
