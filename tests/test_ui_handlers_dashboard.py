"""The Dashboard tab's handlers (studio/ui/dashboard.py) called as functions of plain values, on a real Studio,
without a browser: the summary and tables, the leaderboard hidden in blind mode, export and import."""
import json
from types import SimpleNamespace

import pandas as pd

from rlhf_studio.studio.auth import Account, Accounts
from rlhf_studio.studio.ui import dashboard

BO = SimpleNamespace(username="bo", session_hash="s-bo")


def test_dashboard_load_export_and_import(studio, tmp_path):
    cs = studio.generate("Say hi", n=2, max_new_tokens=2, seed=0)
    studio.rate(cs[0].id, 4, annotator="ana")
    studio.rate(cs[0].id, 5, annotator="bo")
    out = dashboard.load(studio, dashboard.ALL, False)
    assert len(out) == 9 and out[0].startswith("1 prompts · 2 completions · 2 labels given")
    assert isinstance(out[7], pd.DataFrame) and isinstance(out[8], pd.DataFrame)
    msg, path = dashboard.on_export(studio, "sft", "jsonl", False, "overall")
    assert msg.startswith("exported ") and path.endswith(".jsonl")
    rated = tmp_path / "rated.jsonl"
    rated.write_text(json.dumps({"prompt": "Name a colour", "completions": [{"text": "Red", "score": 5},
                                                                            {"text": "Dog", "score": 1}]}) + "\n")
    assert dashboard.on_import(studio, str(rated), "auto", dashboard.ALL).startswith(
        "imported 2 completions with 2 star labels for 1 prompts")

    studio.accounts = Accounts({"ana": Account("ana", "pw-ana", "owner"), "bo": Account("bo", "pw-bo")})
    studio.blind = True
    assert dashboard.load(studio, "overall", False, BO)[7] is None       # no leaderboard of policies
    assert "may not export data" in dashboard.on_export(studio, "sft", "jsonl", False, "overall", BO)[0]
    assert "may not import data" in dashboard.on_import(studio, str(rated), "auto", "overall", BO)
