"""User content as HTML for the page: a project's README (Markdown, rendered then sanitized)
and source files (syntax-highlighted). These are the only places where the UI marks HTML
built from user content safe, and each has two independent guards:

- Markdown: markdown-it renders with raw HTML *off* (a ``<script>`` in the README is shown as
  text) and refuses ``javascript:``-style links; then nh3 (ammonia) keeps only an allow-list
  of tags, attributes, classes and URL schemes. Relative links lead to the file browser,
  relative images to the file API (which serves bytes with ``nosniff`` and a sandbox CSP).
- Highlighting: Pygments escapes every token it emits; only its own token classes are used.

The page's CSP (no inline script, images only from the site) backs both.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import STANDARD_TYPES
from pygments.util import ClassNotFound

# Larger files are shown as plain text: highlighting a megabyte would make the page slow.
MAX_HIGHLIGHT_CHARS = 256 * 1024
TOKEN_CLASSES = frozenset(c for c in STANDARD_TYPES.values() if c)
LINK_SCHEMES = frozenset({"http", "https", "mailto"})

_ALLOWED_TAGS = {
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "img", "li", "ol", "p", "pre", "s", "span", "strong", "table", "tbody", "td", "th",
    "thead", "tr", "ul",
}  # fmt: skip
_ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "ol": {"start"},
    "td": {"align"},
    "th": {"align"},
}


def _lexer_for(filename: str) -> Lexer | None:
    try:
        return get_lexer_for_filename(filename, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


def _highlighted(code: str, lexer: Lexer) -> str:
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


def highlight_file(text: str, filename: str) -> Markup | None:
    """``text`` as highlighted HTML for a ``<pre>``, by the file's name; None when Pygments
    has no lexer for it or the file is too large (then the page shows it as plain text)."""
    if len(text) > MAX_HIGHLIGHT_CHARS:
        return None
    lexer = _lexer_for(filename)
    if lexer is None:
        return None
    return Markup(_highlighted(text, lexer))  # noqa: S704 (Pygments escapes each token)


def _fence_highlight(code: str, language: str, _attrs: str) -> str:
    """markdown-it's hook for fenced code: highlighted when the language is known, else ""
    (markdown-it then escapes the code itself)."""
    try:
        lexer = get_lexer_by_name(language, stripnl=False, ensurenl=False) if language else None
    except ClassNotFound:
        lexer = None
    if lexer is None or len(code) > MAX_HIGHLIGHT_CHARS:
        return ""
    return _highlighted(code, lexer)


_markdown = MarkdownIt("commonmark", {"html": False, "highlight": _fence_highlight}).enable(
    ["table", "strikethrough"]
)


def _is_relative(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and not url.startswith(("/", "#", "\\"))


def render_markdown(text: str, files_page: str, files_api: str) -> Markup:
    """A README as sanitized HTML. Relative links point into the project's file browser
    (``files_page``, ending with '/'), relative images at its file API (``files_api``)."""

    def rewrite(tag: str, attribute: str, value: str) -> str | None:
        if attribute not in ("href", "src"):
            return value
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. a broken IPv6 host: not a link worth keeping
            return None
        if _is_relative(value):
            return (files_api if attribute == "src" else files_page) + value.removeprefix("./")
        if attribute == "src":  # pictures only from this site (the CSP's rule too)
            return value if not parts.scheme and not parts.netloc else None
        return value if not parts.scheme or parts.scheme.lower() in LINK_SCHEMES else None

    rendered = _markdown.render(text)
    clean = nh3.clean(
        rendered,
        tags=_ALLOWED_TAGS,
        attributes=_ALLOWED_ATTRIBUTES,
        allowed_classes={"span": set(TOKEN_CLASSES)},
        attribute_filter=rewrite,
        url_schemes=set(LINK_SCHEMES),
        link_rel="noopener noreferrer nofollow",
    )
    return Markup(clean)  # noqa: S704 (sanitized by nh3's allow-list just above)
