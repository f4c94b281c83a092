"""The project installs under one name, rlhf_studio: every part's package is listed by that name in pyproject."""
import tomllib

from tests.browser import ROOT

PARTS = ("studio", "components", "storage")


def test_every_package_folder_is_installed_under_rlhf_studio():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"rlhf_studio": "rlhf_studio", **{f"rlhf_studio.{p}": p for p in PARTS}}
    folders = {"rlhf_studio"} | {
        "rlhf_studio." + ".".join(module.parent.relative_to(ROOT).parts)
        for part in PARTS for module in (ROOT / part).rglob("*.py") if "__pycache__" not in module.parts}
    listed = set(tool["packages"])
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert not any(name.split(".")[0] in PARTS for name in listed), "nothing of ours is installed at the top level"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(target.startswith("rlhf_studio.") for target in scripts.values())


def test_the_package_shipped_to_remote_workers_imports_on_its_own(tmp_path):
    """A remote Ray cluster gets rlhf_studio as one folder (py_modules): it imports with nothing of the checkout."""
    import subprocess
    import sys

    from rlhf_studio.studio.cluster import package_for_workers
    shipped = package_for_workers()
    code = "import rlhf_studio, rlhf_studio.studio.jobs as j, rlhf_studio.storage as s; print(j.__file__, s.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(shipped).parent),
                              "PYTHONNOUSERSITE": "1"})
    import shutil
    bundle = __import__("pathlib").Path(shipped).parent
    if bundle.name.startswith("rlhf-studio-workers-"):      # a checkout's bundle is a temporary folder
        shutil.rmtree(bundle)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(path.startswith(shipped) for path in out.stdout.split()), out.stdout
