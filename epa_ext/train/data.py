"""Preference data for DPO / EPA training: loading, normalizing, tokenizing and batching.

    rows = load_rows("prefs.jsonl")                          # dicts from a local file or the hub
    examples, report = parse_rows(rows, source="prefs.jsonl") # one PreferenceExample per usable row
    tokenized = tokenize(examples, tokenizer, max_length=512, max_prompt_length=256, report=report)
    weak = weak_negative_sources(len(tokenized), num_weak=2, seed=0)
    batch = collate(tokenized[:8], list(range(8)), num_strong=1, num_weak=2, weak_sources=weak,
                    all_examples=tokenized, pad_id=tokenizer.pad_token_id)

Rows come in three formats (``detect_format``): explicit (``prompt``, ``chosen``, ``rejected``),
implicit (``chosen`` and ``rejected`` full texts sharing the prompt, as in Anthropic HH-RLHF) and
scored (``prompt`` and scored ``completions``, as in UltraFeedback). Texts are plain strings or
chat message lists.

Batches are candidate-major, the layout of epa_ext's EPA losses: candidate 0 of a prompt is its
chosen answer, candidates 1..K its strong negatives (rejected answers to the same prompt) and
K+1..K+M its weak negatives (answers to other prompts, scored under this one).

Nothing is dropped silently: rows and examples that are dropped or changed are counted, with the
reason, in a ``DropReport``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..logps import IGNORE_INDEX

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
    (the first one an assistant message) for a message-list prompt.
    """

    prompt: Part
    chosen: Part
    rejected: tuple[Part, ...]


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


class DataError(ValueError):
    """Unusable data; the message names the source, the row (or line) number and the field."""


# --- loading -------------------------------------------------------------------------------------


def load_rows(source: str) -> list[dict]:
    """Rows of a local file, or of the train split of a Hugging Face hub dataset.

    Local files: ``.jsonl``, ``.jsonl.gz`` (one JSON object per line; blank lines are skipped, so
    row numbers equal line numbers only in files without blank lines), ``.json`` (a list of
    objects, or an object with that list under "data" or "train") and ``.parquet``. A local
    directory, or a name that is no existing path, is passed to
    ``datasets.load_dataset(source, split="train")`` (``datasets`` is imported only then).

    Raises:
        DataError: a malformed JSON line or a line that is no object (naming the file and the line
            number); a truncated or corrupt ``.jsonl.gz`` (naming the last good line); a file of
            another type; a missing file whose name looks local (a known suffix, a leading ".",
            "/" or "~", a backslash, or more than one "/": hub ids are "name" or "owner/name").
    """
    path = Path(source).expanduser()
    suffix = next((s for s in _LOCAL_SUFFIXES if path.name.lower().endswith(s)), None)
    if path.is_file():
        if suffix is None:
            raise DataError(f"{source}: unsupported file type; expected one of {', '.join(_LOCAL_SUFFIXES)}")
        if suffix == ".json":
            return _read_json(path, source)
        if suffix == ".parquet":
            return _read_parquet(path, source)
        return _read_jsonl(path, source, compressed=suffix == ".jsonl.gz")
    if not path.is_dir() and (suffix is not None or _looks_local(source)):
        raise DataError(f"{source}: no such file")
    import datasets  # lazily: only hub datasets need it, and it is slow to import

    return datasets.load_dataset(source, split="train").to_list()


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def _read_jsonl(path: Path, source: str, *, compressed: bool) -> list[dict]:
    rows: list[dict] = []
    line_number = 0  # the last line read whole, for the message of a truncated file
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if compressed else open(path, encoding="utf-8")) as lines:
            for line_number, line in enumerate(lines, start=1):
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
    except UnicodeDecodeError as error:
        raise DataError(f"{source}: line {line_number + 1}: not UTF-8 text ({error.reason})") from error
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
            number and the field; or when no row matches any format.
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
                raise DataError(message) from None
            report.add(bad.issue.reason, message)
            continue
        for change in changes:
            report.add(change.reason, f"{source}: row {number}, field {change.field!r}: {change.problem}")
        examples.append(example)
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


