-- Code (re-applied whenever this file changes): the triggers that fill the queue.
-- They run inside other roles' statements (Immich writes asset_file with its own role; anyone may INSERT INTO
-- reprocess_request), so they are SECURITY DEFINER with a pinned search_path, and name every table by schema:
-- the writer needs no privilege on schema cnai, and no object of its search_path can stand in for ours.
-- NOTIFY is only a wake-up hint: listeners also poll, so a lost notification delays work, never loses it.

-- Which assets and previews cnai works on: the ones Immich's own ML jobs would (Immich 3.1,
-- server/src/repositories/asset-job.repository.ts and the smart-info, person and ocr services).
--  * Hidden assets are skipped (visibility 'hidden': the video half of a live photo, for one). Immich's queue-all
--    queries leave them out, and its CLIP, face and OCR jobs return "skipped" for them.
--  * Trashed assets ("deletedAt" set) are skipped: Immich's queue-all queries leave them out, and search hides them.
--  * The preview read is the unedited one (asset_file type 'preview', "isEdited" false): Immich's OCR job reads
--    exactly that row (getForOcr), and its CLIP and face jobs refuse an asset with more than one preview. An
--    edit writes an extra "isEdited" row and re-runs none of Immich's ML (it only hides faces and OCR lines
--    outside the crop), so an edited preview enqueues nothing here either.
-- How cnai follows these rules:
--  * the asset_file trigger enqueues an unedited preview of an asset that is neither hidden nor trashed;
--  * an asset that becomes hidden or trashed loses its queued jobs (requests waiting on them fail, saying why);
--    its results stay, so a restored photo is found again at once;
--  * an asset that is unhidden or restored is queued again (the indexed tasks), as Immich re-runs its ML when it
--    shows a hidden asset again: work dropped while it was away is done then;
--  * reprocess_request refuses hidden and trashed assets;
--  * listeners read the preview cnai.job_preview_paths names, and fail a job it gives a skip reason for.

