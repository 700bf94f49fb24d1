"""Per-client data folders: discovery, validation (errors name file and line), demo data.

A client folder holds ``corpus.jsonl`` ({"id", "text", "title"?}), ``train.jsonl`` and
``eval.jsonl`` ({"question", "answers": [str, ...]} or {"question", "answer": str}); each may be
gzipped (``.jsonl.gz``). A data root is a folder with one client folder per sub-folder.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class QAPair:
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class ClientData:
    name: str
    folder: Path

    def file(self, stem: str) -> Path:
        return find_file(self.folder, stem)

    def corpus(self) -> list[Document]:
        return load_corpus(self.file("corpus"))

    def qa(self, split: str, limit: int = 0) -> list[QAPair]:
        pairs = load_qa(self.file(split))
        return pairs[:limit] if limit > 0 else pairs


def demo_root() -> Path:
    return Path(__file__).parent / "demo_data"


def find_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}.jsonl (or {stem}.jsonl.gz)")


def _is_client(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("corpus.jsonl", "corpus.jsonl.gz"))


def resolve_clients(paths: list[str | Path] | None = None) -> list[ClientData]:
    """Client folders from a list of client folders and/or data roots (the demo when empty)."""
    clients: list[ClientData] = []
    for raw in paths or [demo_root()]:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise DataError(f"{path}: not a folder")
        if _is_client(path):
            clients.append(ClientData(path.name, path))
            continue
        subs = sorted(p for p in path.iterdir() if p.is_dir() and _is_client(p))
        if not subs:
            raise DataError(f"{path}: neither a client folder (corpus.jsonl) nor a data root")
        clients.extend(ClientData(p.name, p) for p in subs)
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise DataError(f"client folder names must be unique, got {names}")
    return clients


def _open_text(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); any defect raises DataError naming file and line."""
    data = _open_text(path)
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{number}: not valid UTF-8 ({err.reason})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _text_field(path: Path, number: int, obj: dict, key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise DataError(f"{path}:{number}: field '{key}' {kind}")
    if required and not value.strip():
        raise DataError(f"{path}:{number}: field '{key}' is empty")
    return value


def load_corpus(path: Path) -> list[Document]:
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for number, obj in read_jsonl(path):
        doc_id = obj.get("id")
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id:
            raise DataError(f"{path}:{number}: field 'id' missing or not a string/integer")
        if doc_id in seen:
            raise DataError(
                f"{path}:{number}: duplicate id {doc_id!r} (first on line {seen[doc_id]})"
            )
        seen[doc_id] = number
        text = _text_field(path, number, obj, "text")
        title = _text_field(path, number, obj, "title", required=False)
        docs.append(Document(doc_id, text, title))
    if not docs:
        raise DataError(f"{path}: empty corpus")
    return docs


def _per_file_version(parse: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """Memoise a file's parse in this process, keyed by its path, size and modification time.

    Every Flower message re-opens a site's files; a site with tens of thousands of QA pairs
    or a large corpus should not re-read and re-hash them while they are unchanged. A list is
    returned as a fresh list of the cached (frozen) items; a file that fails to parse is not
    cached, so the next call reports it again.
    """

    def frozen(path: str, _size: int, _mtime: int) -> Any:
        value = parse(Path(path))
        return tuple(value) if isinstance(value, list) else value

    cached = functools.lru_cache(maxsize=32)(frozen)

    @functools.wraps(parse)
    def read(path: Path) -> Any:
        st = Path(path).stat()
        value = cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        return list(value) if isinstance(value, tuple) else value

    read.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return read


@_per_file_version
def load_qa(path: Path) -> list[QAPair]:
    pairs: list[QAPair] = []
    for number, obj in read_jsonl(path):
        question = _text_field(path, number, obj, "question")
        if "answers" in obj:
            answers = obj["answers"]
            if (
                not isinstance(answers, list)
                or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)
            ):
                raise DataError(f"{path}:{number}: field 'answers' must be a non-empty string list")
        elif "answer" in obj:
            answers = [_text_field(path, number, obj, "answer")]
        else:
            raise DataError(f"{path}:{number}: field 'answers' (or 'answer') missing")
        pairs.append(QAPair(question, tuple(answers)))
    if not pairs:
        raise DataError(f"{path}: no QA pairs")
    return pairs


@_per_file_version
def file_digest(path: Path) -> str:
    return hashlib.sha256(_open_text(path)).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write aside, then rename, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tmp.replace(path)
