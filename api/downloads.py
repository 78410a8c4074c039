"""Content-Disposition for downloads (RFC 6266): a header is Latin-1 on the wire, so a user's file name
goes out twice, as an ASCII fallback with quotes and backslashes escaped and as UTF-8 percent-encoded in
`filename*` (RFC 8187), which every current client prefers. A name like `数据.jsonl` or `a"b.jsonl` then
neither fails to encode nor breaks out of its quotes."""

import re
import unicodedata
from urllib.parse import quote


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    return f"{disposition}; filename=\"{ascii_fallback(filename)}\"; filename*=UTF-8''{quote(filename, safe='')}"


def ascii_fallback(filename: str) -> str:
    """Accents dropped where the letter has an ASCII base, any other non-ASCII or control character as `_`,
    then `\\` and `"` escaped for the quoted string."""
    decomposed = unicodedata.normalize("NFKD", filename)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    plain = re.sub(r"[^\x20-\x7e]", "_", plain)
    return plain.replace("\\", "\\\\").replace('"', '\\"')
