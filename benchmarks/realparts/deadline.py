"""``--until`` / ``--recover-until HH:MM`` (UTC) of the long real-weights runs as a time stamp."""

from __future__ import annotations

import re
import time


def next_utc(hhmm: str, flag: str, now: float | None = None) -> float:
    """The next occurrence of ``hhmm`` (UTC) after ``now``: a run started at 23:00 with 00:50 stops starting work
    the next day at 00:50, not at once. A one-line error naming ``flag`` for a bad value."""
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", hhmm.strip())
    if not m:
        raise SystemExit(f"{flag}: {hhmm!r} is not HH:MM (UTC, 00:00-23:59)")
    now = time.time() if now is None else now
    day = now - now % 86400
    t = day + int(m.group(1)) * 3600 + int(m.group(2)) * 60
    return t if t > now else t + 86400
