"""Reading a project file as text for the page (never as markup: templates escape it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.storage import files
from kiln.storage.safepath import SafePath

VIEW_LIMIT = 1024 * 1024  # larger files are downloaded, not shown or edited in the page


@dataclass(frozen=True)
class TextFile:
    entry: files.Entry
    text: str | None  # None: not shown in the page, for ``reason``
    reason: str = ""


def read_text(project_dir: Path, path: SafePath) -> TextFile:
    """The file's entry and its UTF-8 text, or why it cannot be shown. NotFound if missing."""
    entry = files.stat_entry(project_dir, path)
    if entry.type == "symlink":
        return TextFile(
            entry, None, "This is a symbolic link; the file browser does not follow it."
        )
    if entry.type != "file":
        return TextFile(entry, None, "This is not a regular file.")
    if entry.size is not None and entry.size > VIEW_LIMIT:
        return TextFile(
            entry, None, f"This file is larger than {VIEW_LIMIT // 1024} KiB: download it."
        )
    fd, st = files.open_for_read(project_dir, path)
    data = b"".join(files.read_chunks(fd, min(st.st_size, VIEW_LIMIT)))
    if b"\0" in data[:8192]:
        return TextFile(entry, None, "This looks like a binary file: download it to open it.")
    try:
        return TextFile(entry, data.decode("utf-8"))
    except UnicodeDecodeError:
        return TextFile(entry, None, "This file is not UTF-8 text: download it to open it.")
