"""Text typed into or printed on a terminal."""
from __future__ import annotations

import unicodedata


def clean_source(image_source: str) -> str:
    """Trim blanks and one pair of surrounding quotes (what dragging a file into a terminal adds)."""
    source = image_source.strip()
    if len(source) >= 2 and source[0] == source[-1] and source[0] in "'\"":
        source = source[1:-1].strip()
    return source


def printable(text: str) -> str:
    """Control characters (an untrained model emits ESC and friends) shown escaped, not sent to the terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode()
                   for c in text)
