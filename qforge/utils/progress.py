"""Progress bars for long loops (tqdm on stderr; silent when disabled)."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
