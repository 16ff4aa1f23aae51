"""The repo's own code a module runs, found statically: every ``import`` of a ``winnow`` or ``stages``
module, anywhere in a file (function bodies too, since winnow imports heavy modules lazily), followed
transitively. Used to check dvc.yaml ``deps`` and to hash the code a job runs.

Static on purpose: importing would run torch & co. and miss imports in branches not taken.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("winnow", "stages")


def _file(module: str) -> Path | None:
    """The file of a repo module (``a/b.py`` or the package's ``a/b/__init__.py``), or None."""
    base = ROOT.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _with_packages(module: str) -> list[str]:
    """``a.b.c`` and the packages importing it runs first: ``a``, ``a.b``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


@lru_cache(maxsize=None)
def _direct(path: str, _stamp: tuple[int, int]) -> frozenset[str]:
    """The repo modules one file imports; cached per file, keyed by its mtime and size so an edit is re-read."""
    p = Path(path)
    package = list(p.relative_to(ROOT).parts[:-1])   # where relative imports start, for a/b.py and a/__init__.py alike
    found: set[str] = set()
    for node in ast.walk(ast.parse(p.read_bytes(), filename=path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _ours(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: up (level - 1) packages from this file's package
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not _ours(base):
                continue
            found.add(base)
            # `from winnow import x`: x may be a submodule rather than a name in winnow/__init__.py
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*" and _file(f"{base}.{a.name}"))
    return frozenset(found)


def _direct_of(p: Path) -> frozenset[str]:
    st = p.stat()
    return _direct(str(p), (st.st_mtime_ns, st.st_size))


def import_closure(module: str) -> list[str]:
    """Sorted repo-relative paths of ``module``'s file and of every winnow/stages module it imports,
    transitively, with the ``__init__.py`` of each package on the way."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = [module]
    while todo:
        for m in _with_packages(todo.pop()):
            if m in seen:
                continue
            seen.add(m)
            p = _file(m)
            if p is None:   # a name imported from a package (from winnow.x import func), not a module
                continue
            files.add(p.relative_to(ROOT).as_posix())
            todo.extend(_direct_of(p))
    return sorted(files)