# --- rendering and tokenizing --------------------------------------------------------------------


def render(part: Part, tokenizer: Any, *, is_prompt: bool, prompt: Messages | None = None) -> str:
    """Text of a prompt or an answer.

    Plain strings pass through. Message lists are rendered with
    ``tokenizer.apply_chat_template`` when the tokenizer (which may be None) has a chat template,
    else as "role: content" lines joined by newlines. A prompt ends where the assistant's answer
    starts (template: ``add_generation_prompt=True``; plain: a final "assistant:" line start). An
    answer is the text the whole conversation (prompt + answer) renders to, minus the rendered
    prompt, so that prompt text + answer text is exactly the rendered conversation.

    Args:
        part: the prompt, or an answer of the kind of its prompt.
        tokenizer: a transformers tokenizer, or None for the plain rendering.
        is_prompt: whether part is the prompt.
        prompt: for an answer message list, the prompt messages it follows (some templates render
            an answer differently depending on the conversation before it); None renders the answer
            after an empty conversation.

    Raises:
        ValueError: the chat template does not render the prompt as a prefix of the conversation.
    """
    if isinstance(part, str):
        return part
    history = part if is_prompt else (prompt or [])
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        if is_prompt:
            return prompt_text
        full = tokenizer.apply_chat_template(history + part, tokenize=False)
    else:
        prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
        if is_prompt:
            return prompt_text
        full = "\n".join(f"{m['role']}: {m['content']}" for m in history + part)
    if not full.startswith(prompt_text):
        raise ValueError(f"the chat template does not render the prompt {prompt_text!r:.200} as the start of the "
                         f"conversation {full!r:.200}")
    return full[len(prompt_text):]


@dataclass
class TokenizedExample:
    """Token ids of one example: ``answer_ids[0]`` is the chosen answer, then the strong negatives.
    Each answer ends with the EOS id (when the tokenizer has one) unless truncation cut it."""

    prompt_ids: list[int]
    answer_ids: list[list[int]]


def tokenize(examples: list[PreferenceExample], tokenizer: Any, *, max_length: int, max_prompt_length: int,
             report: DropReport) -> list[TokenizedExample]:
    """Token ids of the examples, truncated to fit max_length.

    Prompt and answers are rendered (``render``) and tokenized separately with
    ``tokenizer(text, add_special_tokens=False)["input_ids"]``. The prompt gets the BOS id in front
    (``tokenizer.bos_token_id``, when not None and the rendered prompt does not start with it
    already, as chat templates often write it); each answer gets the EOS id at the end
    (``tokenizer.eos_token_id``, when not None and the answer does not end with it already).

    Truncation rule:

    1. The prompt keeps its LAST max_prompt_length tokens (the end of a prompt, next to the answer,
       matters most); the BOS stays in front and counts towards max_prompt_length.
    2. Each answer is then cut from the right so that prompt + answer <= max_length tokens (a cut
       answer loses its EOS).
    3. An example with an answer that ends up empty is dropped and counted in report as "answer
       truncated to nothing"; this happens when the prompt takes all of max_length (possible only
       with max_prompt_length == max_length), or for an answer that tokenizes to nothing with a
       tokenizer without EOS. Kept examples that were cut anywhere are counted as "truncated".

    Args:
        examples: from ``parse_rows``.
        tokenizer: a transformers tokenizer.
        max_length: most tokens of prompt + one answer, >= 1.
        max_prompt_length: most tokens of a prompt, in [1, max_length].
        report: where drops and truncations are counted (messages name the example's 0-based index
            in examples).

    Returns:
        The kept examples, in order.
    """
    if max_length < 1 or not 1 <= max_prompt_length <= max_length:
        raise ValueError(f"need 1 <= max_prompt_length <= max_length; got max_prompt_length={max_prompt_length}, "
                         f"max_length={max_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenized: list[TokenizedExample] = []
    for index, example in enumerate(examples):
        prompt_ids = _ids(tokenizer, render(example.prompt, tokenizer, is_prompt=True))
        if bos is not None and prompt_ids[:1] != [bos]:
            prompt_ids.insert(0, bos)
        truncated = len(prompt_ids) > max_prompt_length
        if truncated:
            head = prompt_ids[:1] if bos is not None else []
            prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)):]
        budget = max_length - len(prompt_ids)
        answers: list[list[int]] = []
        history = example.prompt if isinstance(example.prompt, list) else None
        for answer in (example.chosen, *example.rejected):
            ids = _ids(tokenizer, render(answer, tokenizer, is_prompt=False, prompt=history))
            if eos is not None and ids[-1:] != [eos]:
                ids.append(eos)
            if len(ids) > budget:
                ids, truncated = ids[:budget], True
            answers.append(ids)
        if not all(answers):
            report.add("answer truncated to nothing",
                       f"example {index}: an answer has no token left after a prompt of {len(prompt_ids)} tokens "
                       f"within max_length={max_length}")
            continue
        if truncated:
            report.add("truncated")
        tokenized.append(TokenizedExample(prompt_ids, answers))
    return tokenized


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- weak negatives and batches ------------------------------------------------------------------


