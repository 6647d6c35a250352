-- Code (re-applied whenever this file changes): every way a job moves through the queue. Listeners call these
-- (listener/queue.py); they work on arrays so one round trip claims or settles a whole batch. Delivery is
-- at-least-once; result writes are idempotent upserts, so a re-run never duplicates results.

-- The tasks cnai knows; a request or job names a subset.
CREATE OR REPLACE FUNCTION cnai.all_tasks() RETURNS text[] LANGUAGE sql IMMUTABLE
  RETURN ARRAY['clip', 'face', 'ocr'];

-- Requests follow their jobs: running once one is claimed, done/failed once all are finished.
CREATE OR REPLACE FUNCTION cnai.settle_requests(p_job_ids bigint[]) RETURNS void LANGUAGE sql AS $$
  WITH reqs AS (
    SELECT DISTINCT request_id FROM cnai.request_job WHERE job_id = ANY (p_job_ids)
  ), agg AS (
    SELECT r.request_id,
           bool_and(j.state IN ('done', 'failed')) AS finished,
           bool_or(j.state = 'failed') AS any_failed,
           string_agg(j.task || ': ' || coalesce(j.error, 'failed'), '; ' ORDER BY j.task)
             FILTER (WHERE j.state = 'failed') AS errors
      FROM reqs r JOIN cnai.request_job rj USING (request_id) JOIN cnai.job j ON j.id = rj.job_id
     GROUP BY r.request_id
  )
  UPDATE public.reprocess_request q
     SET status = CASE WHEN a.finished AND a.any_failed THEN 'failed'
                       WHEN a.finished THEN 'done' ELSE 'running' END,
         error = a.errors,
         finished_at = CASE WHEN a.finished THEN now() END
    FROM agg a
   WHERE q.id = a.request_id AND q.status NOT IN ('done', 'failed');
$$;

-- Move what the asset_file trigger appended to cnai.job_intake into cnai.job: one queued job per (asset, task),
-- coalescing with what is already queued (rows of assets deleted since are dropped). Concurrent callers take
-- disjoint rows.
CREATE OR REPLACE FUNCTION cnai.take_intake(p_limit integer DEFAULT 10000) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  n integer;
BEGIN
  WITH moved AS (
    DELETE FROM cnai.job_intake i
     WHERE i.ctid = ANY (ARRAY(SELECT x.ctid FROM cnai.job_intake x LIMIT p_limit FOR UPDATE SKIP LOCKED))
    RETURNING i.asset_id, i.queued_at
  ), queued AS (
    INSERT INTO cnai.job (asset_id, task, created_at)
    SELECT m.asset_id, t.task, min(m.queued_at)
      FROM moved m CROSS JOIN unnest(cnai.all_tasks()) AS t(task)
     WHERE EXISTS (SELECT FROM public.asset a WHERE a.id = m.asset_id)
     GROUP BY m.asset_id, t.task
     ORDER BY min(m.queued_at), m.asset_id, t.task
    ON CONFLICT (asset_id, task) WHERE state = 'queued' DO NOTHING
  )
  SELECT count(*) INTO n FROM moved;
  RETURN n;
END $$;

-- Queued work per task, the intake included (each intake row is one job per task once taken).
CREATE OR REPLACE FUNCTION cnai.queue_depth() RETURNS TABLE (task text, queued bigint, oldest timestamptz)
LANGUAGE sql STABLE AS $$
  WITH intake AS (SELECT count(DISTINCT asset_id) AS n, min(queued_at) AS oldest FROM cnai.job_intake)
  SELECT t.task,
         (SELECT count(*) FROM cnai.job j WHERE j.task = t.task AND j.state = 'queued') + intake.n,
         least((SELECT min(created_at) FROM cnai.job j WHERE j.task = t.task AND j.state = 'queued'), intake.oldest)
    FROM unnest(cnai.all_tasks()) AS t(task), intake;
$$;

