"""The part of a photo's OCR text that matched a search, with the match marked, for `cnai search` to print."""
from __future__ import annotations

import re

MARK_OPEN, MARK_CLOSE = "[", "]"
# quotes and brackets a person may put round a term: they group, they are not part of the words sought
_QUOTES = "\"'“”‘’「」『』《》〈〉()（）[]【】"


def query_terms(query: str) -> list[str]:
    """The words a search asks for: without the `ocr:` prefix, quotes and brackets; longest first."""
    text = query.split(":", 1)[1] if query.lower().startswith("ocr:") else query
    text = text.translate({ord(c): " " for c in _QUOTES})
    return sorted(dict.fromkeys(text.split()), key=len, reverse=True)  # stable: same length keeps query order


def matched_snippet(text: str | None, query: str, width: int = 60) -> str:
    """About `width` characters of `text` around the first match of any query term, every match in that window
    marked [like this]; the text's start when nothing matches word for word (a CLIP-only hit)."""
    flat = " ".join((text or "").split())
    if not flat:
        return "(no text)"
    terms = query_terms(query)
    pattern = re.compile("|".join(re.escape(t) for t in terms), re.IGNORECASE) if terms else None
    first = pattern.search(flat) if pattern else None
    if first is None:
        return flat[:width] + ("…" if len(flat) > width else "")
    start = max(0, min(first.start() - width // 3, len(flat) - width))
    end = min(len(flat), start + width)
    while end < first.end():
        end += 1
    window = flat[start:end]
    marked = pattern.sub(lambda m: f"{MARK_OPEN}{m.group(0)}{MARK_CLOSE}", window)
    return ("…" if start > 0 else "") + marked + ("…" if end < len(flat) else "")
