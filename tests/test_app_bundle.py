"""The Flower app bundle (FAB) that `flwr run` uploads must be complete on its own: SuperNodes
import fedrag_app from it, so the demo data has to travel inside it (Flower bundles only some
file types: *.jsonl yes, *.gz no)."""

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from fedrag_app.data import resolve_clients

APP = Path(__file__).resolve().parent.parent


def test_fab_carries_the_demo_data_and_fits_flowers_limit(tmp_path):
    fab = build_fab_from_disk(APP)
    assert len(fab) < FAB_MAX_SIZE
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path)
    for client in ("foldoc", "jargon"):
        for stem in ("corpus", "train", "eval"):
            assert f"fedrag_app/demo_data/{client}/{stem}.jsonl" in names
    # the ClientApp resolves the demo relative to its own (bundled) package
    clients = resolve_clients([tmp_path / "fedrag_app" / "demo_data"])
    assert [c.name for c in clients] == ["foldoc", "jargon"]
    assert len(clients[0].qa("eval")) == 120
