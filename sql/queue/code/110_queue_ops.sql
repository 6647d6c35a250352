-- Code (re-applied whenever this file changes): every way a job moves through the queue. Listeners call these
-- (listener/queue.py); they work on arrays so one round trip claims or settles a whole batch. Delivery is
-- at-least-once; result writes are idempotent upserts, so a re-run never duplicates results.
--
-- Lock order. Immich deletes an asset with `DELETE FROM asset WHERE id = $1`: it locks the asset row, then its
-- foreign keys cascade into cnai.job, cnai.request_job, reprocess_request and the result tables, locking those
-- rows. A transaction here that locked a job and then waited on the asset (a result INSERT's foreign-key check),
-- or on a request row the cascade already holds, would deadlock with it. So every function that locks jobs and
-- then touches other rows of the asset locks the assets first (cnai.lock_job_assets: FOR KEY SHARE, in id
-- order), and the rest never wait (SKIP LOCKED). A job whose asset was deleted meanwhile is simply gone.

-- Signatures that changed (a changed return type or argument list needs the old function dropped first).
DROP FUNCTION IF EXISTS cnai.claim_jobs(text, integer, text[], interval);
DROP FUNCTION IF EXISTS cnai.lock_owned(text, bigint[]);
DROP FUNCTION IF EXISTS cnai.complete_jobs(text, bigint[]);
DROP FUNCTION IF EXISTS cnai.fail_jobs(text, bigint[], text[], boolean[], interval, interval);
DROP FUNCTION IF EXISTS cnai.release_jobs(text, bigint[]);
DROP FUNCTION IF EXISTS cnai.prune_jobs(interval);

-- The tasks cnai knows; a request or job names a subset.
CREATE OR REPLACE FUNCTION cnai.all_tasks() RETURNS text[] LANGUAGE sql IMMUTABLE
  RETURN ARRAY['clip', 'face', 'ocr'];

-- A task name a caller passed (cnai tasks, cnai backfill): one of cnai.all_tasks(), or a clear error.
CREATE OR REPLACE FUNCTION cnai.check_task(p_task text) RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF p_task IS NULL OR NOT p_task = ANY (cnai.all_tasks()) THEN
    RAISE EXCEPTION 'unknown task %: the tasks are %', coalesce(p_task, 'NULL'),
      array_to_string(cnai.all_tasks(), ', ') USING ERRCODE = 'invalid_parameter_value';
  END IF;
END $$;

-- The tasks cnai runs in the background (cnai.indexed_task): what an upload, an unhide or restore, Immich's
-- re-run buttons and a request that names no task make jobs for. A request or backfill naming a task runs it anyway.
CREATE OR REPLACE FUNCTION cnai.indexed_tasks() RETURNS text[] LANGUAGE sql STABLE
  RETURN ARRAY(SELECT t.task FROM cnai.indexed_task t ORDER BY t.task);

-- A listener serving these tasks indexes them from now on (at its start); returns the ones it newly added.
CREATE OR REPLACE FUNCTION cnai.index_tasks(p_tasks text[]) RETURNS text[] LANGUAGE sql AS $$
  WITH added AS (
    INSERT INTO cnai.indexed_task (task) SELECT DISTINCT t FROM unnest(p_tasks) AS u(t)
    ON CONFLICT (task) DO NOTHING
    RETURNING task
  )
  SELECT ARRAY(SELECT a.task FROM added a ORDER BY a.task);
$$;

-- `cnai tasks --drop TASK`: stop indexing a task, and drop its queued background jobs (the ones a person asked for,
-- priority 0, still run). A job locked right now (claimed this instant, its asset being deleted) is skipped, not
-- waited for. Returns how many jobs were dropped; NULL when the task was not indexed.
CREATE OR REPLACE FUNCTION cnai.unindex_task(p_task text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  n bigint;
BEGIN
  PERFORM cnai.check_task(p_task);
  DELETE FROM cnai.indexed_task WHERE task = p_task;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  DELETE FROM cnai.job j
   WHERE j.id = ANY (ARRAY(SELECT x.id FROM cnai.job x
                            WHERE x.task = p_task AND x.state = 'queued' AND x.priority > 0
                            FOR UPDATE SKIP LOCKED));
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END $$;

-- Lock the assets of these jobs the way Immich's DELETE does, before any of the jobs: an asset being deleted is
-- waited for (its jobs are gone once it commits), and while we hold it no delete can start on it.
-- p_skip_locked: don't wait, leave assets being deleted out. Returns the assets locked.
CREATE OR REPLACE FUNCTION cnai.lock_job_assets(p_job_ids bigint[], p_skip_locked boolean DEFAULT false)
RETURNS uuid[] LANGUAGE plpgsql AS $$
BEGIN
  IF p_skip_locked THEN
    RETURN ARRAY(SELECT a.id FROM public.asset a
                  WHERE a.id IN (SELECT j.asset_id FROM cnai.job j WHERE j.id = ANY (p_job_ids))
                  ORDER BY a.id FOR KEY SHARE OF a SKIP LOCKED);
  END IF;
  RETURN ARRAY(SELECT a.id FROM public.asset a
                WHERE a.id IN (SELECT j.asset_id FROM cnai.job j WHERE j.id = ANY (p_job_ids))
                ORDER BY a.id FOR KEY SHARE OF a);
END $$;

-- Requests follow their jobs: running once one is claimed, done/failed once all are finished.
CREATE OR REPLACE FUNCTION cnai.settle_requests(p_job_ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  -- Lock the requests first, then read their jobs in a new statement: two transactions finishing the last two
  -- jobs of one request would otherwise each see the other's job still running, and leave it 'running' forever.
  PERFORM FROM public.reprocess_request q
    WHERE q.id IN (SELECT rj.request_id FROM cnai.request_job rj WHERE rj.job_id = ANY (p_job_ids))
      AND q.status NOT IN ('done', 'failed')
    ORDER BY q.id FOR UPDATE OF q;
  WITH reqs AS (
    SELECT DISTINCT rj.request_id FROM cnai.request_job rj WHERE rj.job_id = ANY (p_job_ids)
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
END $$;

-- Move what the asset_file trigger appended to cnai.job_intake into cnai.job: one queued job per (asset, indexed
-- task), coalescing with what is already queued (rows of assets deleted since are dropped).
CREATE OR REPLACE FUNCTION cnai.take_intake(p_limit integer DEFAULT 10000) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  taken_assets uuid[];
  taken_at timestamptz[];
BEGIN
  -- One taker at a time: two takers inserting the same assets' jobs in different orders would deadlock on the
  -- one-queued-job index. A claim that finds another taker at work claims what is already queued instead.
  IF NOT pg_try_advisory_xact_lock(1668178281, 1) THEN  -- ("cnai", 1)
    RETURN 0;
  END IF;
  WITH moved AS (
    DELETE FROM cnai.job_intake i
     WHERE i.ctid = ANY (ARRAY(SELECT x.ctid FROM cnai.job_intake x LIMIT p_limit FOR UPDATE SKIP LOCKED))
    RETURNING i.asset_id, i.queued_at
  )
  SELECT array_agg(m.asset_id), array_agg(m.queued_at) INTO taken_assets, taken_at FROM moved m;
  IF taken_assets IS NULL THEN
    RETURN 0;
  END IF;
  -- asset before job (see the top of this file); the INSERT's own foreign-key checks then never wait
  PERFORM FROM public.asset a WHERE a.id = ANY (taken_assets) ORDER BY a.id FOR KEY SHARE;
  INSERT INTO cnai.job (asset_id, task, created_at)
  SELECT m.asset_id, t.task, min(m.queued_at)
    FROM unnest(taken_assets, taken_at) AS m(asset_id, queued_at) CROSS JOIN unnest(cnai.indexed_tasks()) AS t(task)
   -- an asset hidden or trashed since its preview was written is skipped, as Immich's own ML skips it
   WHERE EXISTS (SELECT FROM public.asset a
                  WHERE a.id = m.asset_id AND cnai.asset_skip_reason(a.visibility::text, a."deletedAt") IS NULL)
   GROUP BY m.asset_id, t.task
   ORDER BY min(m.queued_at), m.asset_id, t.task
  ON CONFLICT (asset_id, task) WHERE state = 'queued' DO NOTHING;
  RETURN cardinality(taken_assets);
END $$;

-- Queued work per task, the intake included (each intake row is one job per indexed task once taken).
CREATE OR REPLACE FUNCTION cnai.queue_depth() RETURNS TABLE (task text, queued bigint, oldest timestamptz)
LANGUAGE sql STABLE AS $$
  WITH intake AS (SELECT count(DISTINCT asset_id) AS n, min(queued_at) AS oldest FROM cnai.job_intake),
  indexed AS (SELECT cnai.indexed_tasks() AS tasks)
  SELECT t.task,
         (SELECT count(*) FROM cnai.job j WHERE j.task = t.task AND j.state = 'queued')
           + CASE WHEN t.task = ANY (indexed.tasks) THEN intake.n ELSE 0 END,
         least((SELECT min(created_at) FROM cnai.job j WHERE j.task = t.task AND j.state = 'queued'),
               CASE WHEN t.task = ANY (indexed.tasks) THEN intake.oldest END)
    FROM unnest(cnai.all_tasks()) AS t(task), intake, indexed;
$$;

-- Claim up to p_limit ready jobs of the given tasks for p_worker, under a lease. Task by task, each through its
-- own index range (job_claim_by_task), so the queued jobs of tasks nobody serves are never read. Jobs a person
-- asked for (priority 0) go first; the rest of the batch is shared equally among the tasks with ready work (the
-- tasks with the oldest work get the odd slots), and what a task cannot use goes to the others, so the jobs of
-- one asset tend to share a batch (one read and decode of its preview). p_max_attempts (the listener's
-- CNAI_MAX_ATTEMPTS) becomes each claimed job's budget.
CREATE OR REPLACE FUNCTION cnai.claim_jobs(p_worker text, p_limit integer, p_tasks text[], p_lease interval,
                                           p_max_attempts integer DEFAULT NULL)
RETURNS TABLE (id bigint, asset_id uuid, task text, attempts integer) LANGUAGE plpgsql AS $$
DECLARE
  ready text[];            -- served tasks with ready work, the best queue head first
  head_priority smallint[];
  active text[];           -- this round's tasks
  still text[];            -- those that may have more
  requests_round boolean := true;
  max_priority smallint;
  i integer;
  want integer;
  got integer;
  room integer := p_limit;
  shared integer;
BEGIN
  IF EXISTS (SELECT FROM cnai.job_intake) THEN
    PERFORM cnai.take_intake();
  END IF;
  SELECT array_agg(t.task ORDER BY h.priority, h.id), array_agg(h.priority ORDER BY h.priority, h.id)
    INTO ready, head_priority
    FROM (SELECT DISTINCT u.task FROM unnest(p_tasks) AS u(task)) t
    CROSS JOIN LATERAL (SELECT q.priority, q.id FROM cnai.job q
                         WHERE q.task = t.task AND q.state = 'queued' AND q.run_after <= now()
                         ORDER BY q.priority, q.id LIMIT 1) h;
  IF ready IS NULL THEN
    RETURN;
  END IF;
  -- the first round takes requests only, each task in turn as much as fits; the next ones share the room
  active := ready[1 : (SELECT count(*) FROM unnest(head_priority) p WHERE p = 0)];
  WHILE room > 0 AND (requests_round OR cardinality(active) > 0) LOOP
    still := '{}';
    shared := room;
    FOR i IN 1 .. coalesce(cardinality(active), 0) LOOP
      IF requests_round THEN
        want := room;
        max_priority := 0;
      ELSE
        want := shared / cardinality(active) + CASE WHEN i <= shared % cardinality(active) THEN 1 ELSE 0 END;
        max_priority := 32767;
      END IF;
      got := 0;
      IF want > 0 THEN
        RETURN QUERY
        WITH claimed AS (
          UPDATE cnai.job j
             SET state = 'running', attempts = j.attempts + 1, worker = p_worker, lease_until = now() + p_lease,
                 started_at = now(), max_attempts = coalesce(p_max_attempts, j.max_attempts)
           WHERE j.id = ANY (ARRAY(
                   SELECT q.id FROM cnai.job q
                    WHERE q.task = active[i] AND q.state = 'queued' AND q.priority <= max_priority
                      AND q.run_after <= now()
                      -- the running twin of this (asset, task) must finish first: its result would overwrite ours
                      AND NOT EXISTS (SELECT FROM cnai.job r
                                       WHERE r.asset_id = q.asset_id AND r.task = q.task AND r.state = 'running'
                                       OFFSET 0)  -- a per-row index probe: an anti-join would read all running
                    ORDER BY q.priority, q.id
                    LIMIT want
                    FOR UPDATE SKIP LOCKED))
          RETURNING j.id, j.asset_id, j.task, j.attempts, j.priority
        ), requests AS (
          -- only priority-0 jobs have requests. A request row someone else holds right now (its asset being
          -- deleted, or another of its jobs settling) is not waited for: settle_requests sets its status later.
          UPDATE public.reprocess_request q SET status = 'running'
           WHERE q.id = ANY (ARRAY(SELECT p.id FROM public.reprocess_request p
                                    WHERE p.status = 'pending'
                                      AND p.id IN (SELECT rj.request_id FROM claimed c JOIN cnai.request_job rj
                                                                            ON rj.job_id = c.id
                                                    WHERE c.priority = 0)
                                    ORDER BY p.id FOR UPDATE SKIP LOCKED))
        )
        SELECT c.id, c.asset_id, c.task, c.attempts FROM claimed c;
        GET DIAGNOSTICS got = ROW_COUNT;
        room := room - got;
      END IF;
      IF got = want THEN  -- it may have more
        still := still || active[i];
      END IF;
    END LOOP;
    active := CASE WHEN requests_round THEN ready ELSE still END;
    requests_round := false;
  END LOOP;
END $$;

-- Finish the jobs of this list that p_worker still holds, and return their ids. Call it first in the
-- transaction that writes the results, and write only the returned jobs' results: a job whose lease was lost
-- (and re-run elsewhere) is not written twice, and the job and its results commit together.
CREATE OR REPLACE FUNCTION cnai.complete_jobs(p_worker text, p_ids bigint[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
  done_ids bigint[];
  with_requests bigint[];
BEGIN
  PERFORM cnai.lock_job_assets(p_ids);
  WITH done AS (
    UPDATE cnai.job j SET state = 'done', finished_at = now(), lease_until = NULL, error = NULL
     WHERE j.id = ANY (p_ids) AND j.state = 'running' AND j.worker = p_worker
    RETURNING j.id, j.priority
  )
  SELECT coalesce(array_agg(d.id ORDER BY d.id), '{}'), array_agg(d.id) FILTER (WHERE d.priority = 0)
    INTO done_ids, with_requests FROM done d;
  IF with_requests IS NOT NULL THEN  -- only priority-0 jobs can have requests waiting on them
    PERFORM cnai.settle_requests(with_requests);
  END IF;
  RETURN done_ids;
END $$;

-- Put one running job back in the queue, merging it into an already queued twin (a request that came in
-- while it ran) so that "one queued per (asset, task)" holds and no request loses track of its work.
-- Callers lock the job's asset first.
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

-- Callers lock the job's asset first.
CREATE OR REPLACE FUNCTION cnai.fail_job(p_id bigint, p_error text) RETURNS void LANGUAGE sql AS $$
  UPDATE cnai.job SET state = 'failed', error = p_error, finished_at = now(), lease_until = NULL
   WHERE id = p_id AND state = 'running';
  SELECT cnai.settle_requests(ARRAY[p_id]);
$$;

-- Report failures for a batch; returns the ids p_worker still held (and so settled). Permanent errors, and
-- jobs out of attempts, end 'failed' with the reason; the rest retry after exponential backoff
-- (base * 2^(attempts-1), capped).
CREATE OR REPLACE FUNCTION cnai.fail_jobs(p_worker text, p_ids bigint[], p_errors text[], p_permanent boolean[],
                                          p_backoff_base interval DEFAULT '5 seconds',
                                          p_backoff_cap interval DEFAULT '10 minutes')
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
  r record;
  settled bigint[] := '{}';
BEGIN
  PERFORM cnai.lock_job_assets(p_ids);
  FOR r IN
    SELECT j.id, j.attempts, j.max_attempts, e.error, e.permanent
      FROM unnest(p_ids, p_errors, p_permanent) AS e(id, error, permanent)
      JOIN cnai.job j ON j.id = e.id
     WHERE j.state = 'running' AND j.worker = p_worker
     ORDER BY j.id
       FOR UPDATE OF j
  LOOP
    IF r.permanent THEN
      PERFORM cnai.fail_job(r.id, r.error);
    ELSIF r.attempts >= r.max_attempts THEN
      PERFORM cnai.fail_job(r.id, format('%s (gave up after %s attempts)', r.error, r.attempts));
    ELSE
      PERFORM cnai.requeue_job(r.id, least(p_backoff_base * power(2, r.attempts - 1), p_backoff_cap),
                               r.error, false);
    END IF;
    settled := settled || r.id;
  END LOOP;
  RETURN settled;
END $$;

-- Hand back jobs p_worker holds without spending an attempt, and return their ids: on SIGTERM (no reason, at
-- once), or when the work could not even start for a reason outside the job (its storage is unmounted: the
-- reason is kept on the job, and it waits p_delay).
CREATE OR REPLACE FUNCTION cnai.release_jobs(p_worker text, p_ids bigint[], p_error text DEFAULT NULL,
                                             p_delay interval DEFAULT '0 seconds')
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
  jid bigint;
  released bigint[] := '{}';
BEGIN
  PERFORM cnai.lock_job_assets(p_ids);
  FOR jid IN SELECT j.id FROM cnai.job j WHERE j.id = ANY (p_ids) AND j.state = 'running' AND j.worker = p_worker
              ORDER BY j.id FOR UPDATE
  LOOP
    PERFORM cnai.requeue_job(jid, p_delay, p_error, true);
    released := released || jid;
  END LOOP;
  RETURN released;
END $$;

-- Extend the lease of the jobs p_worker holds; returns the ids it still holds. A job locked right now (its
-- asset being deleted, or its batch settling) is not waited for: it keeps its lease until the next round.
CREATE OR REPLACE FUNCTION cnai.renew_leases(p_worker text, p_ids bigint[], p_lease interval) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE cnai.job j SET lease_until = now() + p_lease
   WHERE j.id = ANY (ARRAY(SELECT x.id FROM cnai.job x
                            WHERE x.id = ANY (p_ids) AND x.state = 'running' AND x.worker = p_worker
                            FOR UPDATE SKIP LOCKED));
  RETURN QUERY SELECT j.id FROM cnai.job j WHERE j.id = ANY (p_ids) AND j.state = 'running' AND j.worker = p_worker;
END $$;

-- Recover work from dead listeners: an expired lease means its holder stopped renewing it. Never waits: a job
-- someone else is handling, or whose asset is being deleted, is left for the next round.
CREATE OR REPLACE FUNCTION cnai.reap_expired(p_limit integer DEFAULT 1000) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  candidates bigint[];
  assets uuid[];
  r record;
  n integer := 0;
BEGIN
  candidates := ARRAY(SELECT j.id FROM cnai.job j WHERE j.state = 'running' AND j.lease_until < now()
                       ORDER BY j.lease_until LIMIT p_limit);
  IF cardinality(candidates) = 0 THEN
    RETURN 0;
  END IF;
  assets := cnai.lock_job_assets(candidates, true);
  FOR r IN
    SELECT j.id, j.attempts, j.max_attempts, j.worker FROM cnai.job j JOIN unnest(assets) AS a(id) ON a.id = j.asset_id
     WHERE j.id = ANY (candidates) AND j.state = 'running' AND j.lease_until < now()
     ORDER BY j.id FOR UPDATE OF j SKIP LOCKED
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

-- Keep cnai.job small: up to p_limit finished jobs older than the given age go (their requests keep their
-- final status). Returns how many went; call again while it returns p_limit. A job locked right now (its
-- asset being deleted) is skipped, not waited for.
CREATE OR REPLACE FUNCTION cnai.prune_jobs(p_older_than interval, p_limit integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  n integer;
BEGIN
  DELETE FROM cnai.job j
   WHERE j.id = ANY (ARRAY(SELECT x.id FROM cnai.job x
                            WHERE x.state IN ('done', 'failed') AND x.finished_at < now() - p_older_than
                            ORDER BY x.id LIMIT p_limit FOR UPDATE SKIP LOCKED));
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END $$;

-- `cnai retry --failed`: put failed jobs back with a fresh attempt budget. A job locked right now (its asset
-- being deleted: the cascade locks an asset's jobs in its own order) is skipped, not waited for.
CREATE OR REPLACE FUNCTION cnai.retry_failed(p_tasks text[] DEFAULT NULL) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  n integer;
BEGIN
  WITH f AS (
    SELECT DISTINCT ON (j.asset_id, j.task) j.id FROM cnai.job j
     WHERE j.state = 'failed' AND (p_tasks IS NULL OR j.task = ANY (p_tasks))
       AND NOT EXISTS (SELECT 1 FROM cnai.job q WHERE q.asset_id = j.asset_id AND q.task = j.task AND q.state = 'queued')
     ORDER BY j.asset_id, j.task, j.id DESC
  )
  UPDATE cnai.job j SET state = 'queued', attempts = 0, error = NULL, run_after = now(), finished_at = NULL, worker = NULL
   WHERE j.id = ANY (ARRAY(SELECT x.id FROM cnai.job x WHERE x.id IN (SELECT f.id FROM f) AND x.state = 'failed'
                            FOR UPDATE SKIP LOCKED));
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n > 0 THEN
    PERFORM pg_notify('cnai_job', 'retry');
  END IF;
  RETURN n;
END $$;
