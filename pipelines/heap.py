"""The interpreter's cyclic garbage collector around a CLI run.

Start-up (importing torch, transformers and Beam, loading the model to check
it) makes about a million objects that live as long as the process, and
almost no garbage. With the collector on, its passes over them took a quarter
of start-up's CPU: imports and model load 4.6 s with it, 3.4 s without. At
exit the interpreter's last collection walks them once more (0.8 s of a
3,000-image run's tail). So the CLI (`label_images.main`):

- pauses the collector while the job module imports (for any importer) and,
  in the CLI, while the job is planned (`pause`, `resume`). The CLI
  (`pipelines.cli`, `python -m pipelines.label_images`) never turns it back on
  in between: the first pass after the import would walk the import's
  ~400,000 objects once (0.2 s);
- freezes what start-up made and turns the collector back on just before the
  pipeline runs (`freeze`): frozen objects are never traversed again, and what
  the run makes is collected as usual;
- freezes everything before the interpreter exits (`freeze`).

Nothing is lost by freezing without a collection first: the garbage of
start-up is a few thousand small objects, and a model dropped after its check
is freed by reference counting (tested). A library caller's process, or a
test's, keeps its collector as it was: only the import is paused there.
"""

from __future__ import annotations

import gc


def pause() -> bool:
    """Turn the collector off; whether it was on, for `resume`."""
    was_enabled = gc.isenabled()
    gc.disable()
    return was_enabled


def resume(was_enabled: bool) -> None:
    """Turn the collector back on if `pause` found it on."""
    if was_enabled:
        gc.enable()


def freeze() -> None:
    """Move every object alive now out of the collector's reach for good, and
    turn the collector on for what comes after."""
    gc.freeze()
    gc.enable()
