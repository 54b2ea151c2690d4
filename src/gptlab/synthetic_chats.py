"""Generated chat conversations whose answers are exactly determined, to show that chat fine-tuning works.

Each conversation is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (the
OpenAI / Hugging Face chat format) and is one of six kinds, in roughly these shares:

- arithmetic (1/4): "What is 37 + 5?" -> "42" (+ and - on numbers up to 40, x on single digits);
- reversal (1/4): "Reverse the word: castle" -> "eltsac" (a fixed list of common words of 3-7 letters);
- fact (1/4): questions about a fixed made-up world (16 people, 8 towns, 8 creatures):
  "Where does Borin live?" -> "Borin lives in Talmar.";
- arithmetic-followup, reversal-followup, fact-followup (1/12 each): two or three questions where
  the later ones refer to the earlier answer: "What is 12 + 7?" -> "19", "And plus 3 more?" -> "22".

About a quarter of the conversations open with a short system message. Every conversation is ASCII and
at most MAX_CHARS characters of content in all, so a byte-level model with a context of 256 tokens
sees it whole, with a few marker tokens per message.

Design choices:
- Held-out questions must test generalisation for arithmetic and reversal: `split` only holds out a
  conversation whose words (for reversal) and operand pairs (for arithmetic, + and x counted in either
  order) appear in no other conversation of the list, so training never sees them. To make enough
  such conversations, `make_conversations` reserves one word and one operand pair in four (a seeded
  hash) and builds about 15% of the arithmetic and reversal conversations from reserved items, each
  item used once; the others never use a reserved item.
- The world's facts are the knowledge being learned, so held-out fact questions ask facts that the
  training conversations also ask, in the same phrasings: they measure what was learned, not
  generalisation.
- The items a conversation uses are read back from its text (`keys_of`), so `split` works on any list
  of these conversations, e.g. one read back from JSON Lines.
- Standard library only: it runs without the training dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MAX_CHARS = 160  # content characters of a whole conversation
KINDS = ("arithmetic", "reversal", "fact", "arithmetic-followup", "reversal-followup", "fact-followup")
KIND_SHARES = (3, 3, 3, 1, 1, 1)  # twelfths: a quarter each for single questions and for follow-ups
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer briefly.",
    "Be concise.",
    "Reply with the answer only.",
)
SYSTEM_SHARE = 0.25
HELD_SHARE = 0.15  # of arithmetic and reversal conversations, built from reserved items
RESERVED_ONE_IN = 4  # one word and one operand pair in four are reserved
TRIES = 300  # attempts at a conversation of the wanted side before settling for an ordinary one

# Common English words of 3-7 letters, no palindromes (reversing one would change nothing).
WORDS = tuple(
    """
    cat dog horse mouse tiger lion bear wolf fox rabbit sheep goat cow pig duck goose eagle hawk crow
    robin snake frog fish whale shark seal otter zebra monkey camel donkey turtle spider beetle ant
    bee moth bread apple orange lemon grape cherry peach melon carrot potato onion garlic pepper cheese
    butter honey sugar rice bean pasta soup salad cookie cake pie candy coffee milk water juice tea
    river ocean lake stream forest tree flower grass leaf stone rock sand hill valley desert island
    cloud rain snow storm wind thunder sun moon star planet earth fire ice table chair window door
    floor wall roof garden kitchen bottle plate spoon fork knife bowl cup pillow blanket candle lamp
    mirror clock basket bucket ladder hammer nail brush castle tower bridge market school church
    street road village city harbor palace prison temple king queen prince doctor farmer sailor
    soldier teacher driver writer painter singer dancer pilot shirt jacket coat hat boot shoe sock
    glove scarf dress book paper pencil letter ticket wallet coin money key lock box bag map rope
    chain wheel engine rocket train plane ship truck wagon happy angry quiet loud bright dark light
    heavy little large small yellow purple golden simple gentle brave clever honest proud lucky funny
    silly jump run walk swim climb dance sing laugh smile dream sleep write read paint build carry
    throw catch listen travel wonder morning evening night winter summer spring autumn today monday
    friday music guitar piano drum story poem song game puzzle picture camera phone button pocket
    corner circle square number secret answer reason family friend mother father sister brother
    child baby uncle cousin winner player captain artist flour salt pumpkin
    banana mango lettuce tomato cabbage walnut almond carpet curtain shelf drawer closet sofa bench
    fence gate path tunnel canyon meadow jungle swamp glacier beach shore wave tide pebble crystal
    diamond pearl silk cotton wool leather metal iron copper tin ink chalk glue tape string
    thread needle whistle trumpet violin flute banjo cradle rattle marble kite sled
    skate racket helmet shield sword arrow bow saddle anchor sail oar compass lantern torch
    """.split()
)

# The made-up world: the same facts on every run.
TOWNS = {  # town -> what it is known for
    "Talmar": "glass",
    "Ostry": "salt",
    "Velden": "bells",
    "Quorra": "silk",
    "Brisk": "cheese",
    "Sunmere": "kites",
    "Hollin": "clocks",
    "Marrow": "boats",
}
PEOPLE = {  # person -> (town, job); two people per town, so "who else lives there" has one answer
    "Borin": ("Talmar", "baker"),
    "Mira": ("Talmar", "weaver"),
    "Tavi": ("Ostry", "smith"),
    "Oska": ("Ostry", "fisher"),
    "Lune": ("Velden", "potter"),
    "Pell": ("Velden", "farmer"),
    "Dara": ("Quorra", "healer"),
    "Fenn": ("Quorra", "miller"),
    "Joren": ("Brisk", "scribe"),
    "Kael": ("Brisk", "tailor"),
    "Nessa": ("Sunmere", "hunter"),
    "Rook": ("Sunmere", "brewer"),
    "Sela": ("Hollin", "mason"),
    "Wren": ("Hollin", "sailor"),
    "Ivo": ("Marrow", "singer"),
    "Yara": ("Marrow", "carver"),
}
CREATURES = {  # creature -> (colour, food, habitat)
    "Quillfish": ("blue", "moss", "rivers"),
    "Mossback": ("green", "clover", "forests"),
    "Glimmerbat": ("silver", "moths", "caves"),
    "Thornhound": ("red", "berries", "hills"),
    "Driftowl": ("grey", "mice", "cliffs"),
    "Emberhare": ("orange", "roots", "deserts"),
    "Snowmoth": ("white", "nectar", "mountains"),
    "Reedcat": ("brown", "frogs", "marshes"),
}

# Fact topics: the phrasings of a first question ({s} is the subject) and of a follow-up that refers
# to the subject of the previous answer.
FACT_FIRST = {
    "home": ("Where does {s} live?", "Where is {s}'s home?", "Which town is {s} from?"),
    "job": ("What does {s} do?", "What is {s}'s job?", "What work does {s} do?"),
    "known": ("What is {s} known for?", "What is {s} famous for?"),
    "residents": ("Who lives in {s}?",),
    "colour": ("What colour is the {s}?", "What color is the {s}?"),
    "food": ("What does the {s} eat?", "What is the {s}'s food?"),
    "habitat": ("Where does the {s} live?", "Where is the {s} found?"),
}
FACT_NEXT = {
    "home": "And where do they live?",
    "job": "And what is their job?",
    "known": "And what is it known for?",
    "residents": "Who lives there?",
    "colour": "And what colour is it?",
    "food": "And what does it eat?",
    "habitat": "And where does it live?",
}
# Follow-ups about a person's town rather than the person.
TOWN_OF_PERSON_NEXT = {"neighbour": "Who else lives there?", "town-known": "What is that town known for?"}

ARITH_FIRST = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Work out {a} {op} {b}.")
ARITH_NEXT = {"+": ("And plus {c} more?", "Add {c} to that."), "-": ("Now take away {c}.", "And minus {c}?")}
REVERSE_FIRST = ("Reverse the word: {w}", "Spell {w} backwards.", "Write {w} backwards.")
REVERSE_NEXT = ("Now reverse it back.", "Reverse that again.", "And backwards once more?")

Conversation = dict[str, list[dict[str, str]]]


# ----- questions and answers


def fact_answer(subject: str, topic: str) -> str:
    """The one sentence that answers `topic` about `subject`."""
    if topic == "home":
        return f"{subject} lives in {PEOPLE[subject][0]}."
    if topic == "job":
        return f"{subject} is a {PEOPLE[subject][1]}."
    if topic == "known":
        return f"{subject} is known for {TOWNS[subject]}."
    if topic == "residents":
        first, second = sorted(p for p, (town, _) in PEOPLE.items() if town == subject)
        return f"{first} and {second} live in {subject}."
    colour, food, habitat = CREATURES[subject]
    if topic == "colour":
        return f"The {subject} is {colour}."
    if topic == "food":
        return f"The {subject} eats {food}."
    return f"The {subject} lives in {habitat}."


def topics_of(subject: str) -> tuple[str, ...]:
    if subject in PEOPLE:
        return ("home", "job")
    if subject in TOWNS:
        return ("known", "residents")
    return ("colour", "food", "habitat")


def _fact_turns(rng: random.Random, follow_ups: int) -> list[tuple[str, str]]:
    subject = rng.choice([*PEOPLE, *TOWNS, *CREATURES])
    topic = rng.choice(topics_of(subject))
    turns = [(rng.choice(FACT_FIRST[topic]).format(s=subject), fact_answer(subject, topic))]
    asked = {topic}
    for _ in range(follow_ups):
        options = [t for t in topics_of(subject) if t not in asked]
        if topic == "home":  # the answer named a town: ask about it
            options += [t for t in TOWN_OF_PERSON_NEXT if t not in asked]
        if not options:
            break
        topic = rng.choice(options)
        asked.add(topic)
        if topic == "neighbour":
            town = PEOPLE[subject][0]
            other = next(p for p, (t, _) in PEOPLE.items() if t == town and p != subject)
            turns.append((TOWN_OF_PERSON_NEXT[topic], f"{other} lives there too."))
        elif topic == "town-known":
            turns.append((TOWN_OF_PERSON_NEXT[topic], fact_answer(PEOPLE[subject][0], "known")))
        else:
            turns.append((FACT_NEXT[topic], fact_answer(subject, topic)))
        if topic in TOWN_OF_PERSON_NEXT:
            break  # after an answer about the town (or naming a second person), "they" would be ambiguous
    return turns


def _operation(rng: random.Random) -> tuple[int, str, int]:
    """Small operands: + and - up to 40 (never a negative result), x on single digits."""
    op = rng.choices("+-x", weights=(2, 2, 1))[0]
    if op == "x":
        return rng.randint(2, 9), op, rng.randint(2, 9)
    a, b = rng.randint(0, 40), rng.randint(0, 20)
    if op == "+":
        return (a, op, b) if rng.random() < 0.5 else (b, op, a)
    return a, op, rng.randint(0, min(a, 20))


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_turns(rng: random.Random, follow_ups: int) -> list[tuple[str, str]]:
    a, op, b = _operation(rng)
    value = _apply(a, op, b)
    turns = [(rng.choice(ARITH_FIRST).format(a=a, op=op, b=b), str(value))]
    for _ in range(follow_ups):
        op = "+" if value == 0 else rng.choice("+-")  # a take-away never goes below zero
        c = rng.randint(1, 9 if op == "+" else min(value, 9))
        value = _apply(value, op, c)
        turns.append((rng.choice(ARITH_NEXT[op]).format(c=c), str(value)))
    return turns


def _reverse_turns(rng: random.Random, follow_ups: int) -> list[tuple[str, str]]:
    word = rng.choice(WORDS)
    turns = [(rng.choice(REVERSE_FIRST).format(w=word), word[::-1])]
    for question in rng.sample(REVERSE_NEXT, follow_ups):
        turns.append((question, turns[-1][1][::-1]))
    return turns


def _turns(rng: random.Random, kind: str) -> list[tuple[str, str]]:
    # A follow-up conversation has one or, a third of the time, two questions after the first.
    follow_ups = (1 + (rng.random() < 1 / 3)) if kind.endswith("-followup") else 0
    base = kind.removesuffix("-followup")
    make = {"arithmetic": _arith_turns, "reversal": _reverse_turns, "fact": _fact_turns}[base]
    return make(rng, follow_ups)


def _conversation(rng: random.Random, kind: str) -> Conversation:
    messages = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for question, answer in _turns(rng, kind):
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


# ----- reading a conversation back


def _pattern(template: str) -> re.Pattern[str]:
    """A template's regular expression: {a} {b} {c} are numbers, {op} an operator, {w} a word."""
    groups = {"a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)", "c": r"(?P<c>\d+)", "op": r"(?P<op>[+x-])", "w": r"(?P<w>[a-z]+)"}
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(groups[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


ARITH_FIRST_RES = [_pattern(t) for t in ARITH_FIRST]
ARITH_NEXT_RES = [(op, _pattern(t)) for op, templates in ARITH_NEXT.items() for t in templates]
REVERSE_FIRST_RES = [_pattern(t) for t in REVERSE_FIRST]


def operation_key(a: int, op: str, b: int) -> str:
    """'7+12' for 12 + 7 as for 7 + 12: an operand pair seen in either order counts as seen."""
    if op in "+x":
        a, b = sorted((a, b))
    return f"{a}{op}{b}"


def keys_of(conversation: Conversation) -> set[str]:
    """The operand pairs ('7+12', including those of follow-ups, applied to the previous answer) and
    reversal words ('word:castle') that a conversation's questions use; fact questions use none."""
    keys = set()
    previous = ""  # the last assistant reply, which a follow-up operates on
    for message in conversation["messages"]:
        text = message["content"]
        if message["role"] == "assistant":
            previous = text.strip()
        elif message["role"] == "user":
            if m := next((m for r in ARITH_FIRST_RES if (m := r.fullmatch(text))), None):
                keys.add(operation_key(int(m["a"]), m["op"], int(m["b"])))
            elif m := next((m for r in REVERSE_FIRST_RES if (m := r.fullmatch(text))), None):
                keys.add(f"word:{m['w']}")
            elif previous.isdigit():
                for op, r in ARITH_NEXT_RES:
                    if m := r.fullmatch(text):
                        keys.add(operation_key(int(previous), op, int(m["c"])))
    return keys


def kind_of(conversation: Conversation) -> str:
    """One of KINDS, read from the text."""
    keys = keys_of(conversation)
    base = "reversal" if any(k.startswith("word:") for k in keys) else "arithmetic" if keys else "fact"
    return base + "-followup" if len(answers_of(conversation)) > 1 else base


def chars(conversation: Conversation) -> int:
    """Characters of content in all, the measure MAX_CHARS limits."""
    return sum(len(m["content"]) for m in conversation["messages"])


# ----- making and splitting


def _reserved(key: str, salt: int) -> bool:
    # crc32, not hash(): the same on every run and every Python
    return zlib.crc32(f"{salt}:{key}".encode()) % RESERVED_ONE_IN == 0


def make_conversations(n: int, seed: int) -> list[Conversation]:
    """`n` conversations, the same ones for the same seed, kinds mixed in random order (shares in the
    module docstring)."""
    rng = random.Random(seed)
    salt = rng.getrandbits(32)
    used: set[str] = set()  # reserved items already given to a conversation: each goes to one only
    out = []
    for _ in range(n):
        kind = rng.choices(KINDS, weights=KIND_SHARES)[0]
        reserved = not kind.startswith("fact") and rng.random() < HELD_SHARE
        out.append(_conversation_of_side(rng, kind, reserved, salt, used))
    return out


def _conversation_of_side(rng: random.Random, kind: str, reserved: bool, salt: int, used: set[str]) -> Conversation:
    """A conversation of `kind` built only from unused reserved items, or only from ordinary ones."""
    for _ in range(TRIES):
        conversation = _conversation(rng, kind)
        if chars(conversation) > MAX_CHARS:
            continue
        keys = keys_of(conversation)
        if not reserved and not any(_reserved(k, salt) for k in keys):
            return conversation
        if reserved and all(_reserved(k, salt) for k in keys) and not keys & used:
            used.update(keys)
            return conversation
    if reserved:  # the reserved words can run out: such conversations come from ordinary items instead
        return _conversation_of_side(rng, kind, False, salt, used)
    raise RuntimeError(f"no {kind} conversation within {MAX_CHARS} characters in {TRIES} tries")


def split(conversations: Sequence[Conversation], held_out: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out): `held_out` conversations set aside, the rest in their order.

    A conversation can be held out only if no other conversation of the list uses any of its operand
    pairs or reversal words (`keys_of`), so the training ones never show a held-out arithmetic or
    reversal question, nor its answer. Fact conversations use none: held-out fact questions ask facts
    the training conversations also ask, in the same phrasings, since the world is the knowledge being
    learned. The held-out kinds follow their shares in the list (rounded down, the remainder filled in
    list order). Raises ValueError if fewer than `held_out` conversations can be held out.
    """
    if not 0 <= held_out <= len(conversations):
        raise ValueError(f"cannot hold out {held_out} of {len(conversations)} conversations")
    keys = [keys_of(c) for c in conversations]
    users = Counter(k for ks in keys for k in ks)
    free = [i for i, ks in enumerate(keys) if all(users[k] == 1 for k in ks)]
    kinds = [kind_of(c) for c in conversations]
    quota = {k: held_out * n // len(conversations) for k, n in Counter(kinds).items()}
    chosen = []
    for i in free:
        if quota[kinds[i]] > 0:
            quota[kinds[i]] -= 1
            chosen.append(i)
    taken = set(chosen)
    rest = iter(i for i in free if i not in taken)
    while len(chosen) < held_out and (i := next(rest, None)) is not None:
        chosen.append(i)
    if len(chosen) < held_out:
        raise ValueError(
            f"only {len(chosen)} of {len(conversations)} conversations share no operand pair or word with the"
            f" others; make more conversations or hold out fewer than {held_out}"
        )
    held = set(chosen)
    return (
        [c for i, c in enumerate(conversations) if i not in held],
        [c for i, c in enumerate(conversations) if i in held],
    )


# ----- scoring


def answers_of(conversation: Conversation) -> list[str]:
    """The assistant replies, in order: the expected answers."""
    return [m["content"] for m in conversation["messages"] if m["role"] == "assistant"]


def prompts_of(conversation: Conversation) -> list[list[dict[str, str]]]:
    """For each assistant turn, the messages before it: the true history the model continues."""
    messages = conversation["messages"]
    return [[dict(m) for m in messages[:i]] for i, m in enumerate(messages) if m["role"] == "assistant"]


def score(conversation: Conversation, replies: Sequence[str]) -> tuple[int, int]:
    """(correct, total) for the model's `replies` to a conversation's assistant turns.

    replies[i] is the model's reply to prompts_of(conversation)[i], i.e. generated given the true
    history up to that turn (not the model's own earlier replies), so an early mistake does not cost
    the later turns. total is the number of assistant turns; a reply is correct if it equals the
    expected answer exactly (case and punctuation included) once whitespace around both is stripped.
    Raises ValueError if the number of replies differs from the number of assistant turns.
    """
    answers = answers_of(conversation)
    if len(replies) != len(answers):
        raise ValueError(f"{len(replies)} replies to a conversation with {len(answers)} assistant turns")
    return sum(r.strip() == a.strip() for r, a in zip(replies, answers)), len(answers)


# ----- files


def write_jsonl(path: str | Path, conversations: Iterable[Conversation]) -> None:
    """One conversation per line, ASCII JSON; written to a temporary name and renamed, so a reader
    never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=True) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(conversations: Sequence[Conversation]) -> str:
    sizes = [chars(c) for c in conversations] or [0]
    kinds = Counter(kind_of(c) for c in conversations)
    shares = ", ".join(f"{k} {kinds[k]}" for k in KINDS)
    return f"{len(conversations)} conversations ({shares}); content chars max {max(sizes)}, mean {sum(sizes) / len(sizes):.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptlab.synthetic_chats",
        description="Write generated chat conversations (arithmetic, word reversal, facts of a made-up world) as JSON Lines.",
    )
    parser.add_argument("--n", type=int, required=True, help="training conversations to write to --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON Lines file for the training conversations")
    parser.add_argument("--held-out", type=int, default=0, help="conversations to set aside for scoring")
    parser.add_argument("--held-out-out", help="JSON Lines file for the held-out conversations")
    args = parser.parse_args(argv)
    if args.n < 0 or args.held_out < 0:
        parser.error("--n and --held-out must not be negative")
    if args.held_out and not args.held_out_out:
        parser.error("--held-out needs --held-out-out, the file to write them to")
    try:
        train, held = split(make_conversations(args.n + args.held_out, args.seed), args.held_out)
    except ValueError as e:
        parser.error(str(e))
    write_jsonl(args.out, train)
    print(f"{args.out}: {summary(train)}")
    if args.held_out:
        write_jsonl(args.held_out_out, held)
        print(f"{args.held_out_out}: {summary(held)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