def weak_negative_sources(num_examples: int, num_weak: int, seed: int) -> list[list[tuple[int, int]]]:
    """For each example i, num_weak pairs (j, k): answer k of example j != i (k = 0 its chosen
    answer, k = 1 its first rejected one; every example has those two), to be scored under the
    prompt of example i as a weak negative.

    Example i's pairs depend only on (seed, i, num_examples, num_weak), not on batch order, so
    reference log-probs computed for them can be cached. The j are distinct when num_weak <=
    num_examples - 1, and drawn with repetition otherwise.

    Returns:
        [num_examples][num_weak] pairs (j, k).

    Raises:
        DataError: num_examples == 1 and num_weak > 0 (no other example to borrow from).
        ValueError: num_examples or num_weak < 0.
    """
    if num_examples < 0 or num_weak < 0:
        raise ValueError(f"num_examples and num_weak must be >= 0; got {num_examples} and {num_weak}")
    if num_examples == 1 and num_weak > 0:
        raise DataError(f"weak negatives need at least 2 examples to borrow answers from; got 1 (num_weak={num_weak})")
    sources = []
    for i in range(num_examples):
        rng = random.Random(seed * 1_000_003 + i)
        others = num_examples - 1
        picks = rng.sample(range(others), num_weak) if num_weak <= others else rng.choices(range(others), k=num_weak)
        # Index among the other examples -> example index, skipping i itself.
        sources.append([(j + (j >= i), rng.randrange(2)) for j in picks])
    return sources


@dataclass
class Batch:
    """Candidate-major batch of B prompts with C = 1 + K + M candidates each.

    Row ``c * B + b`` holds candidate c of prompt b: c = 0 the chosen answer, 1..K the strong
    negatives, K+1..K+M the weak negatives, each as prompt + answer tokens, right-padded.
    """

    input_ids: torch.Tensor  # [C*B, T] int64, padded with pad_id
    attention_mask: torch.Tensor  # [C*B, T] int64: 1 on real tokens
    labels: torch.Tensor  # [C*B, T] int64: input_ids[r, t+1] where t+1 is an answer token, else -100
    candidate_mask: torch.Tensor  # [B, C] bool: False for padding candidates
    num_candidates: int  # C = 1 + K + M
    num_strong: int  # K
    example_ids: list[int]  # the B example indices


