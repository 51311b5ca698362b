"""`--model-copies` and `--share-model-across-processes`: one model served to the workers.

RunInference then hands the handler a proxy of the loaded model, living in a
separate server process, instead of the model itself. A proxy passes calls, not
attribute reads, so these runs must label every row exactly as a run with a
model per worker does (the GPU config, `configs/dataflow-gpu.yaml`, uses
`model_copies: 1`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import classifier_handler, read_output, run_job

pytestmark = pytest.mark.slow


@pytest.fixture()
def manifest(photo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "images.txt"
    path.write_text("\n".join(sorted(str(p) for p in photo_dir.glob("*.jpg"))) + "\n")
    return path


@pytest.mark.parametrize(
    "sharing", [["--model-copies", "1"], ["--share-model-across-processes", "true"]]
)
@pytest.mark.parametrize("task", ["image-classification", "zero-shot-image-classification"])
def test_a_shared_model_labels_every_row_as_a_private_one(
    request: pytest.FixtureRequest,
    manifest: Path,
    tmp_path: Path,
    sharing: list[str],
    task: str,
) -> None:
    model = request.getfixturevalue("tiny_vit" if task == "image-classification" else "tiny_clip")
    common = ["--input", str(manifest), "--model", str(model), "--task", task, "--batch-size", "2"]
    if task != "image-classification":
        common += ["--candidate-labels", "a cat,a cup of coffee,a rocket"]
    assert run_job([*common, "--output", str(tmp_path / "private")]) == 0
    assert run_job([*common, "--output", str(tmp_path / "shared"), *sharing]) == 0
    private = read_output(tmp_path / "private").sort_by("uri").to_pydict()
    shared = read_output(tmp_path / "shared").sort_by("uri").to_pydict()
    assert set(shared["status"]) == {"ok"}, shared["error"]
    assert shared["uri"] == private["uri"]
    assert shared["labels"] == private["labels"]
    for mine, theirs in zip(shared["scores"], private["scores"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-5)


@pytest.mark.parametrize(
    ("options", "preloads"),
    [({}, True), ({"model_copies": 1}, False), ({"share_model_across_processes": True}, False)],
)
def test_a_shared_model_is_not_preloaded_in_the_launcher(
    tiny_vit: Path, options: dict[str, Any], preloads: bool
) -> None:
    """RunInference loads a shared model in its own server process; a launcher copy is waste."""
    handler = classifier_handler(tiny_vit, **options)
    handler.preload()
    assert (handler._preloaded.take() is not None) == preloads
