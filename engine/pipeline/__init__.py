"""The pipeline interpreter: a project's steps (classify, select, copy, ...) run on each study.

A project file lists its pipeline as data::

    pipeline:
      - step: classify
      - step: select
        labels: [t1, flair]
      - step: copy
        to: /srv/research/example

* :mod:`.outcome`: what a step returns (``Done``, ``Quarantined``, ``Retry``);
* :mod:`.context`: what a step sees (``RunContext``, ``SeriesInput``);
* :mod:`.steps`: the step types, registered in ``STEPS``, each with a schema fragment
  ``schemas/steps/<name>.schema.json``;
* :mod:`.validate`: ``check_pipeline`` (for ``fiona validate``) and ``build_pipeline``;
* :mod:`.store`: durable runs in the index database (``RunStore``);
* :mod:`.runner`: ``PipelineRunner``, which runs them, resuming after a restart;
* the REDCap features that act on runs: :mod:`.consent_recheck` (studies held for want of
  consent, looked up again), :mod:`.transfer_requests` (runs requested in REDCap) and
  :mod:`.redcap_jobs` (their scheduler jobs); the ``consent`` step and research IDs
  (:mod:`.steps.research_ids`) use :mod:`engine.redcap`, which knows nothing of pipelines.
"""

from engine.pipeline.context import RunContext, SeriesInput
from engine.pipeline.outcome import Done, Outcome, Quarantined, Retry

__all__ = ["Done", "Outcome", "Quarantined", "Retry", "RunContext", "SeriesInput"]
