"""A real Jupyter kernel runs the notebook use of the README: Studio, inline launch, HTTP 200, a rating."""
import json

import duckdb
import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow


def test_notebook_creates_studio_launches_inline_and_rates(tmp_path):
    # The notebook's folder holds a user's own `studio`, `storage` and `components` packages (issue 25: a folder
    # called `studio` beside a notebook used to shadow ours): the installed name `rlhf_studio` is not shadowed,
    # and the user's packages stay theirs.
    for name in ("studio", "storage", "components"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    db = str(tmp_path / "nb.duckdb")
    cells = [
        # (the notebook's folder first on the path, as where the old names were shadowed)
        f"import os, sys\nsys.path.insert(0, os.getcwd())\nfrom rlhf_studio import Studio\ns = Studio({db!r})\n"
        "import studio, storage, components\nprint('OWNERS', studio.OWNER, storage.OWNER, components.OWNER)\ns",
        "app = s.launch(inline=True)\nimport urllib.request\n"
        "status = urllib.request.urlopen(app.local_url, timeout=30).status\nprint('HTTP', status)",
        "cs = s.generate('Write a haiku about rain', n=2, max_new_tokens=8, seed=0)\n"
        "fid = s.rate(cs[0].id, stars=4)\nprint('RATED', fid, len(s.feedback()))",
        "s.close()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    out = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "OWNERS user studio user storage user components" in out
    assert "HTTP 200" in out
    assert "RATED" in out
    # The inline launch rendered the app in the notebook (an iframe pointing at the local server).
    assert "iframe" in json.dumps(nb.cells[1]["outputs"]).lower()
    with duckdb.connect(db, read_only=True) as con:
        assert con.execute("SELECT kind, stars FROM feedback").fetchall() == [("stars", 4)]
