-- Schema (append-only): indexes for claiming task by task, and fewer indexes to maintain on every state change.
-- Jobs exist for every task even where no listener serves one (CNAI_TASKS=ocr without CLIP or face models), so a
-- claim ordered over all queued jobs would step over every unserved one first; per task, its queue's head is the
-- first entry of its range. Replaces job_claim_order.
CREATE INDEX IF NOT EXISTS job_claim_by_task ON cnai.job (task, priority, id) WHERE state = 'queued';
DROP INDEX IF EXISTS cnai.job_claim_order;
-- Every claim and completion wrote an entry into these too. Running jobs are few (listeners x batches in
-- flight): the reaper reads them all through job_one_running. Pruning takes old finished jobs in id order.
DROP INDEX IF EXISTS cnai.job_lease;
DROP INDEX IF EXISTS cnai.job_finished;
