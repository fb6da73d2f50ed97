"""Preference data for DPO / EPA training, the pure-Python half: reading files (or the hub) and
normalizing their rows into preference examples.

    rows = load_rows("prefs.jsonl")                          # dicts from a local file or the hub
    examples, report = parse_rows(rows, source="prefs.jsonl") # one PreferenceExample per usable row

Rows come in three formats (``detect_format``): explicit (``prompt``, ``chosen``, ``rejected``),
implicit (``chosen`` and ``rejected`` full texts sharing the prompt, as in Anthropic HH-RLHF) and
scored (``prompt`` and scored ``completions``, as in UltraFeedback). Texts are plain strings or
chat message lists. Tokenizing and the batch order are in ``batching.py``, the batches in
``epa_ext.preference.candidates``.

Nothing is dropped silently: rows and examples that are dropped or changed are counted, with the
reason, in a ``DropReport``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from ..preference.candidates import DataError  # the core's: weak negatives raise it too
from . import hub

Messages = list[dict]
"""Chat messages: ``[{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]``."""
Part = str | Messages
"""A prompt or an answer: plain text, or chat messages."""

_LOCAL_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")
_TEXT_KEYS = ("response", "text", "completion", "content")
_SCORE_KEYS = ("score", "rating", "overall_score")
_HH_ASSISTANT = "Assistant:"
_ACCEPTED_COLUMNS = (
    "explicit {prompt, chosen, rejected}; implicit {chosen, rejected}; scored {prompt, completions} with "
    f"completions a list of objects holding a text key among {list(_TEXT_KEYS)} and a score key among "
    f"{list(_SCORE_KEYS)}, or scored {{prompt, completions, scores}} with parallel lists"
)


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt with its chosen answer and one or more rejected answers (strong negatives).

    The answers are of the prompt's kind: strings for a string prompt, lists of chat messages
    (the first one an assistant message) for a message-list prompt. row: the 1-based row of the
    data it was parsed from (``parse_rows``; None when made otherwise), for messages about it.
    """

    prompt: Part
    chosen: Part
    rejected: tuple[Part, ...]
    row: int | None = field(default=None, compare=False)


@dataclass
class DropReport:
    """Counts of examples dropped or changed and why; never drop silently.

    ``counts`` maps a reason to the number of examples it concerns. Reasons in ``KEPT_REASONS``
    count examples that were kept but changed (e.g. "truncated"); all other reasons count dropped
    examples. ``messages`` keeps the first ``max_messages`` warnings, each naming the row
    (1-based) or example and the field. ``num_examples`` is the number of rows read (set by
    ``parse_rows``); ``summary`` reports drops out of it.
    """

    KEPT_REASONS: ClassVar[frozenset[str]] = frozenset({"truncated", "tied best completions left out"})

    counts: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    num_examples: int = 0
    max_messages: int = 20

    def add(self, reason: str, message: str | None = None) -> None:
        """Counts one example under reason and keeps message while fewer than max_messages are kept."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if message is not None and len(self.messages) < self.max_messages:
            self.messages.append(message)

    def total(self) -> int:
        """Number of examples dropped (kept-but-changed ones are not counted)."""
        return sum(n for reason, n in self.counts.items() if reason not in self.KEPT_REASONS)

    def summary(self) -> str:
        """One line, e.g. "dropped 3 of 40 examples: 2 answer truncated to nothing, 1 bad row (empty
        answer); kept with changes: 5 truncated"."""
        dropped = ", ".join(f"{n} {r}" for r, n in self.counts.items() if r not in self.KEPT_REASONS)
        changed = ", ".join(f"{n} {r}" for r, n in self.counts.items() if r in self.KEPT_REASONS)
        out_of = f" of {self.num_examples}" if self.num_examples else ""
        line = f"dropped {self.total()}{out_of} examples" + (f": {dropped}" if dropped else "")
        return line + (f"; kept with changes: {changed}" if changed else "")


# --- loading -------------------------------------------------------------------------------------


