"""Where the project's shared data lies: ../shared beside the checkout (as in CI), or RLHF_STUDIO_SHARED."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HH_NAME = "hh-rlhf-harmless-base-test.jsonl.gz"


def shared_dir() -> Path:
    for d in (os.environ.get("RLHF_STUDIO_SHARED"), ROOT.parent / "shared", Path("/work/shared")):
        if d and (Path(d) / "data" / HH_NAME).exists():
            return Path(d)
    return ROOT.parent / "shared"


HH_REAL = shared_dir() / "data" / HH_NAME
