"""The synthetic retrieval documents: seeded, well formed, and answerable from their own record only."""

import re

import pytest

from doublesparse.eval.data import synthetic

LINE = re.compile(r"line ([a-z]+-[a-z]+): REGISTER_CONTENT is <(\d{5})>")


def record_of(text: str) -> dict[str, str]:
    """Key -> value of the record lines that precede the first question or restatement."""
    head = text.split("\nQuestion:")[0].split("\nThe same lines again:")[0]
    return dict(LINE.findall(head))


def test_kv_questions_are_answered_by_the_record():
    segments = synthetic.kv_retrieval_document(7, num_lines=30, num_queries=5)
    text = "".join(piece for piece, _ in segments)
    record = record_of(text)
    assert len(record) == 30
    answers = [piece for piece, is_answer in segments if is_answer]
    prompts = [piece for piece, is_answer in segments if not is_answer][: len(answers)]
    keys = [re.search(r"line ([a-z]+-[a-z]+): REGISTER_CONTENT is <$", prompt).group(1) for prompt in prompts]
    assert len(set(keys)) == 5 and [record[key] for key in keys] == answers


def test_recall_restates_every_line_once_in_another_order():
    segments = synthetic.kv_recall_document(3, num_lines=12)
    text = "".join(piece for piece, _ in segments)
    record = record_of(text)
    restated = LINE.findall(text.split("\nThe same lines again:\n")[1])
    assert sorted(restated) == sorted(record.items())
    assert [key for key, _ in restated] != list(record)  # shuffled (this seed)
    assert [piece for piece, is_answer in segments if is_answer] == [value for _, value in restated]


def test_documents_are_functions_of_the_seed():
    for make in (
        lambda seed: synthetic.kv_retrieval_document(seed, 9, 2),
        lambda seed: synthetic.kv_recall_document(seed, 9),
        lambda seed: synthetic.passkey_document(seed, 20),
    ):
        assert make(5) == make(5) and make(5) != make(6)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_lines"):
        synthetic.kv_recall_document(0, num_lines=0)
    with pytest.raises(ValueError, match="num_queries"):
        synthetic.kv_retrieval_document(0, num_lines=3, num_queries=4)
    with pytest.raises(ValueError, match="depth"):
        synthetic.passkey_document(0, 10, depth=1.5)