def load_rows(source: str) -> list[dict]:
    """Rows of a local file, or of the train split of a Hugging Face hub dataset.

    Local files: ``.jsonl``, ``.jsonl.gz`` (one JSON object per line; blank lines are skipped, so
    row numbers equal line numbers only in files without blank lines), ``.json`` (a list of
    objects, or an object with that list under "data" or "train") and ``.parquet``. A local
    directory of data files, or a name that is no existing path, is passed to
    ``datasets.load_dataset(source, split="train")`` (``datasets`` is imported only then).

    Raises:
        DataError: a malformed JSON line or a line that is no object (naming the file and the line
            number); text that is not UTF-8 (naming the line); a truncated or corrupt
            ``.jsonl.gz`` (naming the last good line); a file of another type; what
            ``check_source`` refuses; a hub dataset that cannot be loaded.
    """
    check_source(source)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = _suffix(path)
        if suffix == ".json":
            return _read_json(path, source)
        if suffix == ".parquet":
            return _read_parquet(path, source)
        return _read_jsonl(path, source, compressed=suffix == ".jsonl.gz")
    import datasets  # lazily: only directories and hub datasets need it, and it is slow to import

    try:
        return datasets.load_dataset(source, split="train").to_list()
    except Exception as error:  # noqa: BLE001 (whatever the library raises, the user gets one line)
        raise DataError(f"{source}: datasets.load_dataset cannot load it ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None


def check_source(source: str, flag: str = "--dataset") -> None:
    """The data source without reading it: a file of a known type, a directory holding files, or
    a hub id that can be had. Raises DataError saying what is wrong and what to give instead;
    flag names the option in the message."""
    path = Path(source).expanduser()
    if path.is_file():
        if _suffix(path) is None:
            raise DataError(f"{flag} {source}: unsupported file type; expected one of {', '.join(_LOCAL_SUFFIXES)}")
    elif path.is_dir():
        if not any(not p.name.startswith(".") for p in path.iterdir()):
            raise DataError(f"{flag} {source}: an empty directory; give a data file ({', '.join(_LOCAL_SUFFIXES)}) "
                            f"or a directory holding them")
    elif _suffix(path) is not None or hub.looks_local(source):
        raise DataError(f"{flag} {source}: no such file")
    elif not hub.offline() and (problem := hub.unreachable()) is not None:
        raise DataError(f"{flag} {source}: a hub dataset id, but {problem}; give a local file, or set "
                        f"HF_HUB_OFFLINE=1 to use the datasets cache")


def _suffix(path: Path) -> str | None:
    return next((s for s in _LOCAL_SUFFIXES if path.name.lower().endswith(s)), None)


def _read_jsonl(path: Path, source: str, *, compressed: bool) -> list[dict]:
    rows: list[dict] = []
    line_number = 0  # the last line read whole, for the message of a truncated file
    try:
        # bytes, decoded line by line: a text stream decodes ahead of the line being read, so its
        # UnicodeDecodeError would not say which line holds the bad byte
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as lines:
            for line_number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{source}: line {line_number}: not UTF-8 text ({error.reason} at byte "
                                    f"{error.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{source}: line {line_number}: malformed JSON ({error.msg} at column "
                                    f"{error.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{source}: line {line_number}: expected a JSON object, got "
                                    f"{_type_name(row)}")
                rows.append(row)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{source}: truncated or corrupt gzip file ({error}); the last good line is "
                        f"{line_number}") from error
    return rows


def _read_json(path: Path, source: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{source}: line {error.lineno}: malformed JSON ({error.msg} at column "
                        f"{error.colno})") from None
    if isinstance(data, dict):
        data = next((data[key] for key in ("data", "train") if isinstance(data.get(key), list)), data)
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a list of objects, or an object with that list under \"data\" or "
                        f"\"train\"; got {_type_name(data)}")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {number}: expected a JSON object, got {_type_name(row)}")
    return data


def _read_parquet(path: Path, source: str) -> list[dict]:
    import pyarrow  # lazily: only parquet files need it
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise DataError(f"{source}: not a readable parquet file ({error})") from error


# --- parsing -------------------------------------------------------------------------------------


