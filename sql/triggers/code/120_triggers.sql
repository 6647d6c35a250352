-- Code (re-applied whenever this file changes): the triggers that fill the queue.
-- They run inside other roles' statements (Immich writes asset_file with its own role; anyone may INSERT INTO
-- reprocess_request), so they are SECURITY DEFINER with a pinned search_path, and name every table by schema:
-- the writer needs no privilege on schema cnai, and no object of its search_path can stand in for ours.
-- NOTIFY is only a wake-up hint: listeners also poll, so a lost notification delays work, never loses it.

-- Validate and normalise a request before it is stored: a bad request fails loudly instead of doing nothing.
CREATE OR REPLACE FUNCTION cnai.check_reprocess_request() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  bad text;
BEGIN
  IF NEW.asset_id IS NULL THEN
    RAISE EXCEPTION 'reprocess_request: asset_id is required' USING ERRCODE = 'not_null_violation';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM public.asset WHERE id = NEW.asset_id) THEN
    RAISE EXCEPTION 'reprocess_request: asset % does not exist', NEW.asset_id
      USING ERRCODE = 'foreign_key_violation', HINT = 'use an id from the asset table';
  END IF;
  SELECT string_agg(quote_literal(t), ', ') INTO bad
    FROM unnest(NEW.tasks) t WHERE t IS NULL OR NOT (t = ANY (cnai.all_tasks()));
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION 'reprocess_request: unknown task %', bad
      USING ERRCODE = 'check_violation',
            HINT = format('tasks must be a subset of %s; NULL or {} means all', cnai.all_tasks());
  END IF;
  IF NEW.tasks IS NULL OR cardinality(NEW.tasks) = 0 THEN
    NEW.tasks := cnai.all_tasks();
  ELSE
    NEW.tasks := ARRAY(SELECT DISTINCT t FROM unnest(NEW.tasks) t ORDER BY t);
  END IF;
  NEW.status := 'pending';
  NEW.error := NULL;
  NEW.finished_at := NULL;
  RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER cnai_check_reprocess_request BEFORE INSERT ON public.reprocess_request
  FOR EACH ROW EXECUTE FUNCTION cnai.check_reprocess_request();

-- Requests go ahead of background work (priority 0) and reset the retry budget of a job they join.
CREATE OR REPLACE FUNCTION cnai.enqueue_reprocess_requests() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  WITH wanted AS (
    SELECT r.id AS request_id, r.asset_id, t.task FROM new_rows r CROSS JOIN LATERAL unnest(r.tasks) AS t(task)
  ), jobs AS (
    INSERT INTO cnai.job AS j (asset_id, task, priority)
    SELECT DISTINCT asset_id, task, 0::smallint FROM wanted
    ON CONFLICT (asset_id, task) WHERE state = 'queued'
      DO UPDATE SET priority = 0, attempts = 0, run_after = now()
    RETURNING j.id, j.asset_id, j.task
  )
  INSERT INTO cnai.request_job (request_id, job_id)
  SELECT w.request_id, jobs.id FROM wanted w JOIN jobs USING (asset_id, task)
  ON CONFLICT DO NOTHING;
  PERFORM pg_notify('cnai_job', 'request');
  RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER cnai_enqueue_reprocess_requests AFTER INSERT ON public.reprocess_request
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cnai.enqueue_reprocess_requests();

-- Immich writes a preview row (INSERT ... ON CONFLICT DO UPDATE, path possibly unchanged) once it has rendered
-- the preview JPEG; that is when our work can start. One statement-level trigger per event: one INSERT into the
-- intake and at most one NOTIFY per statement, whatever the row count. Never raises into Immich's transaction.
CREATE OR REPLACE FUNCTION cnai.enqueue_preview_files() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- most statements without a preview (thumbnails, the UPDATE half of an upsert that inserted) stop here,
  -- before the exception block's subtransaction
  IF NOT EXISTS (SELECT FROM new_rows f WHERE f.type::text = 'preview') THEN
    RETURN NULL;
  END IF;
  BEGIN
    INSERT INTO cnai.job_intake (asset_id)
    SELECT f."assetId" FROM new_rows f WHERE f.type::text = 'preview';
    PERFORM pg_notify('cnai_job', 'preview');
  EXCEPTION WHEN OTHERS THEN
    DECLARE
      reason text := 'enqueue failed in trigger on asset_file: ' || SQLERRM;
    BEGIN
      INSERT INTO cnai.job (asset_id, task, state, error, finished_at)
      SELECT DISTINCT f."assetId", t.task, 'failed', reason, now()
        FROM new_rows f CROSS JOIN unnest(cnai.all_tasks()) AS t(task) WHERE f.type::text = 'preview';
      RAISE WARNING 'cnai: %', reason;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'cnai: % (and logging it failed: %)', reason, SQLERRM;
    END;
  END;
  RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER cnai_enqueue_preview_insert AFTER INSERT ON public.asset_file
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cnai.enqueue_preview_files();
CREATE OR REPLACE TRIGGER cnai_enqueue_preview_update AFTER UPDATE ON public.asset_file
  REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cnai.enqueue_preview_files();
