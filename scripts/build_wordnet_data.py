"""Build a second data set from Debian's dict-wn (WordNet 3.0), for defaults chosen on more
than one distribution (README "Second data set").

    apt-get install dict-wn && python scripts/build_wordnet_data.py [OUT]   # default data/wordnet

Two non-IID sites with different question kinds, both with short, checkable answers that appear
verbatim in one document (a WordNet entry: its senses, glosses, examples and synonyms):

- ``wn-nouns``: "Which English word means: <gloss of its first sense>?" -> the noun (or any
  synonym of that sense);
- ``wn-verbs``: "Which word fills the blank: "<an example sentence with the word blanked>"?"
  -> the verb or adjective as the example spells it.

Same sizes as the demo (1,500 documents, 360 train and 120 eval questions per site), and the same
rule: no document serves both a train and an eval question. The output is byte-identical for
the same dict-wn. WordNet licence: https://wordnet.princeton.edu/license-and-commercial-use
(free to use, copy and distribute with the copyright notice).
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

from build_demo_data import build, entries

ROOT = Path(__file__).resolve().parent.parent
SENSE = re.compile(r"(?:^|\s)(?:(n|v|adj|adv)\s+)?(\d+):\s")
POS = {"n": "noun", "v": "verb", "adj": "adjective", "adv": "adverb"}


def senses(lines: list[str]) -> list[tuple[str, str]]:
    """(part of speech, sense text) in order; the part of speech carries over between senses."""
    body = " ".join(line.strip() for line in lines)
    marks = list(SENSE.finditer(body))
    out, pos = [], "n"
    for i, m in enumerate(marks):
        pos = m.group(1) or pos
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        out.append((pos, body[m.end() : end].strip()))
    return out


def parse(text: str) -> tuple[str, list[str], list[str]]:
    """A sense's gloss, examples and synonyms."""
    syn = re.search(r"\[syn:([^\]]*)\]", text)
    synonyms = re.findall(r"\{([^{}]*)\}", syn.group(1)) if syn else []
    text = re.sub(r"\[(syn|ant|also):[^\]]*\]", "", text)
    examples = re.findall(r'"([^"]+)"', text)
    gloss = text.split(";")[0].strip()
    return " ".join(gloss.split()), examples, [" ".join(s.split()) for s in synonyms]


def document(word: str, parsed: list[tuple[str, tuple]]) -> str:
    parts = []
    for n, (pos, (gloss, examples, synonyms)) in enumerate(parsed, 1):
        line = f"{POS[pos]} {n}. {gloss}"
        if examples:
            line += "; " + "; ".join(f'"{e}"' for e in examples)
        if synonyms:
            line += f" (synonyms: {', '.join(synonyms)})"
        parts.append(line + ".")
    text = " ".join(parts)
    if len(text) > 1200:
        cut = text.rfind(". ", 0, 1200)
        text = text[: cut + 1 if cut > 300 else 1200]
    return text


def noun_qa(doc: dict) -> list[tuple[str, list[str]]]:
    word, (pos, (gloss, _, synonyms)) = doc["title"], doc["_senses"][0]
    if pos != "n" or not 5 <= len(gloss.split()) <= 30 or word.lower() in gloss.lower():
        return []
    answers = [word] + [s for s in synonyms if s.lower() != word.lower()]
    return [(f"Which English word means: {gloss}?", answers)]


def verb_qa(doc: dict) -> list[tuple[str, str]]:
    word = doc["title"]
    for pos, (_, examples, _) in doc["_senses"]:
        if pos not in ("v", "adj"):
            continue
        for example in examples:
            m = re.search(rf"\b{re.escape(word)}\w*", example, flags=re.IGNORECASE)
            if m and 6 <= len(example.split()) <= 30:
                blanked = example[: m.start()] + "___" + example[m.end() :]
                return [(f'Which word fills the blank: "{blanked}"?', m.group(0))]
    return []


def main(out: Path) -> None:
    nouns, verbs = [], []
    for i, (lines, _) in enumerate(entries("wn")):
        word = lines[0].strip()
        if not re.fullmatch(r"[a-z][a-z\-]{2,20}", word):  # one plain lowercase word
            continue
        parsed = [(pos, parse(text)) for pos, text in senses(lines[1:])]
        if not parsed:
            continue
        doc = {"id": f"wn-{i:06d}", "title": word, "text": document(word, parsed)}
        doc["_senses"] = parsed
        (nouns if parsed[0][0] == "n" else verbs).append(doc)
    build("wn-nouns", nouns, noun_qa, random.Random(3), out)
    build("wn-verbs", verbs, verb_qa, random.Random(4), out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "data" / "wordnet")
