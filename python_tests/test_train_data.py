"""epa_ext/train/data.py (loading, parsing) and batching.py (rendering, truncation, weak
negatives, batches)."""

from __future__ import annotations

import gzip
import json
import sys
import types

import pytest
import torch
from conftest import HH_RLHF, NEEDS_HH_RLHF, TEST_DATA, tiny_tokenizer

from epa_ext import IGNORE_INDEX
from epa_ext.preference import candidates
from epa_ext.train import batching, data


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    return tiny_tokenizer(TEMPLATE)


def parse(rows, **kwargs):
    return data.parse_rows(rows, source="test", **kwargs)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- formats -------------------------------------------------------------------------------------


def test_explicit_fixture_parses_strings_and_rejected_lists():
    rows = data.load_rows(str(TEST_DATA / "prefs.jsonl"))
    examples, report = data.parse_rows(rows, source="prefs.jsonl")
    assert len(rows) == len(examples) == 40 and report.total() == 0
    assert report.summary() == "dropped 0 of 40 examples"
    assert examples[0] == data.PreferenceExample("How do I boil an egg?", rows[0]["chosen"], ("Eggs are food.",))
    assert examples[1].rejected == ("France has many cities.", "The capital of France is Lyon.")
    assert sum(len(e.rejected) == 2 for e in examples) == 12
    assert all(isinstance(a, str) for e in examples for a in (e.prompt, e.chosen, *e.rejected))


CHAT_ROW = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What do bees make?"}],
    "chosen": [{"role": "assistant", "content": "Honey and wax."}],
    "rejected": [[{"role": "assistant", "content": "Milk."}], [{"role": "assistant", "content": "Nothing."}]],
}


def test_explicit_chat_messages_without_chat_template(tokenizer):
    [example], _ = parse([CHAT_ROW])
    assert example.rejected == tuple(CHAT_ROW["rejected"])
    prompt = batching.render(example.prompt, tokenizer, is_prompt=True)
    assert prompt == "system: Be brief.\nuser: What do bees make?\nassistant:"
    answer = batching.render(example.chosen, tokenizer, is_prompt=False, prompt=example.prompt)
    assert answer == " Honey and wax."
    # Without the prompt (the tokenizer-training path) the answer text is the same here.
    assert batching.render(example.chosen, None, is_prompt=False) == answer
    # A single message list under "rejected" is one answer, not several.
    examples, _ = parse([{**CHAT_ROW, "rejected": CHAT_ROW["rejected"][0]}])
    assert examples[0].rejected == (CHAT_ROW["rejected"][0],)


def test_explicit_chat_messages_with_chat_template(chat_tokenizer):
    [example], _ = parse([CHAT_ROW])
    prompt = batching.render(example.prompt, chat_tokenizer, is_prompt=True)
    assert prompt == "<|system|>Be brief.</s><|user|>What do bees make?</s><|assistant|>"
    for answer in (example.chosen, *example.rejected):
        text = batching.render(answer, chat_tokenizer, is_prompt=False, prompt=example.prompt)
        whole = chat_tokenizer.apply_chat_template(example.prompt + answer, tokenize=False)
        assert prompt + text == whole
    assert batching.render(example.chosen, chat_tokenizer, is_prompt=False, prompt=example.prompt) == "Honey and wax.</s>"
    # The template already ends each answer with </s>: tokenize must not add a second EOS.
    [tokenized] = batching.tokenize([example], chat_tokenizer, max_length=64, max_prompt_length=32,
                                    report=data.DropReport())
    eos = chat_tokenizer.eos_token_id
    assert tokenized.answer_ids[0] == ids(chat_tokenizer, "Honey and wax.</s>") and tokenized.answer_ids[0][-2] != eos


