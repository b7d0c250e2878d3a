"""Routing and completeness: which projects a study belongs to, and when it is complete.

* :mod:`.config`: a project's ``routing`` and ``completeness`` sections (its ``SECTION``);
* :mod:`.router`: the routing decision for one series; :mod:`.coupling`: coupling lists;
* :mod:`.tracker`: the scheduled scan of the index that routes, labels and completes studies
  and creates their pipeline runs; :mod:`.assign`: ``fiona ingest --project``;
* :mod:`.explain`: ``fiona explain``'s dry run.
"""
