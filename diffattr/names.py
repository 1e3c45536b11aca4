"""What a file name must be to reach JSON, an HTML page and a terminal intact.

No torch here: the command line's path flags check their values with it before anything loads.
"""

from __future__ import annotations

import os
import re
import unicodedata


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be carried faithfully, starting with the name as shown; ``None`` if it can.

    Refused: names that are not UTF-8 (undecodable bytes), and names holding control characters (a
    newline or an escape sequence would reach the user's terminal).
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{os.fsencode(name).decode('utf-8', 'backslashreplace')}: the name is not valid UTF-8"
    if any(unicodedata.category(character) == "Cc" for character in name):
        return f"{name!r}: the name holds control characters"
    return None


# Control characters (but tab and newline) and the bidirectional overrides/isolates: in a caption
# or prompt they would reach an HTML page raw (a NUL, an escape sequence, text shown reversed).
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with its invisible controls written out as ``\\uXXXX`` escapes, so a reader sees them."""
    return _INVISIBLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