CREATE OR REPLACE FUNCTION cnai.claim_jobs(p_worker text, p_limit integer, p_tasks text[], p_lease interval)
RETURNS TABLE (id bigint, asset_id uuid, task text, attempts integer) LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT FROM cnai.job_intake) THEN
    PERFORM cnai.take_intake();
  END IF;
  RETURN QUERY
  WITH picked AS (
    SELECT q.id FROM cnai.job q
     WHERE q.state = 'queued' AND q.run_after <= now() AND q.task = ANY (p_tasks)
       -- the running twin of this (asset, task) must finish first: its result would overwrite ours
       AND NOT EXISTS (SELECT FROM cnai.job r
                        WHERE r.asset_id = q.asset_id AND r.task = q.task AND r.state = 'running'
                        OFFSET 0)  -- keeps it a per-row index probe: an anti-join would scan all running jobs
     ORDER BY q.priority, q.id
     LIMIT p_limit
     FOR UPDATE SKIP LOCKED
  ), claimed AS (
    UPDATE cnai.job j
       SET state = 'running', attempts = j.attempts + 1, worker = p_worker,
           lease_until = now() + p_lease, started_at = now()
      FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.asset_id, j.task, j.attempts, j.priority
  ), requests AS (
    -- a request's jobs always have priority 0 (set when it joins them), so background claims skip this
    UPDATE public.reprocess_request q SET status = 'running'
     WHERE q.status = 'pending'
       AND q.id IN (SELECT rj.request_id FROM cnai.request_job rj
                     WHERE rj.job_id = ANY (ARRAY(SELECT c.id FROM claimed c WHERE c.priority = 0)))
  )
  SELECT c.id, c.asset_id, c.task, c.attempts FROM claimed c ORDER BY c.id;
END $$;

