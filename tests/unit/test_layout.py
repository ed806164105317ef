"""The package picture runs one way: ``kiln.scheduling`` (pure rules) below ``kiln.domain``,
``kiln.domain`` below ``kiln.runner``. Every import statement of every module is read from its
syntax tree (function-level and ``TYPE_CHECKING`` imports included), so no import can hide."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import kiln

SRC = Path(kiln.__file__).parent


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file at ``path`` (a module under
    ``root``); ``from x import y`` yields both ``x`` and ``x.y`` (``y`` may be a module)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(
    package: str,
    allowed: tuple[str, ...],
    forbidden: tuple[str, ...],
    root: Path = SRC.parent,
) -> list[str]:
    """Imports of Kiln modules from ``package`` (under ``root``) that ``forbidden`` names,
    or (when ``allowed`` is given) that it does not name."""
    found = []
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        for line, name in imported_modules(path, root):
            if not _within(name, "kiln"):
                continue
            bad = any(_within(name, f) for f in forbidden) or (
                bool(allowed) and not any(_within(name, a) for a in allowed)
            )
            if bad:
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_domain_never_imports_the_runner() -> None:
    assert violations("kiln.domain", (), ("kiln.runner",)) == []


def test_scheduling_imports_only_itself_and_the_error_types() -> None:
    assert violations("kiln.scheduling", ("kiln.scheduling", "kiln.domain.errors"), ()) == []


def test_the_check_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The walker itself: a plain, a from-, a relative and a nested import are all found."""
    fake = tmp_path / "kiln" / "domain"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text(
        "import kiln.runner.client\n"
        "from kiln.runner import reconciler\n"
        "from ..runner.states import LIVE_STATES\n"
        "def f():\n    from kiln import runner\n"
        "from kiln.domain import errors\n"
    )
    found = violations("kiln.domain", (), ("kiln.runner",), root=tmp_path)
    assert [f.split(":")[1].split()[0] for f in found] == ["1", "2", "2", "3", "3", "5"]
    assert "kiln.runner.states.LIVE_STATES" in found[4]
