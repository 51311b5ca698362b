"""`Preload`: a value made ahead of time in this process, handed to its owner.

An in-process local run starts loading the model and its processor while Beam
plans the stages and reads the input; the handler's `load_model` (and the
preprocessor's `setup`) then take the result instead of loading again.

The handler owns its `Preload` as a plain attribute. Beam pickles every
transform before running it, even in this process, so a `Preload` pickles as
a token: unpickled in the process that made it, it is that same `Preload`
again; unpickled anywhere else (a worker), it is empty and the owner loads for
itself. The table that maps tokens back holds its entries weakly, so nothing
outlives the transform that owns it.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_tokens = itertools.count()
_live: weakref.WeakValueDictionary[tuple[int, int], Preload[Any]] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def _attach(token: tuple[int, int]) -> Preload[Any]:
    """The live `Preload` of `token`; a new, empty one in any other process
    (a forked child must not wait on its parent's loading thread)."""
    with _lock:
        found = _live.get(token) if token[0] == os.getpid() else None
    return found if found is not None else Preload()


class Preload(Generic[T]):
    """One value, loaded in a background thread, taken once.

    Example::

        preload = Preload()
        preload.start(lambda: load_model(spec))  # returns at once
        ...
        model = preload.take()  # waits; None when nothing was started
    """

    def __init__(self) -> None:
        self._token = (os.getpid(), next(_tokens))
        self._future: Future[T] | None = None
        with _lock:
            _live[self._token] = self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self._token,))

    def start(self, load: Callable[[], T]) -> None:
        """Start `load()` in a background thread (once; later calls do nothing)."""
        with _lock:
            if self._future is not None:
                return
            future: Future[T] = Future()
            self._future = future

        def work() -> None:
            try:
                future.set_result(load())
            except BaseException as e:  # raised again by take(), in load_model
                future.set_exception(e)

        threading.Thread(target=work, name="preload", daemon=True).start()

    def take(self) -> T | None:
        """The loaded value (waiting for it), once; None if none was started."""
        with _lock:
            future, self._future = self._future, None
        return None if future is None else future.result()
