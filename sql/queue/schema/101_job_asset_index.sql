-- Schema (append-only: never edit once released; add a new numbered file).
-- Every foreign key that cascades from Immich's asset needs an index on its column: Immich deletes assets one
-- `DELETE FROM asset WHERE id = $1` at a time (emptying the trash), and each cascade looks up the referencing
-- rows inside Immich's transaction. cnai.job's asset_id had only partial indexes (queued / running), so every
-- delete scanned the whole job history (500 deletes over 60k jobs: 7 s instead of 0.1 s). The other cascading
-- columns were covered already: cnai.ocr and cnai.clip (primary keys), cnai.face (face_asset),
-- reprocess_request (reprocess_request_asset), cnai.request_job (its primary key, request_job_job).
-- tests/test_deletes.py checks every cascading key of cnai's tables against the catalog.
CREATE INDEX IF NOT EXISTS job_asset ON cnai.job (asset_id);
