"""Where project files live and how a project's directory comes to be.

Each project is a directory ``projects/<id>`` (named by id, so renames and owner changes
never move files). Where the host allows it, that directory is the mount point of the
project's own filesystem (``kiln.storage.volumes``): the quota is then a hard limit for
workloads too. Everything in it is owned by the workloads' uid, so that server-side git (run
as that uid, ``kiln.storage.git``) and the project's sessions can both change it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import IO

from kiln.domain.errors import InvalidInput
from kiln.runtimes.local.ownership import adopt_tree
from kiln.settings import Settings
from kiln.storage.archives import extract_archive
from kiln.storage.files import usage_bytes
from kiln.storage.git import commit_all, init_repo, repo_owner
from kiln.storage.git import configure as configure_git
from kiln.storage.safepath import ProjectFS
from kiln.storage.volumes import ProjectVolumes, Usage, loop_supported

log = logging.getLogger("kiln.storage")

TEMPLATES_DIR = Path(__file__).parent / "templates"
STAGING_PREFIX = ".staging-"


def template_names() -> list[str]:
    return sorted(p.name for p in TEMPLATES_DIR.iterdir() if p.is_dir())


def _date_now(top: Path) -> None:
    """Folders copied from a template keep the package's times (copytree copies them): date
    them now too. A brand-new tree no workload has seen; links are never followed."""
    now = time.time()
    for folder, subfolders, _names in os.walk(top):
        for name in subfolders:
            os.utime(os.path.join(folder, name), (now, now), follow_symlinks=False)
    os.utime(top, (now, now), follow_symlinks=False)


class ProjectStore:
    """One directory per project under ``root``; ``volumes`` (or None for plain
    directories) holds their filesystems; ``default_quota`` applies where a project has none
    of its own."""

    def __init__(
        self, root: Path, volumes: ProjectVolumes | None = None, default_quota: int = 10 * 1024**3
    ) -> None:
        self.root = root
        self.volumes = volumes
        self.default_quota = default_quota

    @classmethod
    def for_data_dir(cls, data_dir: Path, *, use_volumes: bool, default_quota: int) -> ProjectStore:
        """The store of a site; file systems per project when wanted and possible."""
        root = data_dir / "projects"
        volumes = None
        if use_volumes:
            ok, why = loop_supported()
            if ok:
                volumes = ProjectVolumes(root, data_dir / "volumes", repo_owner())
                volumes.images_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            else:
                log.error(
                    "project quotas are NOT enforced for workloads: %s; the file API still "
                    "enforces them, but a job can fill the disk (set up loop mounts, or "
                    "KILN_STORAGE_PROJECT_VOLUMES=false to silence this)",
                    why,
                )
        return cls(root, volumes, default_quota)

    def project_dir(self, project_id: int) -> Path:
        """The project's directory, its filesystem mounted (after a reboot) if it has one."""
        if self.volumes is not None:
            return self.volumes.ensure_mounted(project_id)
        return self.root / str(project_id)

    def usage(self, project_id: int) -> Usage:
        """Bytes the project's tree takes (allocated blocks, ``.git`` included, each inode
        once) and its hard limit; plain directories are walked (apparent sizes of the files
        outside ``.git``, as before project filesystems existed)."""
        directory = self.project_dir(project_id)
        if self.volumes is not None and self.volumes.is_volume(project_id):
            return self.volumes.usage(project_id)
        if not directory.is_dir():
            return Usage(0, None)  # no files (yet, or any more): nothing used
        with ProjectFS(directory) as fs:
            return Usage(usage_bytes(fs), None)

    def resize(self, project_id: int, quota: int | None, *, offline_ok: bool) -> None:
        if self.volumes is not None and self.volumes.is_volume(project_id):
            self.volumes.resize(project_id, quota or self.default_quota, offline_ok=offline_ok)

    # ---- creation ------------------------------------------------------------------------

    def create(self, project_id: int, *, template: str | None = None) -> Path:
        """Create the directory, blank or from a built-in template, as one git commit."""
        if template is not None and template not in template_names():
            raise InvalidInput(
                f"unknown template {template[:80]!r}; choose one of: {', '.join(template_names())}"
            )
        self._discard(str(project_id))  # left over from a project row that was rolled back
        directory = self._begin(str(project_id))
        try:
            if template is not None:
                # Plain copies: the files are new, dated now (not when Kiln was installed).
                shutil.copytree(
                    TEMPLATES_DIR / template,
                    directory,
                    dirs_exist_ok=True,
                    copy_function=shutil.copy,
                )
                _date_now(directory)
            self._commit_new(directory, "Create project")
            return directory
        except BaseException:
            self._discard(str(project_id))
            raise

    def stage_archive(
        self, archive: IO[bytes], filename: str, *, max_bytes: int, max_entries: int
    ) -> Path:
        """Extract an uploaded archive and commit it, in a staging directory of its own.

        This runs before the project's row exists, so a long extraction never holds a
        database write lock (SQLite has only one). ``create_from_archive`` then places it;
        ``discard_staged`` removes it when the project cannot be created."""
        key = f"{STAGING_PREFIX}upload-{secrets.token_hex(8)}"
        staging = self._begin(key)
        try:
            extract_archive(
                archive, filename, staging, max_bytes=max_bytes, max_entries=max_entries
            )
            self._commit_new(staging, f"Create project from {Path(filename).name[:100]}")
            return staging
        except BaseException:
            self._discard(key)
            raise

    def create_from_archive(self, project_id: int, staged: Path) -> Path:
        """Make a directory prepared by ``stage_archive`` the project's files."""
        self._discard(str(project_id))
        if self.volumes is not None:
            return self.volumes.rename(staged.name, project_id)
        final = self.root / str(project_id)
        staged.rename(final)
        return final

    def discard_staged(self, staged: Path) -> None:
        self._discard(staged.name)

    def delete(self, project_id: int) -> None:
        self._discard(str(project_id))

    def cleanup_staging(self) -> None:
        """Remove what interrupted uploads left (at start-up)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(f"{STAGING_PREFIX}*"):
            self._discard(path.name)
        if self.volumes is not None and self.volumes.images_root.is_dir():
            for image in self.volumes.images_root.glob(f"{STAGING_PREFIX}*.ext4"):
                self._discard(image.stem)

    def _begin(self, key: str) -> Path:
        """A fresh, empty directory (on a filesystem of its own where possible)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.volumes is not None:
            return self.volumes.create(key, self.default_quota)
        directory = self.root / key
        directory.mkdir()
        return directory

    def _commit_new(self, directory: Path, message: str) -> None:
        """Hand what Kiln wrote to the workload uid, then make it the first commit."""
        owner = repo_owner()
        if owner is not None:
            adopt_tree(directory, owner, owner)
        init_repo(directory)
        commit_all(directory, message)

    def _discard(self, key: str) -> None:
        if self.volumes is not None:
            self.volumes.remove(key)
        path = self.root / key
        if path.is_dir() and not path.is_symlink():
            # Rename first so a half-finished delete never looks like a live project.
            trash = self.root / f".trash-{key.lstrip('.')}-{secrets.token_hex(4)}"
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


def project_store(settings: Settings) -> ProjectStore:
    """The site's project store, server-side git set to run as its workload uid."""
    configure_git(settings.runner.host_uid)
    return ProjectStore.for_data_dir(
        settings.data_dir,
        use_volumes=settings.storage.project_volumes,
        default_quota=settings.storage.project_quota_bytes,
    )
