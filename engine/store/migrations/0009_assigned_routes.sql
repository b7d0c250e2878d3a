-- fiona index, version 9: routes assigned by an operator (fiona ingest --project).
-- An assigned route gives the study to its project whatever the routing criteria say: while a
-- study has one, the scan does not route the study's new series by the projects' criteria, and
-- it is never held as ambiguous.
ALTER TABLE study_routes ADD COLUMN assigned INTEGER NOT NULL DEFAULT 0; -- 1: assigned