def test_implicit_hh_rows():
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: Sure, here it is.",
             "rejected": "\n\nHuman: hi\n\nAssistant: Sure, no."}]
    examples, report = parse(rows)
    assert data.detect_format(rows[0]) == "implicit" and report.total() == 0
    assert examples[0] == data.PreferenceExample("\n\nHuman: hi\n\nAssistant:", " hello there", (" go away",))
    # The shared start of the answers stays in both answers: the prompt ends at the last "Assistant:".
    assert examples[1] == data.PreferenceExample("\n\nHuman: hi\n\nAssistant:", " Sure, here it is.", (" Sure, no.",))


def test_implicit_without_marker_cuts_at_a_word_and_accepts_several_rejected():
    row = {"chosen": "Q: name a cat. A: Tom", "rejected": ["Q: name a cat. A: Tree", "Q: name a cat. A: no"]}
    examples, _ = parse([row])
    assert examples[0] == data.PreferenceExample("Q: name a cat. A: ", "Tom", ("Tree", "no"))


def test_implicit_chat_messages():
    user = {"role": "user", "content": "hi"}
    row = {"chosen": [user, {"role": "assistant", "content": "hello"}],
           "rejected": [user, {"role": "assistant", "content": "go away"}]}
    [example], _ = parse([row])
    assert example == data.PreferenceExample([user], row["chosen"][1:], (row["rejected"][1:],))


@pytest.mark.parametrize("rejected, reason", [("\n\nHuman: hi\n\nAssistant: hello", "chosen equals rejected"),
                                               ("\n\nHuman: hi\n\nAssistant:", "empty answer")])
def test_implicit_identical_or_empty_is_a_bad_row(rejected, reason):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": rejected}]
    with pytest.raises(data.DataError, match=r"test: row 1, field 'rejected'"):
        parse(rows)
    examples, report = parse(rows, skip_bad_rows=True)
    assert examples == [] and report.counts == {f"bad row ({reason})": 1}


def test_scored_fixture_both_layouts():
    rows = data.load_rows(str(TEST_DATA / "scored.jsonl"))
    assert {data.detect_format(row) for row in rows} == {"scored"}
    examples, report = data.parse_rows(rows, source="scored.jsonl")
    assert len(examples) == 10 and report.total() == 0
    # objects with text and score keys (response / overall_score, text / score, ...)
    assert examples[0].chosen == "Mount Everest is the tallest mountain above sea level."
    assert examples[0].rejected == ("Mountains are tall.", "Mont Blanc is the tallest.")
    assert examples[1].chosen.startswith("Boil water") and examples[1].rejected == ("Put a tea bag in a cup.",
                                                                                     "Use cold water and wait.")
    assert examples[3].rejected == ("Saturn.", "Mercury has rings.", "Planets do not have rings.")
    # parallel completions / scores lists; negatives sorted by score, best first
    assert examples[7].chosen.startswith("Ice is made of frozen water molecules")
    assert examples[7].rejected == ("Ice is frozen water.", "Ice is cold air.", "Ice is glass.")


def test_scored_ties():
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "scores": [3, 3, 1]},
            {"prompt": "p", "completions": ["a", "b"], "scores": [2, 2]}]
    with pytest.raises(data.DataError, match=r"row 2, field 'scores': all completions have the same score"):
        parse(rows)
    examples, report = parse(rows, skip_bad_rows=True)
    # The completion tied with the best is neither chosen nor a negative; the row is kept.
    assert examples == [data.PreferenceExample("p", "a", ("c",))]
    assert report.counts == {"tied best completions left out": 1, "bad row (no preference)": 1}
    assert report.total() == 1
    assert report.summary() == ("dropped 1 of 2 examples: 1 bad row (no preference); "
                                "kept with changes: 1 tied best completions left out")


def test_detect_format_unknown_lists_accepted_columns():
    with pytest.raises(data.DataError, match=r"columns \['answer', 'question'\] match no format.*explicit"):
        data.detect_format({"question": "q", "answer": "a"})
    with pytest.raises(data.DataError, match=r"no row matches a known format"):
        parse([{"question": "q"}])


