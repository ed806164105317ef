"""Put the front-end files the UI uses into the package's static dir (``make assets``): copy
the libraries it loads as they are from node_modules, and bundle Kiln's own front-end
modules (``frontend/``) with the libraries they import, using esbuild from node_modules.
Nothing here is committed: both come from npm's lock file at set-up time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "src" / "kiln" / "web" / "static" / "vendor"
NODE_MODULES = ROOT / "node_modules"
FILES = {
    "htmx.org/dist/htmx.min.js": "htmx.min.js",
    "@xterm/xterm/lib/xterm.js": "xterm.js",
    "@xterm/xterm/css/xterm.css": "xterm.css",
    "@xterm/addon-fit/lib/addon-fit.js": "addon-fit.js",
    # The API explorer at /api/v1/docs (kiln.api.docs).
    "swagger-ui-dist/swagger-ui-bundle.js": "swagger-ui-bundle.js",
    "swagger-ui-dist/swagger-ui.css": "swagger-ui.css",
}
# Entry module -> bundle: one script per page that needs it, no module loader at runtime.
BUNDLES = {
    "frontend/editor.js": "editor.js",  # the file editor: CodeMirror 6
}


def bundle(entry: Path, target: Path) -> None:
    esbuild = NODE_MODULES / ".bin" / "esbuild"
    subprocess.run(
        [
            str(esbuild),
            str(entry),
            "--bundle",
            "--minify",
            "--format=iife",
            "--target=es2020",
            "--legal-comments=eof",  # the libraries' license notices stay with their code
            f"--outfile={target}",
            "--log-level=warning",
        ],
        check=True,
    )


def main() -> None:
    VENDOR.mkdir(parents=True, exist_ok=True)
    for source, target in FILES.items():
        shutil.copyfile(NODE_MODULES / source, VENDOR / target)
    for entry, target in BUNDLES.items():
        bundle(ROOT / entry, VENDOR / target)
    print(
        f"copied {len(FILES)} front-end files and bundled {len(BUNDLES)} into "
        f"{VENDOR.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
