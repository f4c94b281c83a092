"""Where the app may write files: the export folder chosen at start (`--export-dir`, default a folder beside the
database) and a private folder of browser downloads that is emptied as they are served and at close.

A path typed into the app is taken inside the export folder; one that leads out of it (`..`, an absolute path
elsewhere, a symbolic link pointing out) is refused. The notebook API writes where its caller says: whoever
runs Python as the studio's user can write there anyway."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

from .errors import StudioError


def default_export_dir(db_path: str) -> str:
    """`<folder of the database>/<its name>-exports`."""
    db = os.path.abspath(db_path)
    return os.path.join(os.path.dirname(db), os.path.splitext(os.path.basename(db))[0] + "-exports")


def confined_path(root: str, path) -> str:
    """`path` (relative to `root`, or absolute) as an absolute path strictly inside `root`, symbolic links and
    `..` resolved; StudioError otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip() or "\0" in str(path):
        raise StudioError(f"a file or folder name inside the export folder {root} is needed, got {path!r}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    real_root = os.path.realpath(root)
    p = os.fspath(path).strip()
    real = os.path.realpath(p if os.path.isabs(p) else os.path.join(real_root, p))
    if real == real_root or os.path.commonpath([real, real_root]) != real_root:
        raise StudioError(f"{p!r} is outside the export folder {real_root}: the app writes exports only there "
                          "(give a name such as 'my-adapter'; the folder is set with --export-dir)")
    return real


class Downloads:
    """Files made for the browser to download: in a private temporary folder, each removed soon after it was
    served (`drop_later`) and all of them at close."""

    def __init__(self):
        self._dir: str | None = None
        self._lock = threading.Lock()

    def new_folder(self) -> str:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="rlhf-studio-downloads-")   # mode 0700
            return tempfile.mkdtemp(dir=self._dir)

    def drop_later(self, path, seconds: float) -> None:
        """Remove a download `seconds` from now: Gradio copies what a handler returns into its own cache as the
        request ends, so by then the browser is served from that copy."""
        t = threading.Timer(seconds, self.drop, args=(path,))
        t.daemon = True
        t.start()

    def drop(self, path) -> None:
        """Remove a served download (the folder made for it); anything outside the downloads folder is left."""
        if not path or self._dir is None:
            return
        real, root = os.path.realpath(os.fspath(path)), os.path.realpath(self._dir)
        if os.path.commonpath([real, root]) != root or real == root:
            return
        rel = os.path.relpath(real, root).split(os.sep)[0]
        shutil.rmtree(os.path.join(root, rel), ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
