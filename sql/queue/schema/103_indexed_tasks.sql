-- Schema (append-only: never edit once released; add a new numbered file): the tasks cnai indexes in the
-- background. Uploads, unhides and restores, Immich's own re-run buttons and requests that name no task make
-- jobs for these tasks only (cnai.indexed_tasks()); a request or backfill that names a task runs it whatever
-- this table says. cnai.face is read by nothing in cnai or Immich (Immich's own faces come from the gateway's
-- /predict answers), so faces are not indexed by default: a listener started with face in CNAI_TASKS adds it
-- (cnai.index_tasks), and `cnai tasks --drop TASK` removes one. Nothing removes a task by itself.
CREATE TABLE IF NOT EXISTS cnai.indexed_task (
  task text PRIMARY KEY CHECK (task IN ('clip', 'face', 'ocr')),
  since timestamptz NOT NULL DEFAULT now()
);

INSERT INTO cnai.indexed_task (task) VALUES ('clip'), ('ocr') ON CONFLICT (task) DO NOTHING;

-- A database that already did face work keeps doing it: before this table every upload made a face job, and an
-- install that ran them (results, runs recorded, jobs of any state) expects new photos to get faces too. On a new
-- database the result tables come later in the order (sql/results/schema/), hence the look-ups by name.
DO $$
DECLARE
  did_face_work boolean := EXISTS (SELECT FROM cnai.job WHERE task = 'face');
BEGIN
  IF NOT did_face_work AND to_regclass('cnai.face') IS NOT NULL THEN
    EXECUTE 'SELECT EXISTS (SELECT FROM cnai.face)' INTO did_face_work;
  END IF;
  IF NOT did_face_work AND to_regclass('cnai.task_run') IS NOT NULL THEN
    EXECUTE 'SELECT EXISTS (SELECT FROM cnai.task_run WHERE task = ''face'')' INTO did_face_work;
  END IF;
  IF did_face_work THEN
    INSERT INTO cnai.indexed_task (task) VALUES ('face') ON CONFLICT (task) DO NOTHING;
  END IF;
END $$;
