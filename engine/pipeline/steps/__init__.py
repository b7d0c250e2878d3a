"""Every pipeline step type, registered in one place.

Adding a step type (``consent``, ``anonymize``, ``send``) is one module here with a
:class:`~engine.pipeline.steps.base.Step` subclass, one schema fragment
``schemas/steps/<name>.schema.json``, one test, and one line in :data:`STEPS`. A name that is not
in :data:`STEPS` is an error at ``fiona validate``, never a silent skip at run time.
"""

from __future__ import annotations

from engine.pipeline.steps.anonymize import AnonymizeStep
from engine.pipeline.steps.base import JsonPath, Step, step_schema_file
from engine.pipeline.steps.classify import ClassifyStep
from engine.pipeline.steps.consent import ConsentStep
from engine.pipeline.steps.convert import ConvertStep
from engine.pipeline.steps.copy import CopyStep
from engine.pipeline.steps.select import SelectStep
from engine.pipeline.steps.send import SendStep

__all__ = [
    "STEPS",
    "AnonymizeStep",
    "ClassifyStep",
    "ConsentStep",
    "ConvertStep",
    "CopyStep",
    "JsonPath",
    "SelectStep",
    "SendStep",
    "Step",
    "step_schema_file",
]

#: Step type name (``step:`` in a project file) -> its class.
STEPS: dict[str, type[Step]] = {
    "classify": ClassifyStep,
    "select": SelectStep,
    "consent": ConsentStep,
    "anonymize": AnonymizeStep,
    "copy": CopyStep,
    "convert": ConvertStep,
    "send": SendStep,
}


def _check_registry() -> None:
    """Each entry's key is its class's ``name`` (checked once, at import)."""
    for key, cls in STEPS.items():
        if getattr(cls, "name", None) != key:
            raise TypeError(f"STEPS[{key!r}] is {cls.__name__}, whose name is not {key!r}")


_check_registry()
