-- Code (re-applied whenever this file changes): Immich's own reprocess buttons re-run cnai's matching tasks.
--
-- What Immich 3.1 writes when its ML jobs run (recorded button by button: tests/fixtures/immich/README.md,
-- reprocess.json):
--  * Smart Search (All, Missing, and after each upload): one smart_search upsert per asset. "All" first empties
--    the table (DELETE FROM smart_search, then resizes the column). A CLIP model change in Immich empties it the
--    same way, and the database cannot tell the two apart: after a model change, Immich's next Smart Search run
--    re-runs cnai's CLIP too.
--  * OCR (All, Missing, upload): one asset_job_status."ocrAt" upsert per asset, also for a photo without text.
--  * Face Detection (Reset, Refresh, Missing, upload) and the asset menu's Refresh faces: one
--    asset_job_status."facesRecognizedAt" upsert per asset, also when the faces found are the same.
--  * Regenerate thumbnail (asset menu; Generate Thumbnails All) writes no row cnai can follow (the preview keeps
--    its path): only a front door that sees the request can act on it.
--
-- Each upload makes Immich write the same rows, and cnai already queues an upload from its preview
-- (120_triggers.sql): a write must not double that work. So, per asset and task:
--  * a RE-RUN by Immich queues the task unless cnai has it queued or running already. A re-run is "ocrAt" or
--    "facesRecognizedAt" set where it was set before, or a smart_search row written after Immich emptied the
--    table (cnai.immich_wipe) on an asset whose cnai run is older than that;
--  * a FIRST run (the upload flow; "Missing" for an asset Immich never did) queues the task only where cnai has
--    nothing either: no run recorded (cnai.task_run), nothing queued or running.
-- A smart_search row overwritten is no re-run by itself: in the upload flow cnai's listener may have mirrored its
-- own vector there first. cnai's own writes to smart_search are marked (setting cnai.writer, set by
-- cnai.mirror_to_smart_search) and ignored. A preview still waiting in cnai.job_intake is not looked up (that
-- table has no index, to keep asset_file writes cheap): a job queued here meets it in cnai.take_intake, which
-- coalesces the two.
-- Priority 1 (background), as for an upload: Immich writes one row per statement for one asset's button and for
-- "All" over the whole library alike, so nothing here tells a person's press from a library-wide run, and
-- priority 0 would put an "All" over 200k photos ahead of every upload for hours. A person's reprocess_request
-- (priority 0) still goes first and lifts a job it joins.
-- As every trigger on Immich's tables: SECURITY DEFINER with a pinned search_path, one call per Immich statement
-- (transition tables; each event its own trigger), at most one NOTIFY, hidden and trashed assets skipped, assets
-- that are gone (Immich's delete cascading to these tables) ignored, and never an error in Immich's transaction.

-- Queue p_task for the assets Immich just ran it on, by the rule above; p_reruns[i]: Immich had run it on
-- p_asset_ids[i] before (NULL: a first run). Only a task cnai indexes (cnai.indexed_tasks()): Immich's Face
-- Detection makes no cnai face job while cnai does not index faces. Returns how many jobs were queued.
CREATE OR REPLACE FUNCTION cnai.queue_after_immich_run(p_task text, p_asset_ids uuid[], p_reruns boolean[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  last_wipe timestamptz := coalesce((SELECT w.wiped_at FROM cnai.immich_wipe w WHERE w.task = p_task),
                                    '-infinity');
  this_asset uuid;
  n bigint := 0;
  added bigint;
BEGIN
  IF NOT p_task = ANY (cnai.indexed_tasks()) THEN
    RETURN 0;
  END IF;
  -- An asset at a time, each lookup by key: Immich writes one asset per statement, and the plans of these lookups
  -- are made once and kept (a join over the array is planned anew on every call, at several times its running
  -- cost: bench/trigger_cost.py).
  FOR i IN 1 .. coalesce(cardinality(p_asset_ids), 0) LOOP
    this_asset := p_asset_ids[i];
    CONTINUE WHEN this_asset IS NULL;
    CONTINUE WHEN NOT coalesce(p_reruns[i], false)
                  AND EXISTS (SELECT FROM cnai.task_run t
                               WHERE t.asset_id = this_asset AND t.task = p_task AND t.ran_at >= last_wipe);
    CONTINUE WHEN EXISTS (SELECT FROM cnai.job j
                           WHERE j.asset_id = this_asset AND j.task = p_task AND j.state IN ('queued', 'running'));
    -- The asset before its job, in Immich's lock order (110_queue_ops.sql), and without waiting: Immich may be
    -- deleting this asset right now, its cascade waiting on the row this statement of Immich's holds.
    PERFORM FROM public.asset a
      WHERE a.id = this_asset AND cnai.asset_skip_reason(a.visibility::text, a."deletedAt") IS NULL
      FOR KEY SHARE SKIP LOCKED;
    CONTINUE WHEN NOT FOUND;  -- gone, being deleted, hidden or trashed
    INSERT INTO cnai.job (asset_id, task, priority) VALUES (this_asset, p_task, 1)
    ON CONFLICT (asset_id, task) WHERE state = 'queued' DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    n := n + added;
  END LOOP;
  RETURN n;
END $$;

-- The same, for a trigger: a failure is reported as failed jobs of the assets that exist (`cnai status` shows
-- them) and a WARNING, never raised into the writer's statement. Returns how many jobs were queued.
CREATE OR REPLACE FUNCTION cnai.queue_after_immich_run_or_log(p_table text, p_task text, p_asset_ids uuid[],
                                                              p_reruns boolean[])
RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
  RETURN cnai.queue_after_immich_run(p_task, p_asset_ids, p_reruns);
EXCEPTION WHEN OTHERS THEN
  DECLARE
    reason text := format('enqueue failed in trigger on %s: %s', p_table, SQLERRM);
  BEGIN
    INSERT INTO cnai.job (asset_id, task, state, error, finished_at)
    SELECT a.id, p_task, 'failed', reason, now() FROM public.asset a WHERE a.id = ANY (p_asset_ids)
       FOR KEY SHARE SKIP LOCKED;
    RAISE WARNING 'cnai: %', reason;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cnai: % (and logging it failed: %)', reason, SQLERRM;
  END;
  RETURN 0;
END $$;

-- asset_job_status: "ocrAt" (OCR) or "facesRecognizedAt" (faces) set, by an INSERT or an UPDATE.
CREATE OR REPLACE FUNCTION cnai.follow_immich_job_status() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  ocr_ids uuid[];
  ocr_reruns boolean[];
  face_ids uuid[];
  face_reruns boolean[];
  queued bigint := 0;
BEGIN
  -- the half of an upsert that wrote no row stops here (this reads no column, so it cannot fail)
  IF NOT EXISTS (SELECT FROM new_rows) THEN
    RETURN NULL;
  END IF;
  BEGIN
    IF TG_OP = 'INSERT' THEN  -- a new row: first runs
      SELECT array_agg(n."assetId") FILTER (WHERE n."ocrAt" IS NOT NULL),
             array_agg(n."assetId") FILTER (WHERE n."facesRecognizedAt" IS NOT NULL)
        INTO ocr_ids, face_ids
        FROM new_rows n;
    ELSE
      SELECT array_agg(n."assetId") FILTER (WHERE n."ocrAt" IS DISTINCT FROM o."ocrAt" AND n."ocrAt" IS NOT NULL),
             array_agg(o."ocrAt" IS NOT NULL)
               FILTER (WHERE n."ocrAt" IS DISTINCT FROM o."ocrAt" AND n."ocrAt" IS NOT NULL),
             array_agg(n."assetId") FILTER (WHERE n."facesRecognizedAt" IS DISTINCT FROM o."facesRecognizedAt"
                                              AND n."facesRecognizedAt" IS NOT NULL),
             array_agg(o."facesRecognizedAt" IS NOT NULL) FILTER (WHERE n."facesRecognizedAt" IS DISTINCT FROM
                                                                    o."facesRecognizedAt"
                                                                  AND n."facesRecognizedAt" IS NOT NULL)
        INTO ocr_ids, ocr_reruns, face_ids, face_reruns
        FROM new_rows n JOIN old_rows o ON o."assetId" = n."assetId";
    END IF;
    IF ocr_ids IS NOT NULL THEN
      queued := queued + cnai.queue_after_immich_run_or_log('asset_job_status', 'ocr', ocr_ids, ocr_reruns);
    END IF;
    IF face_ids IS NOT NULL THEN
      queued := queued + cnai.queue_after_immich_run_or_log('asset_job_status', 'face', face_ids, face_reruns);
    END IF;
    IF queued > 0 THEN
      PERFORM pg_notify('cnai_job', 'immich');
    END IF;
  EXCEPTION WHEN OTHERS THEN  -- e.g. Immich renamed a column
    RAISE WARNING 'cnai: following Immich''s write to asset_job_status failed: %', SQLERRM;
  END;
  RETURN NULL;
END $$;

-- smart_search: a row written (CLIP), or the table emptied. (Each branch names only the transition table its
-- event has.)
CREATE OR REPLACE FUNCTION cnai.follow_immich_smart_search() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  asset_ids uuid[];
  wiped boolean := false;
BEGIN
  IF current_setting('cnai.writer', true) = 'listener' THEN
    RETURN NULL;  -- cnai's own CLIP result, mirrored by its listener
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    -- the half of an upsert that wrote no row stops here (this reads no column, so it cannot fail)
    IF NOT EXISTS (SELECT FROM new_rows) THEN
      RETURN NULL;
    END IF;
    BEGIN
      SELECT array_agg(n."assetId") INTO asset_ids FROM new_rows n;
      IF cnai.queue_after_immich_run_or_log('smart_search', 'clip', asset_ids, NULL) > 0 THEN
        PERFORM pg_notify('cnai_job', 'immich');
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'cnai: following Immich''s write to smart_search failed: %', SQLERRM;
    END;
    RETURN NULL;
  END IF;
  -- Emptied by Immich (Smart Search "All", a CLIP model change): its writes from now on are re-runs for every
  -- asset cnai ran before. Not when the rows went with their assets (Immich deleting assets: a cascade; or
  -- TRUNCATE asset CASCADE), nor when some rows were deleted and others stay.
  IF TG_OP = 'DELETE' THEN  -- (nested: a TRUNCATE has no old_rows to name, even in a branch not taken)
    IF NOT EXISTS (SELECT FROM old_rows o JOIN public.asset a ON a.id = o."assetId") THEN
      RETURN NULL;  -- Immich deleting assets, the common case: stop before the exception block's subtransaction
    END IF;
  END IF;
  BEGIN
    IF TG_OP = 'TRUNCATE' THEN
      wiped := EXISTS (SELECT FROM public.asset);
    ELSIF TG_OP = 'DELETE' THEN
      wiped := NOT EXISTS (SELECT FROM public.smart_search);  -- rows of live assets went (checked above)
    END IF;
    IF wiped THEN
      INSERT INTO cnai.immich_wipe (task, wiped_at) VALUES ('clip', now())
      ON CONFLICT (task) DO UPDATE SET wiped_at = excluded.wiped_at;
    END IF;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cnai: following Immich''s % on smart_search failed: %', TG_OP, SQLERRM;
  END;
  RETURN NULL;
END $$;

-- Attach them where Immich has the tables (and columns) they read: an Immich without them (older than 3.x)
-- migrates all the same, without this feature; `cnai doctor` says so. If Immich gains a table later, re-apply
-- cnai's triggers (see `cnai doctor`).
DO $$
BEGIN
  IF to_regclass('public.smart_search') IS NOT NULL THEN
    CREATE OR REPLACE TRIGGER cnai_follow_smart_search_insert AFTER INSERT ON public.smart_search
      REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cnai.follow_immich_smart_search();
    CREATE OR REPLACE TRIGGER cnai_follow_smart_search_update AFTER UPDATE ON public.smart_search
      REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cnai.follow_immich_smart_search();
    -- only Immich's own DELETE statements (depth 0): the cascade from each deleted asset (Immich emptying the
    -- trash) runs inside a foreign-key trigger, so it skips the call and the transition table altogether
    CREATE OR REPLACE TRIGGER cnai_follow_smart_search_delete AFTER DELETE ON public.smart_search
      REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT WHEN (pg_catalog.pg_trigger_depth() < 1)
      EXECUTE FUNCTION cnai.follow_immich_smart_search();
    CREATE OR REPLACE TRIGGER cnai_follow_smart_search_truncate AFTER TRUNCATE ON public.smart_search
      FOR EACH STATEMENT EXECUTE FUNCTION cnai.follow_immich_smart_search();
  ELSE
    RAISE NOTICE 'cnai: no table smart_search: Immich''s Smart Search jobs re-run no cnai task';
  END IF;
  IF (SELECT count(*) FROM pg_catalog.pg_attribute
       WHERE attrelid = to_regclass('public.asset_job_status') AND NOT attisdropped
         AND attname IN ('assetId', 'ocrAt', 'facesRecognizedAt')) = 3 THEN
    CREATE OR REPLACE TRIGGER cnai_follow_job_status_insert AFTER INSERT ON public.asset_job_status
      REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cnai.follow_immich_job_status();
    CREATE OR REPLACE TRIGGER cnai_follow_job_status_update AFTER UPDATE ON public.asset_job_status
      REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
      FOR EACH STATEMENT EXECUTE FUNCTION cnai.follow_immich_job_status();
  ELSE
    RAISE NOTICE 'cnai: no asset_job_status("ocrAt", "facesRecognizedAt"): Immich''s OCR/face jobs re-run no cnai task';
  END IF;
END $$;
