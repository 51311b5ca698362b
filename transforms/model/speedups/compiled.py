"""`torch.compile` without a stall: eager until the compiled forward is ready.

Compiling a vision model with inductor (freezing on, so batch norms fold into
convolutions and oneDNN gets prepacked weights) makes a small CNN's forward
pass 1.4x (2 threads) to 2.2x (1 thread) faster on CPU, but takes 10-30 s per
process. Blocking the first batch on
that would make every short job slower, and a compiler failure (no C++
compiler on the worker, an unsupported op) must never fail a job. So:

- the first full-size batch starts compiling in a background thread, for that
  exact shape, dtype and memory layout (`dynamic=False`: no recompiles);
- until it is ready, and for any other shape (a bundle's last partial batch,
  the halves of an out-of-memory retry), batches run eagerly;
- if compiling or a compiled call fails, a warning says why and the rest of
  the job runs eagerly.

The compiled function releases the GIL while its kernels run, like eager
torch ops, so the decode threads keep working beside it (an AOTInductor
package does not: it holds the GIL for the whole forward pass and starves
decoding, which is why it is not used here).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: inductor options: freezing folds weights into constants (conv+BN folding,
#: prepacked oneDNN weights), which is where most of the CPU gain comes from.
#: One compile thread: no pool of compile-worker subprocesses beside the job's
#: own workers, and nothing left running if the job ends before compiling does.
COMPILE_OPTIONS: dict[str, Any] = {"freezing": True, "compile_threads": 1}


class CompiledForward:
    """Calls `fn(tensor) -> tensor`, switching to `torch.compile(fn)` once it is ready.

    Example::

        forward = CompiledForward(lambda x: model(pixel_values=x).logits, batch_size=8)
        with torch.inference_mode():
            logits = forward(pixel_values)  # eager at first, compiled later

    Args:
        fn: the eager forward function, one tensor in, one tensor out.
        batch_size: the batch size to compile for; other sizes run eagerly.
        enabled: False makes this a plain call of `fn`.
        background: compile in a background thread (True) or block the first
            full batch until compiled (False; for tests and benchmarks).
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        batch_size: int,
        enabled: bool = True,
        background: bool = True,
    ) -> None:
        self._fn = fn
        self._batch_size = batch_size
        self._enabled = enabled
        self._background = background
        self._lock = threading.Lock()
        self._started = False
        self._ready = threading.Event()
        self._compiled: Callable[[Any], Any] | None = None
        self._signature: tuple[Any, ...] | None = None
        self.compile_seconds: float | None = None
        self.failure: str | None = None
        self.compiled_calls = 0

    @property
    def ready(self) -> bool:
        return self._compiled is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started compile to finish; True if the compiled forward is ready."""
        if self._started:
            self._ready.wait(timeout)
        return self.ready

    @staticmethod
    def _signature_of(x: Any) -> tuple[Any, ...]:
        return (tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))

    def __call__(self, x: Any) -> Any:
        compiled = self._compiled
        if compiled is not None and self._signature_of(x) == self._signature:
            try:
                out = compiled(x)
                self.compiled_calls += 1
                if self.compiled_calls == 1:
                    logger.info("The compiled forward pass ran its first batch")
                return out
            except Exception as e:
                self._give_up(f"a compiled call failed: {type(e).__name__}: {e}")
        elif (
            self._enabled
            and not self._started
            and x.shape[0] == self._batch_size
            and self.failure is None
        ):
            self._start(x)
            if not self._background:
                return self(x)
        return self._fn(x)

    def _start(self, x: Any) -> None:
        import torch

        with self._lock:
            if self._started:
                return
            self._started = True
        example = torch.zeros_like(x)  # same shape, dtype, device and strides
        signature = self._signature_of(x)
        if self._background:
            threading.Thread(
                target=self._compile, args=(example, signature), name="compile-model", daemon=True
            ).start()
        else:
            self._compile(example, signature)

    def _compile(self, example: Any, signature: tuple[Any, ...]) -> None:
        import torch

        start = time.perf_counter()
        try:
            compiled = torch.compile(self._fn, dynamic=False, options=COMPILE_OPTIONS)
            with torch.inference_mode():
                compiled(example)  # compiles; runs once
        except Exception as e:
            self._give_up(f"compiling failed: {type(e).__name__}: {e}")
            self._ready.set()
            return
        self.compile_seconds = time.perf_counter() - start
        self._signature = signature
        self._compiled = compiled
        self._ready.set()
        logger.info(
            "Compiled the forward pass for batches of %s in %.1f s; switching from eager",
            list(signature[0]),
            self.compile_seconds,
        )

    def _give_up(self, reason: str) -> None:
        self._compiled = None
        self.failure = reason
        logger.warning("torch.compile is off for the rest of this job: %s", reason)
