-- Schema (append-only: never edit once released; add a new numbered file): that a task ran on an asset, and with
-- which model. Written in the transaction that writes the task's result, so a run that found nothing (a photo
-- without faces, without text) counts as done too; `cnai backfill` queues what has no row here, or a row of
-- another model than the install's.
CREATE TABLE IF NOT EXISTS cnai.task_run (
  asset_id uuid NOT NULL REFERENCES public.asset(id) ON DELETE CASCADE,
  task text NOT NULL CHECK (task IN ('clip', 'ocr', 'face')),
  model text NOT NULL,            -- the name the task's handler records (cnai/wiring.py build_handlers)
  ran_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (asset_id, task)    -- also the index the cascading foreign key needs
);

-- Databases that had results before this table: those results count as runs (once, when this file is applied).
-- Every OCR result so far came from RapidOCR, recorded here under the OCR handler's name, 'rapidocr'
-- (cnai.ocr.model holds the detailed version).
INSERT INTO cnai.task_run (asset_id, task, model, ran_at)
SELECT asset_id, 'ocr', 'rapidocr', updated_at FROM cnai.ocr
UNION ALL
SELECT asset_id, 'clip', model, updated_at FROM cnai.clip
UNION ALL
SELECT asset_id, 'face', min(model), max(updated_at) FROM cnai.face GROUP BY asset_id
ON CONFLICT (asset_id, task) DO NOTHING;
