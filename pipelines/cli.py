"""The `label-images` command.

A console script imports its entry point's module, then calls the entry
point. Entered here, the job module (`pipelines.label_images`) is imported
with the collector already paused and left paused, so `label_images.main`
freezes what the import made together with the rest of start-up (see
`pipelines.heap`). Entered at `pipelines.label_images:main`, the import would
turn the collector back on, and its first pass would walk the import's
~400,000 objects once: 0.2 s of every run.
"""

from __future__ import annotations

from pipelines import heap


def main() -> None:
    heap.pause()
    from pipelines.label_images import main as job_main

    job_main()
