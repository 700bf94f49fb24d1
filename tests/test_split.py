"""`fedrag split`: pooled documents -> N sites by a flwr-datasets partitioner, QA with its doc."""

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from fedrag_app.cli import main
from fedrag_app.data import DataError, demo_root, read_jsonl, resolve_clients
from fedrag_app.split import split


def rows(path: Path) -> list[dict]:
    return [obj for _, obj in read_jsonl(path)]


def write(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


def make_input(folder: Path, ids: list[str], eval_ids: list[str], extra_qa=()) -> Path:
    """One document per id; a train pair for each id not in ``eval_ids``, an eval pair else."""
    write(
        folder / "corpus.jsonl", [{"id": i, "title": i, "text": f"doc {i} says v-{i}"} for i in ids]
    )
    qa = [{"question": f"q {folder.name} {i}?", "answers": [f"v-{i}"], "doc_id": i} for i in ids]
    write(folder / "train.jsonl", [q for q in qa if q["doc_id"] not in eval_ids] + list(extra_qa))
    write(folder / "eval.jsonl", [q for q in qa if q["doc_id"] in eval_ids])
    return folder


def mixes(root: Path) -> list[float]:
    """Share of FOLDOC documents per site (demo ids start with their source)."""
    shares = []
    for site in resolve_clients([root]):
        ids = [d.id for d in site.corpus()]
        shares.append(sum(i.startswith("foldoc-") for i in ids) / len(ids))
    return shares


@pytest.fixture(scope="module")
def demo6(tmp_path_factory) -> tuple[Path, str]:
    """The demo split into 6 sites, dirichlet alpha 0.5 seed 0, through the CLI."""
    root = tmp_path_factory.mktemp("split") / "demo6"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["split", "--clients", "6", "--partitioner", "dirichlet", "--alpha", "0.5",
                     "--seed", "0", "--out", str(root)])  # fmt: skip
    assert code == 0
    return root, out.getvalue()


def test_demo_split_places_every_doc_once_and_every_qa_pair_with_its_doc(demo6):
    root, printed = demo6
    sites = resolve_clients([root])  # loads as a data root, passes validation
    assert [s.name for s in sites] == [f"site-{k:02d}" for k in range(6)]
    inputs = resolve_clients([demo_root()])
    all_ids = [d.id for c in inputs for d in c.corpus()]
    site_ids = [d.id for s in sites for d in s.corpus()]
    assert sorted(site_ids) == sorted(all_ids)  # every document, exactly once
    for kind in ("train", "eval"):
        placed = Counter()
        for site in sites:
            here = {d.id for d in site.corpus()}
            assert site.qa(kind), (site.name, kind)
            for row in rows(site.file(kind)):
                assert row["doc_id"] in here, (site.name, row)
                placed[(row["question"], row["doc_id"])] += 1
        original = Counter((r["question"], r["doc_id"]) for c in inputs for r in rows(c.file(kind)))
        assert placed == original
    record = json.loads((root / "split.json").read_text())
    assert (record["partitioner"], record["alpha"], record["seed"]) == ("dirichlet", 0.5, 0)
    assert [i["name"] for i in record["inputs"]] == ["foldoc", "jargon"]
    assert [s["docs"] for s in record["sites"]] == [len(s.corpus()) for s in sites]
    assert [s["eval"] for s in record["sites"]] == [len(s.qa("eval")) for s in sites]
    assert "site-05" in printed and "all      3000  720    240" in printed


def test_dirichlet_sites_are_non_iid_and_iid_sites_are_not(demo6, tmp_path):
    root, _ = demo6
    pooled = 0.5  # 1,500 FOLDOC + 1,500 Jargon File documents
    dirichlet = [abs(m - pooled) for m in mixes(root)]
    assert sum(dirichlet) / len(dirichlet) > 0.2, dirichlet
    split(resolve_clients(None), tmp_path / "iid", 6, kind="iid")
    iid = [abs(m - pooled) for m in mixes(tmp_path / "iid")]
    assert max(iid) < 0.1, iid


