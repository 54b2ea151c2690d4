"""The generated chat conversations: well formed, short, deterministic, answers fixed by their questions,
a held-out split that shares no arithmetic or reversal question with training, and exact-match scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from gptlab import synthetic_chats as sc

N, HELD = 2200, 200


@pytest.fixture(scope="module")
def conversations():
    return sc.make_conversations(N, seed=0)


@pytest.fixture(scope="module")
def halves(conversations):
    return sc.split(conversations, HELD)


def turns(conversation):
    """(question, answer) pairs, in order."""
    messages = [m for m in conversation["messages"] if m["role"] != "system"]
    return [(q["content"], a["content"]) for q, a in zip(messages[::2], messages[1::2])]


def test_same_seed_same_conversations_other_seed_others():
    assert sc.make_conversations(300, seed=7) == sc.make_conversations(300, seed=7)
    assert sc.make_conversations(300, seed=7) != sc.make_conversations(300, seed=8)
    assert sc.make_conversations(0, seed=7) == []


def test_every_conversation_is_well_formed_short_and_ascii(conversations):
    for c in conversations:
        assert set(c) == {"messages"}
        messages = c["messages"]
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, c  # alternating, ends with assistant
        for m in messages:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != ""
            assert m["content"].isascii()
        assert sc.chars(c) <= sc.MAX_CHARS
        assert len(sc.answers_of(c)) <= 3


def test_kinds_and_system_messages_come_in_their_shares(conversations):
    kinds = Counter(sc.kind_of(c) for c in conversations)
    for kind, share in zip(sc.KINDS, sc.KIND_SHARES):
        assert abs(kinds[kind] / N - share / 12) < 0.04, kinds
    systems = sum(c["messages"][0]["role"] == "system" for c in conversations) / N
    assert 0.2 <= systems <= 0.3
    sizes = [sc.chars(c) for c in conversations]
    assert 30 <= sum(sizes) / N <= 80


def test_answers_are_fixed_by_their_questions(conversations):
    first = {}
    for c in conversations:
        question, answer = turns(c)[0]
        assert first.setdefault(question, answer) == answer, question
        kind = sc.kind_of(c).removesuffix("-followup")
        if kind == "arithmetic":
            a, op, b = question.rstrip("?.= ").split()[-3:]
            assert int(answer) == sc._apply(int(a), op, int(b))
        elif kind == "reversal":
            word = question.split()[-1] if ":" in question else question.split()[1]
            assert word in sc.WORDS and answer == word[::-1]
        for (_, previous), (q, a) in zip(turns(c), turns(c)[1:]):
            if kind == "arithmetic":
                step = int(re.search(r"\d+", q)[0])
                assert int(a) - int(previous) in (step, -step) and int(a) >= 0
            elif kind == "reversal":
                assert a == previous[::-1]


def test_the_world_and_the_words_are_fixed_tables():
    towns = Counter(town for town, _ in sc.PEOPLE.values())
    assert set(towns) == set(sc.TOWNS) and set(towns.values()) == {2}
    assert sc.fact_answer("Borin", "home") == "Borin lives in Talmar."
    assert sc.fact_answer("Talmar", "residents") == "Borin and Mira live in Talmar."
    assert sc.fact_answer("Quillfish", "colour") == "The Quillfish is blue."
    assert len(sc.WORDS) >= 300 and len(set(sc.WORDS)) == len(sc.WORDS)
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 7 and w != w[::-1] for w in sc.WORDS)


def test_keys_name_operand_pairs_in_either_order_and_words():
    def chat(*pairs):
        return {
            "messages": [
                m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
            ]
        }

    assert sc.keys_of(chat(("What is 7 + 12?", "19"), ("And plus 3 more?", "22"))) == {"7+12", "3+19"}
    assert sc.keys_of(chat(("12 + 7 = ?", "19"))) == {"7+12"}
    assert sc.keys_of(chat(("Compute 12 - 7.", "5"), ("Now take away 2.", "3"))) == {"12-7", "5-2"}
    assert sc.keys_of(chat(("Spell stone backwards.", "enots"), ("Now reverse it back.", "stone"))) == {"word:stone"}
    assert sc.keys_of(chat(("Where does Borin live?", "Borin lives in Talmar."))) == set()
    assert (
        sc.kind_of(chat(("Spell stone backwards.", "enots"), ("Now reverse it back.", "stone"))) == "reversal-followup"
    )


def test_held_out_shares_no_operand_pair_or_word_with_training(conversations, halves):
    train, held = halves
    assert len(train) == N - HELD and len(held) == HELD
    assert sorted(map(id, train + held)) == sorted(map(id, conversations))
    train_keys = set().union(*map(sc.keys_of, train))
    train_pairs = {pair for c in train for pair in turns(c)}
    for c in held:
        assert not sc.keys_of(c) & train_keys
        if not sc.kind_of(c).startswith("fact"):
            assert not set(turns(c)) & train_pairs, c
    held_kinds = Counter(sc.kind_of(c) for c in held)
    all_kinds = Counter(sc.kind_of(c) for c in conversations)
    for kind in sc.KINDS:
        assert held_kinds[kind] >= HELD * all_kinds[kind] // N, held_kinds


def test_split_keeps_order_and_refuses_what_it_cannot_hold_out(conversations):
    train, held = sc.split(conversations[:100], 10)
    assert [c for c in conversations[:100] if any(c is h for h in held)] == held
    assert sc.split(conversations[:100], 0) == (list(conversations[:100]), [])
    with pytest.raises(ValueError):
        sc.split(conversations[:100], 101)
    same = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}] * 3
    with pytest.raises(ValueError, match="share no operand pair"):
        sc.split(same, 1)


def test_prompts_are_the_true_history_before_each_answer(halves):
    for c in halves[1]:
        prompts, answers = sc.prompts_of(c), sc.answers_of(c)
        assert len(prompts) == len(answers) >= 1
        for prompt, answer in zip(prompts, answers):
            assert prompt[-1]["role"] == "user"
            assert c["messages"][: len(prompt) + 1] == [*prompt, {"role": "assistant", "content": answer}]


def test_score_counts_exact_answers_after_stripping_whitespace(halves):
    for c in halves[1]:
        answers = sc.answers_of(c)
        assert sc.score(c, answers) == (len(answers), len(answers))
        assert sc.score(c, [f"  {a}\n" for a in answers]) == (len(answers), len(answers))
        assert sc.score(c, [a + "!" for a in answers]) == (0, len(answers))
        assert sc.score(c, [""] * len(answers)) == (0, len(answers))
    c = next(c for c in halves[1] if len(sc.answers_of(c)) > 1)
    assert sc.score(c, [sc.answers_of(c)[0]] + ["?"] * (len(sc.answers_of(c)) - 1)) == (1, len(sc.answers_of(c)))
    assert sc.score(
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Yes."}]}, ["yes."]
    ) == (0, 1)
    with pytest.raises(ValueError):
        sc.score(c, [])


def test_json_lines_round_trip(tmp_path, conversations):
    path = tmp_path / "sub" / "chats.jsonl"
    sc.write_jsonl(path, conversations[:50])
    assert sc.read_jsonl(path) == conversations[:50]
    assert path.read_bytes().isascii() and path.read_text().count("\n") == 50
    assert list(path.parent.iterdir()) == [path]


def test_cli_writes_training_and_held_out_files(tmp_path, capsys):
    out, test = tmp_path / "chats.jsonl", tmp_path / "test.jsonl"
    argv = ["--n", "180", "--seed", "3", "--out", str(out), "--held-out", "20", "--held-out-out", str(test)]
    assert sc.main(argv) == 0
    train, held = sc.read_jsonl(out), sc.read_jsonl(test)
    assert (len(train), len(held)) == (180, 20)
    assert (train, held) == sc.split(sc.make_conversations(200, 3), 20)
    assert "180 conversations" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sc.main(["--n", "10", "--out", str(out), "--held-out", "5"])
