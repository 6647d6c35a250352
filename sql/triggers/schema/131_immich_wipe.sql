-- Schema (append-only: never edit once released; add a new numbered file).
-- When Immich last emptied one of its result tables for a task (Smart Search "All" empties smart_search before it
-- writes every row again). Immich's writes after that are re-runs for every asset whose cnai run is older, though
-- each looks like a first write (sql/triggers/code/130_immich_reruns.sql). One row per task, written once per wipe.
CREATE TABLE IF NOT EXISTS cnai.immich_wipe (
  task text PRIMARY KEY CHECK (task IN ('clip', 'ocr', 'face')),
  wiped_at timestamptz NOT NULL
);
