"""Reading a file ahead of its consumer, one block at a time, on a helper thread.

A restore that has CPU work per block (opening a sealed chunk: ``trio_raft/envelope/stream.py``)
spends the rest of its time copying the next block out of the page cache. Both can run at once:
``readinto`` on a descriptor and ``crc32c`` on a large buffer release the GIL, so a helper thread
reading block ``i + 1`` (and checksumming it, when the raw reader keeps a CRC) overlaps the work
on block ``i``. :class:`BlockReadAhead` does that with a fixed set of buffers that take turns
(at most ``depth`` blocks read and not yet consumed), so memory stays bounded whatever the file's
size.

Contract: while a :class:`BlockReadAhead` is open, only its helper thread touches the raw reader;
:meth:`BlockReadAhead.close` stops the helper and waits for it (it returns only once the helper
no longer uses the reader), so the owner may then read on, close the descriptor or look at the
reader's CRC. An error the helper meets (a read error, a file that ends early) is raised by
:meth:`BlockReadAhead.next` for the block where it happened, never earlier, so blocks before it
are consumed as without read-ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

#: Blocks read ahead of the one being consumed, at most.
DEFAULT_DEPTH = 2


class BlockReadAhead:
    """Hands out ``count`` blocks (each ``size`` bytes, the last ``last_size``) that ``fill``
    reads on a helper thread, in order.

    ``fill(view)`` fills ``view`` completely or raises. :meth:`next` returns the next block as a
    memoryview, valid until the following call of :meth:`next` or :meth:`close`.
    """

    def __init__(self, fill: Callable[[memoryview], None], count: int, size: int,
                 last_size: int, *, depth: int = DEFAULT_DEPTH,
                 name: str = "trio-raft-read-ahead") -> None:
        if count < 1 or size < 1 or not 0 < last_size <= size or depth < 1:
            raise ValueError("read-ahead needs at least one block of a positive size")
        self._fill = fill
        self._count = count
        self._size = size
        self._last_size = last_size
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._ready: queue.SimpleQueue[memoryview | BaseException] = queue.SimpleQueue()
        # One buffer being consumed plus ``depth`` being read or waiting (no more than needed).
        for _ in range(min(depth + 1, count)):
            self._free.put(bytearray(size))
        self._taken = 0
        self._current: memoryview | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i in range(self._count):
                buf = self._free.get()
                if buf is None:  # closed
                    return
                view = memoryview(buf)[:self._last_size if i == self._count - 1 else self._size]
                self._fill(view)
                self._ready.put(view)
        except BaseException as exc:  # handed to the consumer, raised at its block
            self._ready.put(exc)

    def next(self) -> memoryview:
        """The next block (blocking until it is read); raises what reading it raised."""
        if self._closed:
            raise ValueError("read-ahead is closed")
        if self._taken >= self._count:
            raise EOFError("every block was handed out")
        self._give_back()
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._taken = self._count  # the helper stopped: nothing more comes
            raise item
        self._taken += 1
        self._current = item
        return item

    def _give_back(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            buf = current.obj
            current.release()
            self._free.put(buf)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the helper and wait until it no longer touches the raw reader. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._current is not None:
            self._current.release()
            self._current = None
        self._free.put(None)
        self._thread.join()
