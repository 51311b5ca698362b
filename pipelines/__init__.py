"""Composed Beam jobs and their entry points."""

import time as _time

#: When this package was first imported: the job's first own line, a few tens of
#: milliseconds after its interpreter started (`pipelines.clock.process_started_at`).
IMPORTED_AT = _time.time()