def test_same_seed_same_bytes_other_seed_other_split(demo6, tmp_path):
    root, _ = demo6
    split(resolve_clients(None), tmp_path / "again", 6, alpha=0.5, seed=0)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())  # fmt: skip
    for name in files:
        assert (root / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    split(resolve_clients(None), tmp_path / "seed1", 6, alpha=0.5, seed=1)
    assert (tmp_path / "seed1/site-00/corpus.jsonl").read_bytes() != (
        root / "site-00/corpus.jsonl"
    ).read_bytes()


def test_demo_splits_into_10_dirichlet_sites_each_with_train_and_eval(tmp_path):
    record = split(resolve_clients(None), tmp_path / "ten", 10, alpha=0.5, seed=0)
    assert len(resolve_clients([tmp_path / "ten"])) == 10
    assert all(s["train"] > 0 and s["eval"] > 0 for s in record["sites"]), record["sites"]


def test_refuses_non_empty_out_and_replaces_only_a_previous_split(tmp_path, capsys):
    data = tmp_path / "in"
    ids = [str(i) for i in range(40)]
    make_input(data / "a", ids, ids[::4])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert (
            main(["split", "--data", str(data), "--clients", "2", "--out", str(out), *extra]) == 2
        )
        assert "not empty and not a previous split" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    new = tmp_path / "new"
    base = [
        "split",
        "--data",
        str(data),
        "--clients",
        "2",
        "--partitioner",
        "iid",
        "--out",
        str(new),
    ]
    assert main(base) == 0
    first = (new / "site-00/corpus.jsonl").read_bytes()
    assert main(base) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*base, "--clients", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in new.iterdir()) == ["site-00", "site-01", "site-02", "split.json"]
    assert (new / "site-00/corpus.jsonl").read_bytes() != first
    (new / "site-01/mine.txt").write_text("keep")
    assert main([*base, "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (new / "site-01/mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "new", "out"]  # no temp left


def test_shared_ids_are_prefixed_and_unplaced_qa_pairs_dropped(tmp_path, caplog):
    ids = [str(i) for i in range(30)]
    orphans = [{"question": "no doc?", "answers": ["x"]},
               {"question": "gone?", "answers": ["y"], "doc_id": "nowhere"}]  # fmt: skip
    make_input(tmp_path / "in/a", ids, ids[::3], extra_qa=orphans)
    make_input(tmp_path / "in/b", ids, ids[::3])
    with caplog.at_level(logging.WARNING, logger="fedrag_app.split"):
        record = split(resolve_clients([tmp_path / "in"]), tmp_path / "out", 2, kind="iid")
    assert "dropped 1 QA pairs without a doc_id and 1 whose doc_id" in caplog.text
    assert record["dropped_qa"] == {"no_doc_id": 1, "unknown_doc_id": 1}
    assert record["renamed_ids"] == 60
    sites = resolve_clients([tmp_path / "out"])
    docs = {d.id: d.text for s in sites for d in s.corpus()}
    assert sorted(docs) == sorted(f"{c}/{i}" for c in "ab" for i in ids)
    questions = 0
    for site in sites:
        here = {d.id for d in site.corpus()}
        for row in rows(site.file("train")) + rows(site.file("eval")):
            assert row["doc_id"] in here
            # the pair went with its own input's document, not the other one with the same id
            assert row["doc_id"].split("/")[0] == row["question"].split()[1]
            assert f"v-{row['doc_id'].split('/')[1]}" in docs[row["doc_id"]]
            questions += 1
    assert questions == 60


def test_a_site_left_without_eval_pairs_is_an_error_that_names_it(tmp_path):
    ids = [str(i) for i in range(30)]
    make_input(tmp_path / "in/a", ids, ids[:1])  # one eval pair for three sites
    with pytest.raises(DataError, match=r"site-0\d gets \d+ documents but no eval QA pair .*"
                       r"larger --alpha or fewer --clients"):  # fmt: skip
        split(resolve_clients([tmp_path / "in"]), tmp_path / "out", 3, kind="iid")
    assert not (tmp_path / "out").exists()
