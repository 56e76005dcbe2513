"""``WriteOnlyStream``: what a write-only binary stream answers besides ``write``.

Snapshot handles write through ``Snapshot.write_to(w)`` to anything file-like; the storage
layer's descriptor writer (``storage/streams.py``) and the envelope's sealing writer
(``envelope/stream.py``) both hand such an object out. They share this base: not readable,
not seekable, ``tell`` is the count of bytes accepted, ``writelines`` writes each line, and
the ``with`` block closes it. Subclasses implement ``write`` and ``close`` and keep ``count``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self


class WriteOnlyStream:
    count: int

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.count

    def write(self, data: Any) -> int:
        raise NotImplementedError

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