def detect_format(row: dict) -> str:
    """The format of one row, from its columns (null values count as absent):

    - ``"explicit"``: ``prompt``, ``chosen``, ``rejected``;
    - ``"scored"``: ``prompt`` and ``completions``, either a list of objects holding a text key
      (response, text, completion or content) and a score key (score, rating or overall_score),
      as in UltraFeedback, or a list of answers with a parallel list ``scores``;
    - ``"implicit"``: ``chosen`` and ``rejected`` without ``prompt``: full texts sharing the prompt
      as a common prefix, as in Anthropic HH-RLHF.

    Raises:
        DataError: no format matches; the message lists the row's columns and the accepted sets.
    """
    if not isinstance(row, dict):
        raise DataError(f"expected an object, got {_type_name(row)}")
    present = {key for key, value in row.items() if value is not None}
    if {"prompt", "chosen", "rejected"} <= present:
        return "explicit"
    if {"prompt", "completions"} <= present:
        completions = row["completions"]
        if "scores" in present or (isinstance(completions, list) and completions
                                   and isinstance(completions[0], dict)):
            return "scored"
    if {"chosen", "rejected"} <= present:  # with a prompt, the row was explicit
        return "implicit"
    raise DataError(f"columns {sorted(present)} match no format; accepted: {_ACCEPTED_COLUMNS}")


@dataclass
class _Issue:
    """What is wrong with, or was changed in, one row: the report reason, the field and the details."""

    reason: str
    field: str
    problem: str


class _BadRow(Exception):
    def __init__(self, reason: str, field: str, problem: str):
        super().__init__(problem)
        self.issue = _Issue(f"bad row ({reason})", field, problem)


def parse_rows(rows: list[dict], *, source: str = "data",
               skip_bad_rows: bool = False) -> tuple[list[PreferenceExample], DropReport]:
    """Normalizes every row into a PreferenceExample.

    The dataset's format is the one most rows have (``detect_format``), and every row is held to
    it, so that a row missing a column is reported as such instead of being read in another
    format.

    - explicit: ``rejected`` is one answer or a list of them (several strong negatives).
    - implicit: the prompt is the longest common prefix of chosen and the rejected texts, cut back
      to just after its last "Assistant:" if it has one (HH-RLHF), else to just after its last
      whitespace, so that the answers start at a word; message lists are cut back to the last
      shared message before which every conversation continues with an assistant message.
    - scored: the best-scored completion is chosen and the lower-scored ones are the strong
      negatives, best first. Completions tied with the best are left out (they are neither better
      nor worse) and counted in the report as "tied best completions left out".

    Bad rows: a row that is no object, lacks a field or (implicit format) has a prompt; a wrong
    type (e.g. a number where a text is expected, answers not of the prompt's kind, an answer
    message list not starting with an assistant message, a score that is no finite number); an
    empty answer; a rejected answer identical to the chosen one; implicit texts that share no
    prompt; scored completions that all have the same score (no preference) or fewer than two.

    Args:
        rows: as returned by ``load_rows``.
        source: the name the messages give the data (a file name).
        skip_bad_rows: drop bad rows and count them in the report (reason "bad row (...)", with a
            message naming the row and field) instead of raising.

    Returns:
        The examples, in row order, and the report (``num_examples`` = ``len(rows)``).

    Raises:
        DataError: at the first bad row unless skip_bad_rows, naming the source, the 1-based row
            number and the field, and saying that --skip-bad-rows goes on; or when no row matches
            any format.
    """
    report = DropReport(num_examples=len(rows))
    if not rows:
        return [], report
    formats = Counter(_detect_or_none(row) for row in rows)
    formats.pop(None, None)
    if not formats:
        raise DataError(f"{source}: no row matches a known format (row 1: {_describe_columns(rows[0])}); "
                        f"accepted: {_ACCEPTED_COLUMNS}")
    parser = _PARSERS[formats.most_common(1)[0][0]]
    examples: list[PreferenceExample] = []
    for number, row in enumerate(rows, start=1):
        try:
            example, changes = parser(row)
        except _BadRow as bad:
            message = f"{source}: row {number}, field {bad.issue.field!r}: {bad.issue.problem}"
            if not skip_bad_rows:
                raise DataError(f"{message}; --skip-bad-rows drops such rows (counted and reported) and goes "
                                f"on") from None
            report.add(bad.issue.reason, message)
            continue
        for change in changes:
            report.add(change.reason, f"{source}: row {number}, field {change.field!r}: {change.problem}")
        examples.append(replace(example, row=number))
    return examples, report