# --- bad rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, field, reason", [
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "wrong type"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r", 7]}, "rejected[1]", "wrong type"),
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing field"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "rejected", "missing field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "chosen", "empty answer"),
    ({"prompt": "p", "chosen": "c", "rejected": []}, "rejected", "empty answer"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r", "c"]}, "rejected[1]", "chosen equals rejected"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}, "chosen", "wrong type"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "c"}],
      "rejected": [{"role": "assistant", "content": "r"}]}, "chosen[0]", "wrong type"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "prompt[0]", "wrong type"),
    ("not an object", "(row)", "wrong type"),
])
def test_bad_rows_name_row_and_field(row, field, reason):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    rows = [good, good, row]
    with pytest.raises(data.DataError) as raised:
        parse(rows)
    assert f"test: row 3, field {field!r}" in str(raised.value)
    examples, report = parse(rows, skip_bad_rows=True)
    assert len(examples) == 2 and report.counts == {f"bad row ({reason})": 1} and report.total() == 1
    assert str(raised.value) == report.messages[0] + "; --skip-bad-rows drops such rows (counted and reported) and goes on"
    assert report.summary() == f"dropped 1 of 3 examples: 1 bad row ({reason})"


def test_scored_bad_fields():
    rows = [{"prompt": "p", "completions": [{"response": "a", "overall_score": "N/A"}, {"response": "b", "score": 1}]},
            {"prompt": "p", "completions": [{"response": "a"}, {"response": "b", "score": 1}]},
            {"prompt": "p", "completions": ["a", "b"], "scores": [1]}]
    with pytest.raises(data.DataError, match=r"row 1, field 'completions\[0\].overall_score': a score must be"):
        parse(rows)
    _, report = parse(rows, skip_bad_rows=True)
    assert report.counts == {"bad row (wrong type)": 2, "bad row (missing field)": 1}
    assert "row 2, field 'completions[0]'" in report.messages[1] and "row 3, field 'scores'" in report.messages[2]


def test_minority_format_rows_are_bad_rows_not_another_format():
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3 + [{"chosen": "p c", "rejected": "p r"}]
    with pytest.raises(data.DataError, match=r"row 4, field 'prompt': missing or null \(the data is in explicit"):
        parse(rows)


# --- loading -------------------------------------------------------------------------------------

