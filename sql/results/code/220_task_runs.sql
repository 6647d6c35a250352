-- Code (re-applied whenever this file changes): recording that a task ran on an asset, and queueing the assets
-- a task has not run on with the install's model (`cnai backfill`).

-- Called in the transaction that writes the task's result: the result and "it ran" commit together.
CREATE OR REPLACE FUNCTION cnai.record_task_run(p_asset_id uuid, p_task text, p_model text) RETURNS void
LANGUAGE sql AS $$
  INSERT INTO cnai.task_run (asset_id, task, model, ran_at) VALUES (p_asset_id, p_task, p_model, now())
  ON CONFLICT (asset_id, task) DO UPDATE SET model = excluded.model, ran_at = excluded.ran_at;
$$;

-- Queue p_task for every asset cnai works on (not hidden, not trashed, with an unedited preview) that it has not
-- run on with p_model (the name this install's handler records, so switching models re-indexes), or for all of
-- them with p_force. Assets whose job for the
-- task is running are left to it unless forced; queued ones coalesce. Returns how many jobs were added.
CREATE OR REPLACE FUNCTION cnai.queue_missing(p_task text, p_model text, p_force boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM cnai.check_task(p_task);
  IF p_model IS NULL THEN
    RAISE EXCEPTION 'cnai.queue_missing: name the model this install uses for task %', p_task
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  WITH queued AS (
    INSERT INTO cnai.job (asset_id, task)
    SELECT a.id, p_task FROM public.asset a
     WHERE cnai.asset_skip_reason(a.visibility::text, a."deletedAt") IS NULL  -- what Immich's own ML works on
       AND EXISTS (SELECT FROM public.asset_file f
                    WHERE f."assetId" = a.id AND f.type::text = 'preview' AND NOT f."isEdited")
       AND (p_force OR (
            NOT EXISTS (SELECT FROM cnai.task_run r
                         WHERE r.asset_id = a.id AND r.task = p_task AND r.model = p_model)
            AND NOT EXISTS (SELECT FROM cnai.job j
                             WHERE j.asset_id = a.id AND j.task = p_task AND j.state = 'running')))
    ON CONFLICT (asset_id, task) WHERE state = 'queued' DO NOTHING
    RETURNING 1
  )
  SELECT count(*) INTO n FROM queued;
  IF n > 0 THEN
    PERFORM pg_notify('cnai_job', 'backfill');
  END IF;
  RETURN n;
END $$;
