-- Read-model rows that events update in place keep half of each page free, so an update can
-- put the row's new version on the same page (a HOT update: no index entry written, and the
-- old version pruned there). A ticket's row changes with every event of the ticket and a
-- subtask's row three times or more; a rebuild, which replays them all, copies these settings
-- to the tables it builds (projections/rebuild.py) and ran 1.3 to 1.5 times as fast with them
-- (BENCHMARKS.md, Read path). New pages only: existing rows move as they are updated.

ALTER TABLE rm_tickets SET (fillfactor = 50);
ALTER TABLE rm_subtasks SET (fillfactor = 50);
ALTER TABLE rm_tenant_counts SET (fillfactor = 50);
ALTER TABLE rm_questions SET (fillfactor = 50);
