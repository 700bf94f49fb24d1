"""Build the packaged demo data from Debian's dict-foldoc and dict-jargon (reproducible).

    apt-get install dict-foldoc dict-jargon && python scripts/build_demo_data.py

Two clients with different sources (non-IID): ``foldoc`` (Free On-line Dictionary of
Computing) and ``jargon`` (the Jargon File). QA pairs have short, checkable answers that appear
verbatim in one document: acronym expansions and creators (FOLDOC), terms from their
definitions (Jargon File). Output: fedrag_app/demo_data/<client>/{corpus,train,eval}.jsonl (plain JSON lines: Flower's
app bundle carries *.jsonl but not *.gz, and both git and the bundle's zip compress them).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

DICTD = Path("/usr/share/dictd")
OUT = Path(__file__).resolve().parent.parent / "fedrag_app" / "demo_data"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SMALL = {"of", "and", "for", "the", "in", "to", "on", "a", "an", "with", "by", "at", "or"}
N_TRAIN, N_EVAL, N_DOCS = 360, 120, 1500


def b64(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + B64.index(ch)
    return value


def entries(name: str) -> list[tuple[list[str], str]]:
    """(headwords, body) per distinct dictd entry, in file order."""
    data = gzip.open(DICTD / f"{name}.dict.dz").read()
    seen, out = set(), []
    for line in (DICTD / f"{name}.index").read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        start = b64(offset)
        if word.startswith("00-database") or start in seen:
            continue
        seen.add(start)
        raw = data[start : start + b64(length)].decode("utf-8")
        head, _, body = raw.partition("\n\n")
        out.append(([h.strip() for h in head.splitlines() if h.strip()], body))
    return out


def clean(body: str) -> str:
    text = re.sub(r"\{([^{}]*)\}", lambda m: m.group(1), body)  # cross-reference braces
    text = re.sub(r"\s*\(\d{4}-\d{2}-\d{2}\)\s*$", "", text.strip())  # FOLDOC date stamp
    text = re.sub(r"\[Jargon File\]", "", text)
    text = " ".join(text.split())
    if len(text) > 1200:
        cut = text.rfind(". ", 0, 1200)
        text = text[: cut + 1 if cut > 300 else 1200]
    return text


def initials_match(acronym: str, phrase: str) -> bool:
    letters = re.sub(r"[^A-Za-z]", "", acronym).upper()
    words = [w for w in re.split(r"[\s/-]+", phrase) if w and w.lower() not in SMALL]
    return len(letters) >= 2 and "".join(w[0] for w in words).upper() == letters


def foldoc_qa(headwords: list[str], text: str) -> list[tuple[str, str]]:
    """Acronym expansions and creators, with the answer verbatim in ``text``."""
    qa = []
    title, aliases = headwords[0], headwords[1:]
    body = re.sub(r"^<[^>]*>\s*", "", text)
    for alias in aliases:  # title "Full Name", alias "ACRONYM"
        if alias.isupper() and initials_match(alias, title) and title.lower() != alias.lower():
            qa.append((f"What does {alias} stand for?", title))
    if re.fullmatch(r"[A-Z0-9/&-]{2,10}", title):  # title "ACRONYM", body "Full Name. ..."
        first = re.split(r"[.;(,]", body, maxsplit=1)[0].strip()
        if 1 < len(first.split()) <= 8 and initials_match(title, first):
            qa.append((f"What does {title} stand for?", first))
    m = re.search(
        r"\b(developed|designed|written|created|invented|founded) by "
        r"((?:[A-Z][a-z]+|[A-Z]\.)(?: (?:[A-Z]\.|[A-Z][a-z]+)){1,2})\b",
        body,
    )
    if m and title.lower() not in m.group(2).lower():
        verb = {"written": "wrote", "founded": "founded"}.get(m.group(1), m.group(1)[:-1] + "ed")
        verb = {"developeed": "developed", "designeed": "designed", "createed": "created",
                "inventeed": "invented"}.get(verb, verb)  # fmt: skip
        qa.append((f"Who {verb} {title}?", m.group(2)))
    return qa


def jargon_clean(body: str) -> str:
    lines = body.strip().splitlines()
    if lines and re.match(
        r"^\s*(/.*/,?\s*)?(n|v|adj|adv|interj|pref|suff|abbrev|excl|prep|vt|vi)\.", lines[0]
    ):
        lines = lines[1:]  # pronunciation and part of speech
    return clean("\n".join(lines))


def jargon_qa(title: str, text: str) -> list[tuple[str, str]]:
    """'Which hacker jargon term means: <first sentence>?' -> the term."""
    body = re.sub(r"^\[[^\]]*\]\s*", "", text)  # etymology
    body = re.sub(r"^1\.\s*", "", body)
    first = re.split(r"(?<=[a-z)])\.\s", body, maxsplit=1)[0].strip().rstrip(".")
    words = first.split()
    if not 5 <= len(words) <= 30 or title.lower() in first.lower() or len(title) < 3:
        return []
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9 '\-]{2,30}", title) or len(title.split()) > 4:
        return []
    return [(f"In hacker jargon, which term means: {first}?", title)]


def build(client: str, docs: list[dict], qa_of, rng: random.Random, out: Path = OUT) -> None:
    """Write out/client/{corpus,train,eval}.jsonl; ``qa_of(doc)`` gives (question, answer or
    answers) pairs, kept when the first answer is short and appears verbatim in the doc."""
    candidates = []
    for doc in docs:
        for question, answer in qa_of(doc):
            answers = [answer] if isinstance(answer, str) else list(answer)
            if (
                answers[0].lower() in f"{doc['title']}: {doc['text']}".lower()
                and len(answers[0].split()) <= 8
            ):
                candidates.append({"question": question, "answers": answers, "doc_id": doc["id"]})
    by_q: dict[str, dict] = {}
    for c in candidates:
        by_q.setdefault(c["question"], c)  # a question asked of two docs keeps the first
    qas = list(by_q.values())
    rng.shuffle(qas)
    by_doc: dict[str, list[dict]] = {}
    for qa in qas:
        by_doc.setdefault(qa["doc_id"], []).append(qa)
    doc_ids = list(by_doc)
    evaluation, train, eval_docs = [], [], set()
    for doc_id in doc_ids:  # a doc's questions all go to one split
        target = evaluation if len(evaluation) < N_EVAL else train
        if target is train and len(train) >= N_TRAIN:
            break
        target.extend(by_doc[doc_id])
        if target is evaluation:
            eval_docs.add(doc_id)
    needed = {qa["doc_id"] for qa in train + evaluation}
    others = [d for d in docs if d["id"] not in needed]
    rng.shuffle(others)
    keep = needed | {d["id"] for d in others[: max(0, N_DOCS - len(needed))]}
    corpus = [
        {k: v for k, v in d.items() if not k.startswith("_")} for d in docs if d["id"] in keep
    ]
    folder = out / client
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus", corpus), ("train", train), ("eval", evaluation)):
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        (folder / f"{name}.jsonl").write_bytes(payload)
    print(f"{client}: {len(corpus)} docs, {len(train)} train, {len(evaluation)} eval")


def main() -> None:
    foldoc = []
    for i, (heads, body) in enumerate(entries("foldoc")):
        text = clean(body)
        if len(text) >= 40:
            foldoc.append(
                {"id": f"foldoc-{i:05d}", "title": heads[0], "text": text, "_heads": heads}
            )
    jargon = []
    for i, (heads, body) in enumerate(entries("jargon")):
        text = jargon_clean(body)
        if len(text) >= 40:
            jargon.append({"id": f"jargon-{i:05d}", "title": heads[0], "text": text})
    build("foldoc", foldoc, lambda d: foldoc_qa(d["_heads"], d["text"]), random.Random(1))
    build("jargon", jargon, lambda d: jargon_qa(d["title"], d["text"]), random.Random(2))


if __name__ == "__main__":
    main()
