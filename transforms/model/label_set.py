"""Candidate labels and prompt templates for zero-shot classification."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."


class LabelSetError(ValueError):
    """Candidate labels or templates that cannot be used; the message says which."""


@dataclass(frozen=True)
class LabelSet:
    """Candidate labels and the hypothesis templates that turn them into prompts.

    With several templates, the label's text embedding is the mean of its
    normalized per-template embeddings, normalized again (prompt ensembling, as
    in the CLIP paper's ImageNet evaluation).
    """

    labels: tuple[str, ...]
    templates: tuple[str, ...] = (DEFAULT_HYPOTHESIS_TEMPLATE,)

    def __post_init__(self) -> None:
        if not self.labels:
            raise LabelSetError(
                "zero-shot classification needs candidate labels: pass --candidate-labels "
                "or --candidate-labels-file"
            )
        empty = [i for i, label in enumerate(self.labels) if not label.strip()]
        if empty:
            raise LabelSetError(f"candidate label(s) at position(s) {empty} are empty")
        seen: dict[str, int] = {}
        duplicates: list[str] = []
        for label in self.labels:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] == 2:
                duplicates.append(label)
        if duplicates:
            raise LabelSetError(f"duplicate candidate label(s): {duplicates}")
        if not self.templates:
            raise LabelSetError("at least one hypothesis template is needed")
        for template in self.templates:
            if "{}" not in template:
                raise LabelSetError(
                    f"hypothesis template {template!r} has no '{{}}' where the label goes"
                )

    def digest(self) -> str:
        """A short hash of the label list (and templates), for metadata and resume."""
        payload = json.dumps([list(self.labels), list(self.templates)], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def prompts(self, template: str) -> list[str]:
        return [template.format(label) for label in self.labels]


def is_sigmoid_family(model_type: str) -> bool:
    """SigLIP-like models score each label independently (as transformers does)."""
    return "siglip" in model_type