ROWS = [{"prompt": "p1", "chosen": "c1", "rejected": ["r1", "s1"]}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"}]


def write_jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_load_rows_local_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_bytes(write_jsonl(ROWS) + b"\n")  # a trailing blank line is fine
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(write_jsonl(ROWS)))
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "data.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "train.json").write_text(json.dumps({"version": 1, "train": ROWS}))
    pq.write_table(pa.Table.from_pylist([{**row, "rejected": [row["rejected"]] if isinstance(row["rejected"], str)
                                          else row["rejected"]} for row in ROWS]), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.jsonl.gz", "list.json", "data.json", "train.json"):
        assert data.load_rows(str(tmp_path / name)) == ROWS, name
    parquet = data.load_rows(str(tmp_path / "a.parquet"))
    assert parquet[1] == {"prompt": "p2", "chosen": "c2", "rejected": ["r2"]}
    assert parse(parquet)[0][0].rejected == ("r1", "s1")


def test_load_rows_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(write_jsonl(ROWS) + b'{"prompt": "p3", "chosen": \n' + write_jsonl(ROWS))
    with pytest.raises(data.DataError, match=r"bad.jsonl: line 3: malformed JSON"):
        data.load_rows(str(path))
    path.write_bytes(write_jsonl(ROWS) + b"[1, 2]\n")
    with pytest.raises(data.DataError, match=r"line 3: expected a JSON object, got list"):
        data.load_rows(str(path))


def test_load_rows_truncated_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(write_jsonl(ROWS * 500))
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(data.DataError, match=r"cut.jsonl.gz: truncated or corrupt gzip file .*last good line is \d+"):
        data.load_rows(str(path))


def test_load_rows_missing_and_unsupported(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "nope.parquet", "./nope", "data/dir/nope"):
        with pytest.raises(data.DataError, match="no such file"):
            data.load_rows(missing)
    (tmp_path / "a.csv").write_text("a,b\n")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.load_rows(str(tmp_path / "a.csv"))


def test_load_rows_hub_id_uses_datasets(monkeypatch):
    calls = []

    class FakeDataset:
        def to_list(self):
            return ROWS

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(data.hub, "unreachable", lambda: None)  # as if online
    assert data.load_rows("someone/prefs") == ROWS
    assert calls == [("someone/prefs", "train")]


# --- tokenizing ----------------------------------------------------------------------------------


def test_tokenize_adds_bos_and_eos(tokenizer):
    example = data.PreferenceExample("How do I boil an egg?", " Boil it.", (" No.",))
    [t] = batching.tokenize([example], tokenizer, max_length=64, max_prompt_length=32, report=data.DropReport())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert t.prompt_ids == [bos] + ids(tokenizer, example.prompt)
    assert t.answer_ids == [ids(tokenizer, " Boil it.") + [eos], ids(tokenizer, " No.") + [eos]]


def test_truncation_rule(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = "What should I pack for a day hike? Bring water, snacks, a map and sunscreen."
    long_answer = " Place the egg in boiling water for about nine minutes, then cool it in cold water."
    prompt_ids, long_ids = ids(tokenizer, prompt), ids(tokenizer, long_answer)
    examples = [data.PreferenceExample(prompt, long_answer, (" No.",)),
                data.PreferenceExample("Hi", " Go.", (" No.",))]  # 3 + 5 tokens each
    report = data.DropReport()
    max_prompt, max_length = 6, 12
    assert len(prompt_ids) > max_prompt and len(long_ids) > max_length
    t = batching.tokenize(examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt, report=report)
    # The prompt keeps its end (with the BOS in front); the long answer is cut from the right and
    # loses its EOS; the short one fits whole.
    assert t[0].prompt_ids == [bos] + prompt_ids[-(max_prompt - 1):]
    assert t[0].answer_ids == [long_ids[:max_length - max_prompt], ids(tokenizer, " No.") + [eos]]
    assert t[1].prompt_ids == [bos] + ids(tokenizer, "Hi")
    assert report.counts == {"truncated": 1} and report.total() == 0

    # A prompt that takes all of max_length leaves the answers nothing: the example is dropped and
    # reported by its row in the data, as bad rows are (here row 3: row 1 is a bad row, skipped).
    rows = [{"prompt": "p", "chosen": "", "rejected": "r"}] + [
        {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected[0]} for e in examples]
    parsed, report = data.parse_rows(rows, source="prefs.jsonl", skip_bad_rows=True)
    assert [e.row for e in parsed] == [2, 3]
    t = batching.tokenize(parsed[::-1], tokenizer, max_length=8, max_prompt_length=8, report=report,
                          source="prefs.jsonl")
    assert len(t) == 1 and t[0].prompt_ids == [bos] + ids(tokenizer, "Hi")
    assert report.counts["answer truncated to nothing"] == 1 and report.total() == 2
    assert report.messages[-1].startswith("prefs.jsonl: row 2: an answer has no token left")

    with pytest.raises(ValueError, match="max_prompt_length <= max_length"):
        batching.tokenize(examples, tokenizer, max_length=4, max_prompt_length=5, report=data.DropReport())


# --- weak negatives ------------------------------------------------------------------------------


def test_weak_negative_sources():
    sources = candidates.weak_negative_sources(50, 3, seed=7)
    assert sources == candidates.weak_negative_sources(50, 3, seed=7)
    assert sources != candidates.weak_negative_sources(50, 3, seed=8)
    for i, pairs in enumerate(sources):
        assert len(pairs) == 3 and len({j for j, _ in pairs}) == 3
        assert all(j != i and 0 <= j < 50 and k in (0, 1) for j, k in pairs)
    assert {k for pairs in sources for _, k in pairs} == {0, 1}
    # More weak negatives than other examples: repeats, still never the example itself.
    assert all(pairs == [(1 - i, k) for _, k in pairs] for i, pairs in enumerate(candidates.weak_negative_sources(2, 3, 0)))
    assert candidates.weak_negative_sources(1, 0, 0) == [[]]
    with pytest.raises(data.DataError, match="at least 2 examples"):
        candidates.weak_negative_sources(1, 1, 0)


# --- batches -------------------------------------------------------------------------------------


def test_collate_layout_labels_and_mask():
    examples = [candidates.TokenizedExample([1, 10], [[20, 21, 2], [30, 2], [31, 32, 2]]),
                candidates.TokenizedExample([1, 11, 12], [[40, 2], [50, 51, 52, 2]]),
                candidates.TokenizedExample([1], [[60, 2], [70, 2]])]
    weak = [[(1, 1)], [(2, 0)], [(0, 0)]]
    batch = candidates.collate(examples[:2], [0, 1], num_strong=2, num_weak=1, weak_sources=weak,
                             all_examples=examples, pad_id=0)
    C = 4
    assert batch.num_candidates == C and batch.num_strong == 2 and batch.example_ids == [0, 1]
    assert batch.candidate_mask.tolist() == [[True, True, True, True], [True, True, False, True]]
    # Row c * B + b: candidate c of prompt b (candidate-major); right-padded with pad_id 0.
    expected = [[1, 10, 20, 21, 2, 0, 0],           # c0 b0 chosen
                [1, 11, 12, 40, 2, 0, 0],           # c0 b1 chosen
                [1, 10, 30, 2, 0, 0, 0],            # c1 b0 rejected 1
                [1, 11, 12, 50, 51, 52, 2],         # c1 b1 rejected 1
                [1, 10, 31, 32, 2, 0, 0],           # c2 b0 rejected 2
                [1, 11, 12, 40, 2, 0, 0],           # c2 b1 padding candidate: a copy of the chosen answer
                [1, 10, 50, 51, 52, 2, 0],          # c3 b0 weak: answer 1 of example 1
                [1, 11, 12, 60, 2, 0, 0]]           # c3 b1 weak: answer 0 of example 2
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.int64
    assert batch.input_ids.tolist() == expected
    assert batch.attention_mask.tolist() == [[int(t != 0) for t in row] for row in expected]
    prompt_lengths = [2, 3] * C
    for r, row in enumerate(expected):
        length = sum(t != 0 for t in row)
        for t in range(len(row)):
            answer_next = prompt_lengths[r] <= t + 1 < length
            assert batch.labels[r, t].item() == (row[t + 1] if answer_next else IGNORE_INDEX), (r, t)
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 20, 21, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_collate_keeps_first_strong_negatives_and_fits_weak_answers():
    examples = [candidates.TokenizedExample([1, 10], [[20, 2], [30, 2], [31, 2]]),
                candidates.TokenizedExample([1, 11, 12, 13], [[40, 41, 42, 2], [50, 2]])]
    batch = candidates.collate(examples, [0, 1], num_strong=1, num_weak=1, weak_sources=[[(1, 0)], [(0, 0)]],
                             all_examples=examples, pad_id=0, max_length=5)
    assert batch.input_ids[:, :5].tolist() == [[1, 10, 20, 2, 0], [1, 11, 12, 13, 40],
                                               [1, 10, 30, 2, 0], [1, 11, 12, 13, 50],
                                               [1, 10, 40, 41, 42], [1, 11, 12, 13, 20]]
    assert batch.candidate_mask.all()
    with pytest.raises(ValueError, match="borrows from example 0 itself"):
        candidates.collate(examples, [0, 1], num_strong=1, num_weak=1, weak_sources=[[(0, 0)], [(0, 0)]],
                         all_examples=examples, pad_id=0)


def test_pipeline_on_fixture(tokenizer):
    """File to batch, checked against the fixture's own texts: every row of the batch is prompt +
    answer token ids as the tokenizer gives them (BOS, EOS), right-padded, labels on the answer."""
    rows = data.load_rows(str(TEST_DATA / "prefs.jsonl"))
    examples, report = data.parse_rows(rows, source="prefs.jsonl")
    tokenized = batching.tokenize(examples, tokenizer, max_length=48, max_prompt_length=16, report=report)
    assert len(tokenized) == 40 and report.total() == 0
    weak = candidates.weak_negative_sources(len(tokenized), 2, seed=0)
    batch = candidates.collate(tokenized[:4], [0, 1, 2, 3], num_strong=2, num_weak=2, weak_sources=weak,
                             all_examples=tokenized, pad_id=tokenizer.pad_token_id, max_length=48)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def prompt_ids(row):  # a long prompt keeps its end, and its BOS
        return [bos] + ids(tokenizer, row["prompt"])[-15:]

    def answer_ids(row, k):  # cut to fit under the example's own prompt first
        text = row["chosen"] if k == 0 else ([row["rejected"]] if isinstance(row["rejected"], str) else row["rejected"])[k - 1]
        return (ids(tokenizer, text) + [eos])[:48 - len(prompt_ids(row))]

    B = 4
    for b in range(B):
        prompt, num_rejected = prompt_ids(rows[b]), len(examples[b].rejected)
        strong = [answer_ids(rows[b], k) for k in range(1 + num_rejected)]
        strong += [strong[0]] * (3 - len(strong))  # a missing second negative: a masked copy of chosen
        borrowed = [answer_ids(rows[j], k) for j, k in weak[b]]
        for c, answer in enumerate(strong + borrowed):
            answer = answer[:48 - len(prompt)]
            row = batch.input_ids[c * B + b].tolist()
            assert row[:len(prompt) + len(answer)] == prompt + answer, (b, c)
            assert set(row[len(prompt) + len(answer):]) <= {pad}
            labels = batch.labels[c * B + b].tolist()
            assert labels[len(prompt) - 1:len(prompt) + len(answer) - 1] == answer, (b, c)
            assert set(labels[:len(prompt) - 1] + labels[len(prompt) + len(answer) - 1:]) <= {IGNORE_INDEX}
        assert batch.candidate_mask[b].tolist() == [True, True, num_rejected == 2, True, True]
    assert batch.input_ids.shape[1] == max(int(m.sum()) for m in batch.attention_mask)


def test_non_utf8_byte_is_reported_on_its_line(tmp_path):
    lines = (TEST_DATA / "prefs.jsonl").read_bytes().splitlines(keepends=True)
    lines[20] = lines[20].replace(b"a", b"\xff", 1)
    for name, payload in (("bad.jsonl", b"".join(lines)), ("bad.jsonl.gz", gzip.compress(b"".join(lines)))):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(data.DataError, match=rf"{name}: line 21: not UTF-8 text"):
            data.load_rows(str(tmp_path / name))


def test_sources_that_cannot_be_read_say_so_before_reading(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"--dataset .*empty: an empty directory; give a data file"):
        data.check_source(str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="--eval-dataset .*nope.jsonl: no such file"):
        data.check_source(str(tmp_path / "nope.jsonl"), "--eval-dataset")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data.hub, "unreachable", lambda: "https://huggingface.co cannot be reached: no network")
    with pytest.raises(data.DataError, match="someone/prefs: a hub dataset id, but https://huggingface.co cannot be"):
        data.check_source("someone/prefs")


@NEEDS_HH_RLHF
def test_real_hh_rlhf_rows_parse_in_implicit_format():
    rows = data.load_rows(str(HH_RLHF))
    with pytest.raises(data.DataError, match=r"row 87, field 'chosen': empty answer; --skip-bad-rows drops"):
        data.parse_rows(rows, source=HH_RLHF.name)
    examples, report = data.parse_rows(rows, source=HH_RLHF.name, skip_bad_rows=True)
    assert len(rows) > 1000 and len(examples) > 0.95 * len(rows), report.summary()
    assert report.total() == len(rows) - len(examples)
    assert all(isinstance(e.prompt, str) and e.prompt.endswith("Assistant:") for e in examples)
    assert all(e.chosen.strip() and e.rejected[0].strip() and e.chosen != e.rejected[0] for e in examples)
