"""Writing a file so that a reader sees the old one or the whole new one, never a torn one.

Every stage's small outputs (scores, metrics, saved answers, caches) go through here, so an interrupted or
failed write never leaves half a file under the name a rerun trusts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` beside ``target``, then rename it over ``target``; the temporary file never outlives
    the call. Its name keeps the suffix (matplotlib picks the format from it) and holds the pid, so
    concurrent writers each rename a whole file of their own: the last one wins."""
    target = Path(target)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)  # rename(2): atomic on one file system
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself could not be made: nothing to clean up
            pass


def write_text_atomically(target: str | Path, text: str) -> None:
    """``text`` into ``target`` through :func:`write_atomically`."""
    write_atomically(target, lambda tmp: tmp.write_text(text))
