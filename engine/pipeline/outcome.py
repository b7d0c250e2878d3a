"""What a pipeline step returns: one of three typed outcomes, never None.

* :class:`Done`: the step finished; the runner records it and moves to the next step.
* :class:`Quarantined`: the study must not go further; ``reason`` is a machine-readable code
  (``nothing_selected``, ...) and ``detail`` a sentence for people. The run stops and the study
  is filed in the quarantine.
* :class:`Retry`: not now (a destination is down, a lock is held); the run is tried again
  ``after`` seconds later, from this step.

``detail`` and ``reason`` end up in the index, the quarantine and the log: they never quote a
header value (no names, IDs or descriptions), only counts, codes and config values.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Done", "Outcome", "Quarantined", "Retry", "is_outcome"]


@dataclass(frozen=True)
class Done:
    """The step finished; ``detail`` says what it did (``"3 series labelled"``)."""

    detail: str = ""


@dataclass(frozen=True)
class Quarantined:
    """The study stops here and is held: ``reason`` is a code, ``detail`` explains it."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Retry:
    """Try this step again in ``after`` seconds; ``reason`` says why (a code or a short text)."""

    reason: str
    after: float

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ValueError(f"Retry.after must be 0 or more seconds, not {self.after}")


Outcome = Done | Quarantined | Retry


def is_outcome(value: object) -> bool:
    """Whether ``value`` is a :data:`Outcome` (a step that returns anything else is a bug)."""
    return isinstance(value, Done | Quarantined | Retry)
