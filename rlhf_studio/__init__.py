"""RLHF Studio, installed and imported under one name: `from rlhf_studio import Studio`.

The repository keeps its three parts at the top (studio/, components/, storage/); the build configuration
(pyproject.toml, [tool.setuptools.package-dir]) installs them as rlhf_studio.studio, rlhf_studio.components and
rlhf_studio.storage, so that no top-level `studio`, `components` or `storage` of ours can collide with another
distribution's, or with a folder of that name beside a user's notebook.
"""
from pathlib import Path

# A source checkout (the tests, a worktree on PYTHONPATH, an editable install): the parts are this folder's
# siblings. A built wheel holds them inside this folder, where they are found first.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "studio" / "facade.py").is_file() and (_checkout / "pyproject.toml").is_file():
    __path__.append(str(_checkout))

from .studio import Completion, Studio, StudioError  # noqa: E402  (after the path above)

__all__ = ["Studio", "StudioError", "Completion"]
