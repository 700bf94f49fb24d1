"""Every notebook runs top to bottom, headless, with small budgets (slow: a few minutes)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks_stored_without_outputs():
    assert len(NOTEBOOKS) == 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One store folder for all notebooks, apart from the user's own (Qdrant locks it)."""
    return tmp_path_factory.mktemp("stores")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path, stores):
    monkeypatch.setenv("FEDRAG_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("FEDRAG_STORE_DIR", str(stores))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