def collate(examples: list[TokenizedExample], example_ids: list[int], *, num_strong: int, num_weak: int,
            weak_sources: list[list[tuple[int, int]]] | None, all_examples: list[TokenizedExample], pad_id: int,
            max_length: int | None = None) -> Batch:
    """A candidate-major Batch of B = len(examples) prompts.

    Candidates of prompt b: [chosen, rejected_1..rejected_K, weak_1..weak_M]. A prompt with fewer
    than K strong negatives gets padding candidates (copies of its chosen answer, False in
    candidate_mask); one with more uses its first K (the best-scored ones for scored data). Weak
    candidate m of prompt b is prompt_ids(b) + answer_ids[k] of all_examples[j] for
    (j, k) = weak_sources[example_ids[b]][m].

    Labels follow epa_ext.completion_labels (the logits at t predict token t + 1):
    labels[r, t] = input_ids[r, t + 1] where t + 1 is an answer token, IGNORE_INDEX elsewhere (prompt,
    padding, last column).

    Args:
        examples: the B tokenized examples of the batch.
        example_ids: their indices in all_examples (the keys of weak_sources).
        num_strong: K >= 0.
        num_weak: M >= 0; needs weak_sources when > 0.
        weak_sources: from ``weak_negative_sources`` over all_examples.
        all_examples: the examples weak answers are borrowed from.
        pad_id: the id right-padding fills input_ids with.
        max_length: when given, weak answers are cut from the right so that prompt + answer <=
            max_length, as ``tokenize`` does for the example's own answers (a borrowed answer was
            cut against its own prompt only, so it may run past max_length under another one).

    Raises:
        ValueError: inconsistent arguments, a weak source borrowing from the example itself, or a
            prompt leaving no room for a weak answer within max_length.
    """
    batch_size = len(examples)
    if batch_size == 0 or len(example_ids) != batch_size:
        raise ValueError(f"need one example id per example and at least one example; got {batch_size} examples "
                         f"and {len(example_ids)} ids")
    if num_strong < 0 or num_weak < 0:
        raise ValueError(f"num_strong and num_weak must be >= 0; got {num_strong} and {num_weak}")
    if num_weak > 0 and weak_sources is None:
        raise ValueError("num_weak > 0 needs weak_sources")
    num_candidates = 1 + num_strong + num_weak
    candidate_mask = torch.ones(batch_size, num_candidates, dtype=torch.bool)
    # (prompt, answer) of row c * B + b
    rows: list[tuple[list[int], list[int]]] = [([], [])] * (num_candidates * batch_size)
    for b, (example, example_id) in enumerate(zip(examples, example_ids)):
        chosen, strong = example.answer_ids[0], example.answer_ids[1:1 + num_strong]
        candidate_mask[b, 1 + len(strong):1 + num_strong] = False
        answers = [chosen, *strong, *[chosen] * (num_strong - len(strong))]
        if num_weak > 0:
            sources = weak_sources[example_id]
            if len(sources) < num_weak:
                raise ValueError(f"weak_sources[{example_id}] has {len(sources)} pairs; num_weak={num_weak}")
            for j, k in sources[:num_weak]:
                if j == example_id:
                    raise ValueError(f"weak_sources[{example_id}] borrows from example {example_id} itself")
                answers.append(_fit(all_examples[j].answer_ids[k], example, example_id, max_length))
        for c, answer in enumerate(answers):
            rows[c * batch_size + b] = (example.prompt_ids, answer)

    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        sequence = torch.tensor(prompt + answer, dtype=torch.long)
        end = len(sequence)
        input_ids[r, :end] = sequence
        attention_mask[r, :end] = 1
        # Answer tokens sit at [len(prompt), end); the logits one position earlier predict them. An
        # answer with no prompt before it cannot have its first token predicted.
        start = max(len(prompt) - 1, 0)
        labels[r, start:end - 1] = sequence[start + 1:end]
    return Batch(input_ids, attention_mask, labels, candidate_mask, num_candidates, num_strong, list(example_ids))


def _fit(answer: list[int], example: TokenizedExample, example_id: int, max_length: int | None) -> list[int]:
    """A borrowed answer cut from the right to fit under example's prompt within max_length."""
    if max_length is None:
        return answer
    room = max_length - len(example.prompt_ids)
    if room < 1:
        raise ValueError(f"example {example_id}'s prompt has {len(example.prompt_ids)} tokens, leaving no room for "
                         f"an answer within max_length={max_length}")
    return answer[:room]
