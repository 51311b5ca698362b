"""Reading the input: `plan_input` once at build time, `ReadImageRows` on the workers.

One module per kind of format (`manifest`, `tables`, `webdataset`), what they
share in `plan`, and the reading itself in `read`.
"""

from transforms.images.sources.plan import InputError, InputPlan
from transforms.images.sources.read import (
    FORMATS,
    ReadImageRows,
    count_rows,
    plan_input,
    read_rows_here,
)

__all__ = [
    "FORMATS",
    "InputError",
    "InputPlan",
    "ReadImageRows",
    "count_rows",
    "plan_input",
    "read_rows_here",
]