def _detect_or_none(row: Any) -> str | None:
    try:
        return detect_format(row)
    except DataError:
        return None


def _describe_columns(row: Any) -> str:
    return f"columns {sorted(row)}" if isinstance(row, dict) else f"a {_type_name(row)}, not an object"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(row: Any, name: str, fmt: str) -> Any:
    if not isinstance(row, dict):
        raise _BadRow("wrong type", "(row)", f"expected an object, got {_type_name(row)}")
    value = row.get(name)
    if value is None:
        raise _BadRow("missing field", name, f"missing or null (the data is in {fmt} format)")
    return value


def _part(value: Any, name: str, *, answer: bool) -> Part:
    """value checked to be a text or a list of chat messages; answers must be non-empty and a
    message-list answer must start with an assistant message (the prompt ends where it begins)."""
    if isinstance(value, str):
        if answer and not value.strip():
            raise _BadRow("empty answer", name, "empty answer")
        return value
    if not isinstance(value, list):
        raise _BadRow("wrong type", name, f"expected a string or a list of chat messages, got {_type_name(value)}")
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadRow("wrong type", f"{name}[{index}]",
                          f"a chat message must be an object with string 'role' and 'content'; got {message!r:.80}")
    if answer:
        if not any(message["content"].strip() for message in value):
            raise _BadRow("empty answer", name, "empty answer")
        if value[0]["role"] != "assistant":
            raise _BadRow("wrong type", f"{name}[0]",
                          f"an answer must start with an assistant message; got role {value[0]['role']!r}")
    return value


def _answer_items(value: Any, name: str) -> list[tuple[str, Any]]:
    """(field name, value) of each answer in a column holding one answer or a list of them. A list
    of objects is one message list; a list of anything else is several answers."""
    if isinstance(value, list) and value and not isinstance(value[0], dict):
        return [(f"{name}[{index}]", item) for index, item in enumerate(value)]
    return [(name, value)]


def _example(prompt: Part, chosen: tuple[str, Part], rejected: list[tuple[str, Part]]) -> PreferenceExample:
    """The example, once its answers are known to be of the prompt's kind and to differ from chosen."""
    for name, answer in [chosen, *rejected]:
        if isinstance(answer, str) != isinstance(prompt, str):
            kind = "a string" if isinstance(prompt, str) else "a list of chat messages"
            raise _BadRow("wrong type", name, f"must be {kind}, like the prompt")
    for name, answer in rejected:
        if answer == chosen[1]:
            raise _BadRow("chosen equals rejected", name, f"identical to the chosen answer ({chosen[0]})")
    return PreferenceExample(prompt, chosen[1], tuple(answer for _, answer in rejected))


def _parse_explicit(row: Any) -> tuple[PreferenceExample, list[_Issue]]:
    prompt = _part(_field(row, "prompt", "explicit"), "prompt", answer=False)
    chosen = _part(_field(row, "chosen", "explicit"), "chosen", answer=True)
    rejected = [(name, _part(value, name, answer=True))
                for name, value in _answer_items(_field(row, "rejected", "explicit"), "rejected")]
    return _example(prompt, ("chosen", chosen), rejected), []


def _parse_implicit(row: Any) -> tuple[PreferenceExample, list[_Issue]]:
    if isinstance(row, dict) and row.get("prompt") is not None:
        raise _BadRow("unexpected field", "prompt", "the data is in implicit format (chosen and rejected full "
                      "texts, no prompt)")
    chosen = _part(_field(row, "chosen", "implicit"), "chosen", answer=False)
    rejected = [(name, _part(value, name, answer=False))
                for name, value in _answer_items(_field(row, "rejected", "implicit"), "rejected")]
    texts = [chosen, *(value for _, value in rejected)]
    if not all(isinstance(text, type(chosen)) for text in texts):
        raise _BadRow("wrong type", "rejected", "chosen and rejected must both be strings or both message lists")
    cut = _shared_text_prompt(texts) if isinstance(chosen, str) else _shared_message_prompt(texts)
    if cut == 0:
        raise _BadRow("no shared prompt", "chosen", "chosen and rejected share no prompt prefix")
    answers = [(name, _part(value[cut:], name, answer=True)) for name, value in [("chosen", chosen), *rejected]]
    return _example(chosen[:cut], answers[0], answers[1:]), []


