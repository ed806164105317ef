"""Copy the front-end files the UI uses from node_modules into the package's static dir."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "src" / "kiln" / "web" / "static" / "vendor"
FILES = {
    "htmx.org/dist/htmx.min.js": "htmx.min.js",
    "@xterm/xterm/lib/xterm.js": "xterm.js",
    "@xterm/xterm/css/xterm.css": "xterm.css",
    "@xterm/addon-fit/lib/addon-fit.js": "addon-fit.js",
    # The API explorer at /api/v1/docs (kiln.api.docs).
    "swagger-ui-dist/swagger-ui-bundle.js": "swagger-ui-bundle.js",
    "swagger-ui-dist/swagger-ui.css": "swagger-ui.css",
}


def main() -> None:
    VENDOR.mkdir(parents=True, exist_ok=True)
    for source, target in FILES.items():
        shutil.copyfile(ROOT / "node_modules" / source, VENDOR / target)
    print(f"copied {len(FILES)} front-end files into {VENDOR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
