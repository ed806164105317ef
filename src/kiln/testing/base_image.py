"""Kiln's base image for the test suite, built once per recipe and kept outside the repository.

``python -m kiln.testing.base_image`` (run by ``make test`` before pytest) builds it into
``${KILN_TOOLS_CACHE:-~/.cache/kiln-tools}/base-images/<recipe hash>.oci.tar`` with progress
on stdout; later runs find it there in milliseconds. Tests take it from the same place.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kiln.build.base_image import BaseArchive, BaseRecipe, build_base_archive

SITE_CA_DIR = Path("/usr/local/share/ca-certificates")


def tools_cache() -> Path:
    return Path(os.environ.get("KILN_TOOLS_CACHE") or Path.home() / ".cache" / "kiln-tools")


def base_cache_dir() -> Path:
    return tools_cache() / "base-images"


def recipe_for_tests() -> BaseRecipe:
    return BaseRecipe.for_site(SITE_CA_DIR)


def base_archive(progress: bool = False) -> BaseArchive:
    started = time.monotonic()

    def say(line: str) -> None:
        if progress:
            print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    return build_base_archive(recipe_for_tests(), base_cache_dir(), say)


if __name__ == "__main__":
    archive = base_archive(progress=True)
    print(f"base image for the tests: {archive.path} ({archive.manifest_digest})")
    sys.exit(0)