def _shared_text_prompt(texts: list[str]) -> int:
    """Length of the prompt the texts share (see parse_rows)."""
    prefix = os.path.commonprefix(texts)
    marker = prefix.rfind(_HH_ASSISTANT)
    if marker >= 0:
        return marker + len(_HH_ASSISTANT)
    return next((i + 1 for i in range(len(prefix) - 1, -1, -1) if prefix[i].isspace()), 0)


def _shared_message_prompt(conversations: list[Messages]) -> int:
    """Number of leading messages the conversations share, cut back until each continues with an
    assistant message."""
    first = conversations[0]
    cut = 0
    while all(cut < len(c) and c[cut] == first[cut] for c in conversations):
        cut += 1
    while cut > 0 and not all(cut < len(c) and c[cut]["role"] == "assistant" for c in conversations):
        cut -= 1
    return cut


def _parse_scored(row: Any) -> tuple[PreferenceExample, list[_Issue]]:
    prompt = _part(_field(row, "prompt", "scored"), "prompt", answer=False)
    completions = _field(row, "completions", "scored")
    if not isinstance(completions, list):
        raise _BadRow("wrong type", "completions", f"expected a list, got {_type_name(completions)}")
    if len(completions) < 2:
        raise _BadRow("no preference", "completions", f"{len(completions)} completion(s); at least 2 are needed")
    scores = row.get("scores")
    if scores is not None:  # parallel lists: completions[i] has scores[i]
        if not isinstance(scores, list) or len(scores) != len(completions):
            raise _BadRow("wrong type", "scores", f"expected a list of {len(completions)} scores, one per "
                          f"completion; got {_type_name(scores) if not isinstance(scores, list) else len(scores)}")
        items = [(f"completions[{i}]", text, f"scores[{i}]", score)
                 for i, (text, score) in enumerate(zip(completions, scores))]
    else:  # objects holding a text and a score
        items = []
        for i, completion in enumerate(completions):
            if not isinstance(completion, dict):
                raise _BadRow("wrong type", f"completions[{i}]",
                              f"expected an object (or a 'scores' column), got {_type_name(completion)}")
            text_key = next((key for key in _TEXT_KEYS if completion.get(key) is not None), None)
            score_key = next((key for key in _SCORE_KEYS if completion.get(key) is not None), None)
            if text_key is None or score_key is None:
                raise _BadRow("missing field", f"completions[{i}]", f"needs a text key among {list(_TEXT_KEYS)} "
                              f"and a score key among {list(_SCORE_KEYS)}; has {sorted(completion)}")
            items.append((f"completions[{i}].{text_key}", completion[text_key],
                          f"completions[{i}].{score_key}", completion[score_key]))
    answers: list[tuple[float, str, Part]] = []
    for text_name, text, score_name, score in items:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise _BadRow("wrong type", score_name, f"a score must be a finite number; got {score!r:.40}")
        answers.append((score, text_name, _part(text, text_name, answer=True)))
    answers.sort(key=lambda answer: -answer[0])  # stable: equal scores keep their order
    best = answers[0][0]
    if answers[-1][0] == best:
        raise _BadRow("no preference", "scores" if scores is not None else "completions",
                      f"all completions have the same score ({best})")
    tied = [name for score, name, _ in answers[1:] if score == best]
    changes = [_Issue("tied best completions left out", ", ".join(tied),
                      f"scored {best} like the chosen {answers[0][1]}; not used as negatives")] if tied else []
    rejected = [(name, text) for score, name, text in answers if score < best]
    return _example(prompt, answers[0][1:], rejected), changes


_PARSERS = {"explicit": _parse_explicit, "implicit": _parse_implicit, "scored": _parse_scored}
