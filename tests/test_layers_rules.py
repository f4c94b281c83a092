"""The walls between the packages (docs/ARCHITECTURE.md), read from the source: storage and components import
nothing of the studio, the tabs under studio/ui hold no SQL and no storage imports, and no module of studio/ or
storage/ or components/ uses another module's underscore names. Static reads of the files: no import, no model, well under a
second."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("studio", "storage", "components")
PACKAGE = "rlhf_studio"        # the installed name the folders are imported under (pyproject.toml)


def local(name: str) -> str:
    """A module name as the repository's folders name it: rlhf_studio.storage.db -> storage.db, rlhf_studio -> ''."""
    return "" if name == PACKAGE else name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name

# A private name still imported across modules, with the reason it stays for now. Empty is the goal.
KNOWN: set[tuple[str, str]] = set()


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def absolute(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of a `from ... import` (relative ones resolved against the file's package)."""
    if not node.level:
        return node.module or ""
    package = module_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    package = package[:len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """Another module's underscore names that `path` uses: `from M import _x`, `import M._x`, `m._x` where m
    names one of our modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                name = local(a.name)
                if name.split(".")[0] in OURS:
                    if any(private(p) for p in name.split(".")):
                        found.append(name)
                    if a.asname:
                        modules[a.asname] = name
                    elif a.name.startswith(PACKAGE + "."):
                        modules[PACKAGE] = ""           # `import rlhf_studio.studio.a`: used as rlhf_studio.studio.a.x
                    else:
                        modules[name.split(".")[0]] = name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            mod = local(absolute(path, node))
            if mod == "":                               # `from rlhf_studio import storage`
                modules.update({a.asname or a.name: a.name for a in node.names if a.name in OURS})
                continue
            if mod.split(".")[0] not in OURS:
                continue
            for a in node.names:
                if private(a.name):
                    found.append(f"{mod}.{a.name}")
                elif is_module(f"{mod}.{a.name}"):
                    modules[a.asname or a.name] = f"{mod}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                mod = ".".join(filter(None, [modules[value.id]] + chain))
                if is_module(mod):
                    found.append(f"{mod}.{node.attr}")
    return found


def defined_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names of the functions and methods a module defines, every name it defines or assigns: defs, classes,
    arguments, `x.name = ...`)."""
    defs, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defs.add(node.name)
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Store):
            names.add(node.attr if isinstance(node, ast.Attribute) else node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return defs, names


def private_method_calls(paths: list[Path]) -> list[str]:
    """`obj._m(...)` in one of `paths` where `_m` is a function or method of another of them and the calling
    module defines no `_m` of its own: a private method called on an object of a class from another module. Read
    by name, not by type (no inference): `self._m`, `cls._m` and `super()._m` are the object's own; a name that
    the caller also defines is taken as its own, and a name none of `paths` defines (`_asdict` of a
    namedtuple, a library's private) is not this rule's business."""
    trees = {q: ast.parse(q.read_text(encoding="utf-8")) for q in paths}
    names = {q: defined_names(t) for q, t in trees.items()}
    found = []
    for path, tree in trees.items():
        own = names[path][1]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            attr, value = node.func.attr, node.func.value
            if not private(attr) or attr in own:
                continue
            if isinstance(value, ast.Name) and value.id in ("self", "cls") or \
                    isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
                continue
            where = [str(q.relative_to(ROOT)) for q in paths if attr in names[q][0]]
            if where:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node.func)} "
                             f"(defined in {', '.join(where)})")
    return found


def test_no_module_uses_another_modules_underscore_names():
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in sources("studio", "storage", "components") for name in private_uses(p)
           if (str(p.relative_to(ROOT)), name) not in KNOWN]
    assert not bad, "underscore names used across modules (give them a public name):\n" + "\n".join(bad)


def test_no_module_calls_another_modules_private_methods():
    bad = private_method_calls(sources("studio", "storage", "components"))
    assert not bad, "private methods called across modules (give them a public name):\n" + "\n".join(bad)


def test_the_rule_sees_each_way_of_reaching_a_private_name(tmp_path, monkeypatch):
    """The check above finds what it is for (else it would pass on anything)."""
    pkg = tmp_path / "studio"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _hidden(): pass\n")
    (pkg / "b.py").write_text("from .a import _hidden\nfrom . import a\nimport studio.a\nimport os\n"
                              "a._hidden()\nstudio.a._hidden()\nos._exit\nself_ok = a.visible\n")
    (pkg / "c.py").write_text("from rlhf_studio.studio.a import _hidden\nimport rlhf_studio.studio.a\n"
                              "import rlhf_studio.studio.a as aa\nfrom rlhf_studio import studio as st\n"
                              "rlhf_studio.studio.a._hidden()\naa._hidden()\nst.a._hidden()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert private_uses(pkg / "b.py") == ["studio.a._hidden"] * 3
    assert private_uses(pkg / "c.py") == ["studio.a._hidden"] * 4      # the same through the installed name
    assert imports_of(pkg / "c.py") == {"studio.a", "studio"}


def test_the_rule_sees_a_private_method_called_on_another_modules_object(tmp_path, monkeypatch):
    """The check above flags a call on an object of another module's class, not one on its own class's."""
    pkg = tmp_path / "components"
    pkg.mkdir()
    (pkg / "model.py").write_text("class Model:\n    def _scores(self): pass\n"
                                  "    def score(self): return self._scores()\n")
    (pkg / "user.py").write_text("from .model import Model\nm = Model()\nm._scores()\nm.score()\n"
                                 "t = lambda obj: obj._asdict()\n")
    (pkg / "own.py").write_text("class Other:\n    def _scores(self): pass\n    def go(self, o): o._scores()\n"
                                "class Sub(Other):\n    def _x(self): super()._scores(); self._scores()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    # own.py's o._scores() is its own class's method of that name: not flagged
    assert private_method_calls(sorted(pkg.glob("*.py"))) == [
        "components/user.py:3: m._scores (defined in components/model.py, components/own.py)"]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {local(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = local(absolute(path, node))
            out |= {a.name for a in node.names} if mod == "" else {mod}
    return out


def test_arrows_point_one_way():
    """storage imports nothing of ours; components imports neither studio nor storage."""
    for pkg, banned in (("storage", ("studio", "components")), ("components", ("studio", "storage"))):
        bad = sorted(f"{p.relative_to(ROOT)}: {m}" for p in sources(pkg) for m in imports_of(p)
                     if m.split(".")[0] in banned)
        assert not bad, f"{pkg} must not import {' or '.join(banned)}:\n" + "\n".join(bad)


def test_the_tabs_hold_no_sql_and_no_storage():
    """issue 25's grep: `grep -rn "import storage\\|from storage\\|\\.store\\.\\|SELECT" studio/ui` finds nothing."""
    pattern = re.compile(r"import storage|from storage|rlhf_studio\.storage|\.store\.|SELECT")
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sources("studio/ui")
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not bad, "the tabs talk to the Studio facade only:\n" + "\n".join(bad)