-- Lock and return the jobs of this list that this worker still holds. Call it first in the transaction that
-- writes results, so a job whose lease was lost (and re-run elsewhere) is not written twice.
CREATE OR REPLACE FUNCTION cnai.lock_owned(p_worker text, p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
  SELECT id FROM cnai.job WHERE id = ANY (p_ids) AND state = 'running' AND worker = p_worker
   ORDER BY id FOR UPDATE;
$$;

CREATE OR REPLACE FUNCTION cnai.complete_jobs(p_worker text, p_ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  n integer;
  with_requests bigint[];
BEGIN
  WITH done AS (
    UPDATE cnai.job SET state = 'done', finished_at = now(), lease_until = NULL, error = NULL
     WHERE id = ANY (p_ids) AND state = 'running' AND worker = p_worker
    RETURNING id, priority
  )
  SELECT count(*), array_agg(id) FILTER (WHERE priority = 0) INTO n, with_requests FROM done;
  IF with_requests IS NOT NULL THEN  -- only priority-0 jobs can have requests waiting on them
    PERFORM cnai.settle_requests(with_requests);
  END IF;
  RETURN n;
END $$;

-- Put one running job back in the queue, merging it into an already queued twin (a request that came in
-- while it ran) so that "one queued per (asset, task)" holds and no request loses track of its work.
CREATE OR REPLACE FUNCTION cnai.requeue_job(p_id bigint, p_delay interval, p_error text, p_refund boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  j cnai.job;
  twin bigint;
BEGIN
  SELECT * INTO j FROM cnai.job WHERE id = p_id FOR UPDATE;
  IF NOT FOUND OR j.state <> 'running' THEN
    RETURN;
  END IF;
  SELECT id INTO twin FROM cnai.job WHERE asset_id = j.asset_id AND task = j.task AND state = 'queued' FOR UPDATE;
  IF twin IS NOT NULL THEN
    INSERT INTO cnai.request_job (request_id, job_id)
    SELECT request_id, twin FROM cnai.request_job WHERE job_id = p_id ON CONFLICT DO NOTHING;
    UPDATE cnai.job SET priority = least(priority, j.priority) WHERE id = twin;
    DELETE FROM cnai.job WHERE id = p_id;
  ELSE
    UPDATE cnai.job
       SET state = 'queued', worker = NULL, lease_until = NULL, started_at = NULL,
           run_after = now() + p_delay, error = p_error,
           attempts = CASE WHEN p_refund THEN greatest(attempts - 1, 0) ELSE attempts END
     WHERE id = p_id;
  END IF;
END $$;

CREATE OR REPLACE FUNCTION cnai.fail_job(p_id bigint, p_error text) RETURNS void LANGUAGE sql AS $$
  UPDATE cnai.job SET state = 'failed', error = p_error, finished_at = now(), lease_until = NULL
   WHERE id = p_id AND state = 'running';
  SELECT cnai.settle_requests(ARRAY[p_id]);
$$;

-- Report failures for a batch. Permanent errors, and jobs out of attempts, end 'failed' with the reason; the
-- rest retry after exponential backoff (base * 2^(attempts-1), capped).
CREATE OR REPLACE FUNCTION cnai.fail_jobs(p_worker text, p_ids bigint[], p_errors text[], p_permanent boolean[],
                                          p_backoff_base interval DEFAULT '5 seconds',
                                          p_backoff_cap interval DEFAULT '10 minutes')
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT j.id, j.attempts, j.max_attempts, e.error, e.permanent
      FROM unnest(p_ids, p_errors, p_permanent) AS e(id, error, permanent)
      JOIN cnai.job j ON j.id = e.id
     WHERE j.state = 'running' AND j.worker = p_worker
     ORDER BY j.id
  LOOP
    IF r.permanent THEN
      PERFORM cnai.fail_job(r.id, r.error);
    ELSIF r.attempts >= r.max_attempts THEN
      PERFORM cnai.fail_job(r.id, format('%s (gave up after %s attempts)', r.error, r.attempts));
    ELSE
      PERFORM cnai.requeue_job(r.id, least(p_backoff_base * power(2, r.attempts - 1), p_backoff_cap),
                               r.error, false);
    END IF;
  END LOOP;
END $$;

-- SIGTERM: hand back what this worker holds but did not start, without spending an attempt.
CREATE OR REPLACE FUNCTION cnai.release_jobs(p_worker text, p_ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  jid bigint;
BEGIN
  FOR jid IN SELECT id FROM cnai.job WHERE id = ANY (p_ids) AND state = 'running' AND worker = p_worker ORDER BY id
  LOOP
    PERFORM cnai.requeue_job(jid, '0 seconds', NULL, true);
  END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cnai.renew_leases(p_worker text, p_ids bigint[], p_lease interval) RETURNS SETOF bigint
LANGUAGE sql AS $$
  UPDATE cnai.job SET lease_until = now() + p_lease
   WHERE id = ANY (p_ids) AND state = 'running' AND worker = p_worker
  RETURNING id;
$$;

-- Recover work from dead listeners: an expired lease means its holder stopped renewing it.
CREATE OR REPLACE FUNCTION cnai.reap_expired(p_limit integer DEFAULT 1000) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  r record;
  n integer := 0;
BEGIN
  FOR r IN
    SELECT id, attempts, max_attempts, worker FROM cnai.job
     WHERE state = 'running' AND lease_until < now()
     ORDER BY lease_until LIMIT p_limit FOR UPDATE SKIP LOCKED
  LOOP
    IF r.attempts >= r.max_attempts THEN
      PERFORM cnai.fail_job(r.id, format('worker %s stopped while holding it (lease expired), %s attempts',
                                         r.worker, r.attempts));
    ELSE
      PERFORM cnai.requeue_job(r.id, '0 seconds', format('lease expired (worker %s stopped?)', r.worker), false);
    END IF;
    n := n + 1;
  END LOOP;
  RETURN n;
END $$;

-- Keep cnai.job small: finished jobs older than the given age go (their requests keep their final status).
CREATE OR REPLACE FUNCTION cnai.prune_jobs(p_older_than interval) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  n integer;
BEGIN
  DELETE FROM cnai.job WHERE state IN ('done', 'failed') AND finished_at < now() - p_older_than;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END $$;

-- `cnai retry --failed`: put failed jobs back with a fresh attempt budget.
CREATE OR REPLACE FUNCTION cnai.retry_failed(p_tasks text[] DEFAULT NULL) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  n integer;
BEGIN
  WITH f AS (
    SELECT DISTINCT ON (asset_id, task) id FROM cnai.job j
     WHERE state = 'failed' AND (p_tasks IS NULL OR task = ANY (p_tasks))
       AND NOT EXISTS (SELECT 1 FROM cnai.job q WHERE q.asset_id = j.asset_id AND q.task = j.task AND q.state = 'queued')
     ORDER BY asset_id, task, id DESC
  )
  UPDATE cnai.job j SET state = 'queued', attempts = 0, error = NULL, run_after = now(), finished_at = NULL, worker = NULL
    FROM f WHERE j.id = f.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n > 0 THEN
    PERFORM pg_notify('cnai_job', 'retry');
  END IF;
  RETURN n;
END $$;