-- Why cnai does not work on an asset now (NULL: it does).
CREATE OR REPLACE FUNCTION cnai.asset_skip_reason(visibility text, deleted_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN deleted_at IS NOT NULL THEN 'asset is in the trash'
            WHEN visibility = 'hidden' THEN 'asset is hidden (Immich''s own ML skips hidden assets too)' END;

-- The preview a listener reads for each of these assets, as Immich's job would; or, for an asset cnai does not
-- work on or that has no unedited preview yet, why not. One row per asset that exists.
CREATE OR REPLACE FUNCTION cnai.job_preview_paths(p_asset_ids uuid[])
RETURNS TABLE (asset_id uuid, path text, skip_reason text) LANGUAGE sql STABLE AS $$
  SELECT a.id,
         CASE WHEN r.reason IS NULL THEN f.path::text END,
         coalesce(r.reason, CASE WHEN f.path IS NULL THEN 'asset has no unedited preview in asset_file' END)
    FROM public.asset a
    CROSS JOIN LATERAL (SELECT cnai.asset_skip_reason(a.visibility::text, a."deletedAt") AS reason) r
    LEFT JOIN public.asset_file f ON f."assetId" = a.id AND f.type::text = 'preview' AND NOT f."isEdited"
   WHERE a.id = ANY (p_asset_ids);
$$;

-- Validate and normalise a request before it is stored: a bad request fails loudly instead of doing nothing.
CREATE OR REPLACE FUNCTION cnai.check_reprocess_request() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  bad text;
  skip text;
BEGIN
  IF NEW.asset_id IS NULL THEN
    RAISE EXCEPTION 'reprocess_request: asset_id is required' USING ERRCODE = 'not_null_violation';
  END IF;
  SELECT cnai.asset_skip_reason(a.visibility::text, a."deletedAt") INTO skip FROM public.asset a WHERE a.id = NEW.asset_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'reprocess_request: asset % does not exist', NEW.asset_id
      USING ERRCODE = 'foreign_key_violation', HINT = 'use an id from the asset table';
  END IF;
  IF skip IS NOT NULL THEN
    RAISE EXCEPTION 'reprocess_request: % (asset %)', skip, NEW.asset_id
      USING ERRCODE = 'check_violation', HINT = 'restore or unhide it first; it is then queued again by itself';
  END IF;
  SELECT string_agg(quote_literal(t), ', ') INTO bad
    FROM unnest(NEW.tasks) t WHERE t IS NULL OR NOT (t = ANY (cnai.all_tasks()));
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION 'reprocess_request: unknown task %', bad
      USING ERRCODE = 'check_violation',
            HINT = format('tasks must be a subset of %s; NULL or {} means the indexed tasks, %s',
                          cnai.all_tasks(), cnai.indexed_tasks());
  END IF;
  IF NEW.tasks IS NULL OR cardinality(NEW.tasks) = 0 THEN
    NEW.tasks := cnai.indexed_tasks();
    IF cardinality(NEW.tasks) = 0 THEN  -- it would wait on no job, forever
      RAISE EXCEPTION 'reprocess_request: no task is indexed, so a request must name its tasks'
        USING ERRCODE = 'check_violation', HINT = format('name some of %s', cnai.all_tasks());
    END IF;
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
-- Only previews Immich's own ML would read count (see the rules at the top).
CREATE OR REPLACE FUNCTION cnai.enqueue_preview_files() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  -- most statements without an unedited preview (thumbnails, edits, the UPDATE half of an upsert that
  -- inserted) stop here, before the exception block's subtransaction
  IF NOT EXISTS (SELECT FROM new_rows f WHERE f.type::text = 'preview' AND NOT f."isEdited") THEN
    RETURN NULL;
  END IF;
  BEGIN
    INSERT INTO cnai.job_intake (asset_id)
    SELECT f."assetId" FROM new_rows f JOIN public.asset a ON a.id = f."assetId"
     WHERE f.type::text = 'preview' AND NOT f."isEdited"
       AND cnai.asset_skip_reason(a.visibility::text, a."deletedAt") IS NULL;
    IF FOUND THEN
      PERFORM pg_notify('cnai_job', 'preview');
    END IF;
  EXCEPTION WHEN OTHERS THEN
    DECLARE
      reason text := 'enqueue failed in trigger on asset_file: ' || SQLERRM;
    BEGIN
      INSERT INTO cnai.job (asset_id, task, state, error, finished_at)
      SELECT DISTINCT f."assetId", t.task, 'failed', reason, now()
        FROM new_rows f CROSS JOIN unnest(cnai.indexed_tasks()) AS t(task)
       WHERE f.type::text = 'preview' AND NOT f."isEdited";
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

-- An asset that is hidden or trashed, or shown or restored again (see the rules at the top). A row trigger whose
-- WHEN is false for every other update: Immich's many asset updates (favourites, metadata, stacks) never call it,
-- and a statement that sets neither column never even evaluates it. Never raises into Immich's transaction.
CREATE OR REPLACE FUNCTION cnai.follow_asset_visibility() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  skip text := cnai.asset_skip_reason(NEW.visibility::text, NEW."deletedAt");
BEGIN
  BEGIN
    IF skip IS NOT NULL THEN
      -- its queued work would only be thrown away: drop it, and tell the requests that waited on it
      UPDATE public.reprocess_request q
         SET status = 'failed', error = skip || ' (its queued work was dropped)', finished_at = now()
       WHERE q.status IN ('pending', 'running')
         AND q.id IN (SELECT rj.request_id FROM cnai.job j JOIN cnai.request_job rj ON rj.job_id = j.id
                       WHERE j.asset_id = NEW.id AND j.state = 'queued');
      DELETE FROM cnai.job WHERE asset_id = NEW.id AND state = 'queued';
    ELSE
      INSERT INTO cnai.job_intake (asset_id)
      SELECT NEW.id WHERE EXISTS (SELECT FROM public.asset_file f WHERE f."assetId" = NEW.id
                                     AND f.type::text = 'preview' AND NOT f."isEdited");
      IF FOUND THEN
        PERFORM pg_notify('cnai_job', 'shown');
      END IF;
    END IF;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cnai: following asset % (hidden, trashed, shown or restored) failed: %', NEW.id, SQLERRM;
  END;
  RETURN NULL;
END $$;

-- The WHEN spells out cnai.asset_skip_reason's rule with built-in operators only: it runs with the writer's
-- privileges (Immich's role), which need not reach anything in schema cnai.
CREATE OR REPLACE TRIGGER cnai_follow_asset_visibility AFTER UPDATE OF visibility, "deletedAt" ON public.asset
  FOR EACH ROW
  WHEN ((OLD.visibility::text = 'hidden' OR OLD."deletedAt" IS NOT NULL)
        IS DISTINCT FROM (NEW.visibility::text = 'hidden' OR NEW."deletedAt" IS NOT NULL))
  EXECUTE FUNCTION cnai.follow_asset_visibility();
