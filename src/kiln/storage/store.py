"""Where project files live and how a project's directory comes to be."""

from __future__ import annotations

import shutil
from pathlib import Path

from kiln.domain.errors import InvalidInput
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

    def _staging_dir(self, project_id: int) -> Path:
        return self.root / f".staging-{project_id}"

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

    def _begin(self, project_id: int) -> Path:
        """A fresh staging directory: a project appears whole or not at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self._staging_dir(project_id)
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
