"""Where project files live and how a project's directory comes to be."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import IO

from kiln.domain.errors import InvalidInput
from kiln.storage.archives import extract_archive
from kiln.storage.git import commit_all, init_repo

TEMPLATES_DIR = Path(__file__).parent / "templates"


def template_names() -> list[str]:
    return sorted(p.name for p in TEMPLATES_DIR.iterdir() if p.is_dir())


class ProjectStore:
    """One directory per project under ``root``, named by the project's id (so renames and
    owner changes never move files)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def project_dir(self, project_id: int) -> Path:
        return self.root / str(project_id)

    def _staging_dir(self, key: int | str) -> Path:
        return self.root / f".staging-{key}"

    def create(self, project_id: int, *, template: str | None = None) -> Path:
        """Create the directory, blank or from a built-in template, as one git commit."""
        if template is not None and template not in template_names():
            raise InvalidInput(
                f"unknown template {template[:80]!r}; choose one of: {', '.join(template_names())}"
            )
        staging = self._begin(project_id)
        try:
            if template is not None:
                shutil.copytree(TEMPLATES_DIR / template, staging, dirs_exist_ok=True)
            return self._finish(project_id, staging, "Create project")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def stage_archive(
        self, archive: IO[bytes], filename: str, *, max_bytes: int, max_entries: int
    ) -> Path:
        """Extract an uploaded archive and commit it, in a staging directory of its own.

        This runs before the project's row exists, so a long extraction never holds a
        database write lock (SQLite has only one). ``create_from_archive`` then places it;
        ``discard_staged`` removes it when the project cannot be created."""
        staging = self._begin(f"upload-{secrets.token_hex(8)}")
        try:
            extract_archive(
                archive, filename, staging, max_bytes=max_bytes, max_entries=max_entries
            )
            init_repo(staging)
            commit_all(staging, f"Create project from {Path(filename).name[:100]}")
            return staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def create_from_archive(self, project_id: int, staged: Path) -> Path:
        """Make a directory prepared by ``stage_archive`` the project's files."""
        return self._finish(project_id, staged, "Create project")

    def discard_staged(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def _begin(self, key: int | str) -> Path:
        """A fresh staging directory: a project appears whole or not at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self._staging_dir(key)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    def _finish(self, project_id: int, staging: Path, message: str) -> Path:
        init_repo(staging)
        commit_all(staging, message)
        final = self.project_dir(project_id)
        if final.exists():  # left over from a project row that was rolled back
            shutil.rmtree(final)
        staging.rename(final)
        return final

    def delete(self, project_id: int) -> None:
        path = self.project_dir(project_id)
        if path.exists():
            # Rename first so a half-finished delete never looks like a live project.
            trash = self.root / f".trash-{project_id}"
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
