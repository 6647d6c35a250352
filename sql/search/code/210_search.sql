-- Code (re-applied whenever this file changes).
-- cnai.search: what cnai's front (Immich's own search box) and `cnai search` call.
--   'ocr:发票'                      -> OCR text only, best first
--   '海边日落' + query_embedding     -> hybrid: OCR text and CLIP vector fused by reciprocal rank (k = 60)
--   '海边日落' without an embedding  -> OCR text only
-- Trashed and deleted assets never appear; by default neither do hidden and locked ones (`visibilities` and
-- `locked_owner` below say when they do).
-- Owners are required: cnai.search returns only the photos of owner_ids, and a caller that forgets them gets an
-- error, never every user's photos. The helpers below treat NULL owners as nobody, so no path leaks. An admin
-- search across every user is explicit: cnai.search_all_owners(...).

-- The signatures below grew (visibilities, locked_owner, clip_model); the older ones go first, so that a call
-- never has two candidates.
DROP FUNCTION IF EXISTS cnai.search(text, vector, uuid[], integer, integer, float8, float8, integer);
DROP FUNCTION IF EXISTS cnai.search_ocr(text, uuid[], integer);
DROP FUNCTION IF EXISTS cnai.search_clip(vector, uuid[], integer);

-- Whether a search may show an asset: not trashed or deleted, one of owner_ids', and of one of `visibilities`
-- (NULL: timeline and archive, what Immich's search shows a session that is not elevated). Locked-folder assets
-- are personal, as in Immich: they appear only when 'locked' is asked for, and only those of locked_owner (the user
-- whose elevated session searches), never a partner's.
CREATE OR REPLACE FUNCTION cnai.search_may_show(owner_id uuid, visibility text, status text, deleted_at timestamptz,
                                                owner_ids uuid[], visibilities text[], locked_owner uuid)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT deleted_at IS NULL AND status = 'active' AND owner_id = ANY (owner_ids)
     AND visibility = ANY (coalesce(visibilities, ARRAY['timeline', 'archive']))
     AND (visibility <> 'locked' OR owner_id = locked_owner);
$$;

-- Score of one OCR match: cover density over the positions (phrases close together rank higher), with a
-- bonus when the query occurs verbatim; divided by document length, so a photo whose text is mostly the query
-- (a sign, a label, a document title) beats a long page that mentions it in passing.
CREATE OR REPLACE FUNCTION cnai.ocr_match_score(doc_tokens tsvector, doc_text text, q tsquery, q_text text)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ts_rank_cd(doc_tokens, q, 2)::float8
         + CASE WHEN strpos(lower(doc_text), lower(btrim(q_text))) > 0 THEN 1.0 ELSE 0.0 END;
$$;

CREATE OR REPLACE FUNCTION cnai.search_ocr(q_text text, owner_ids uuid[], lim integer,
                                           visibilities text[] DEFAULT NULL, locked_owner uuid DEFAULT NULL)
RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer) LANGUAGE sql STABLE AS $$
  WITH q AS (SELECT cnai.zh_tsquery(q_text) AS tsq)
  SELECT o.asset_id, s.score, (row_number() OVER (ORDER BY s.score DESC, o.asset_id))::integer
    FROM q, cnai.ocr o
    JOIN public.asset a ON a.id = o.asset_id
    CROSS JOIN LATERAL (SELECT cnai.ocr_match_score(o.tokens, o.text, q.tsq, q_text) AS score) s
   WHERE q.tsq IS NOT NULL AND o.tokens @@ q.tsq
     AND cnai.search_may_show(a."ownerId", a.visibility::text, a.status::text, a."deletedAt",
                              owner_ids, visibilities, locked_owner)
   ORDER BY s.score DESC, o.asset_id
   LIMIT lim;
$$;

-- clip_model: only embeddings of this model (cnai.clip.model), as a query embedded by one model means nothing
-- next to another model's vectors.
CREATE OR REPLACE FUNCTION cnai.search_clip(query_embedding vector, owner_ids uuid[], lim integer,
                                            visibilities text[] DEFAULT NULL, locked_owner uuid DEFAULT NULL,
                                            clip_model text DEFAULT NULL)
RETURNS TABLE (asset_id uuid, distance float8, clip_rank integer) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
  -- filters apply after the HNSW scan; let pgvector (>= 0.8) keep scanning until enough rows pass them
  BEGIN
    PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
    PERFORM set_config('hnsw.ef_search', greatest(40, least(lim, 1000))::text, true);
  EXCEPTION WHEN OTHERS THEN
    NULL;
  END;
  RETURN QUERY
  WITH nearest AS (
    SELECT c.asset_id, (c.embedding <=> query_embedding)::float8 AS distance
      FROM cnai.clip c JOIN public.asset a ON a.id = c.asset_id
     WHERE cnai.search_may_show(a."ownerId", a.visibility::text, a.status::text, a."deletedAt",
                                owner_ids, visibilities, locked_owner)
       AND (clip_model IS NULL OR c.model = clip_model)
     ORDER BY c.embedding <=> query_embedding
     LIMIT lim
  )
  SELECT n.asset_id, n.distance, (row_number() OVER (ORDER BY n.distance, n.asset_id))::integer
    FROM nearest n ORDER BY n.distance, n.asset_id;
END $$;

CREATE OR REPLACE FUNCTION cnai.search(query text, query_embedding vector DEFAULT NULL, owner_ids uuid[] DEFAULT NULL,
                                       lim integer DEFAULT 100, offset_ integer DEFAULT 0,
                                       ocr_weight float8 DEFAULT 1.0, clip_weight float8 DEFAULT 1.0,
                                       rrf_k integer DEFAULT 60, visibilities text[] DEFAULT NULL,
                                       locked_owner uuid DEFAULT NULL, clip_model text DEFAULT NULL)
RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer, clip_rank integer) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
  q text := btrim(coalesce(query, ''));
  ocr_only boolean := q ~* '^ocr:';
  branch integer;
BEGIN
  IF owner_ids IS NULL THEN
    RAISE EXCEPTION 'cnai.search: owner_ids is required: the ids of the users whose photos to search'
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'pass the signed-in user''s id (ARRAY[user_id]); an admin search across every user is '
                   'cnai.search_all_owners(query, query_embedding, ...)';
  END IF;
  IF lim IS NULL OR lim < 1 OR lim > 1000 THEN
    RAISE EXCEPTION 'cnai.search: lim must be between 1 and 1000, got %', lim USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF offset_ IS NULL OR offset_ < 0 THEN
    RAISE EXCEPTION 'cnai.search: offset_ must be >= 0, got %', offset_ USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT coalesce(visibilities, '{}') <@ ARRAY['archive', 'timeline', 'hidden', 'locked'] THEN
    RAISE EXCEPTION 'cnai.search: visibilities may hold archive, timeline, hidden and locked (Immich''s), got %',
      visibilities USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF ocr_only THEN
    q := btrim(substr(q, 5));
  END IF;
  IF ocr_only OR query_embedding IS NULL THEN
    RETURN QUERY
      SELECT s.asset_id, s.score, s.ocr_rank, NULL::integer
        FROM cnai.search_ocr(q, owner_ids, lim + offset_, visibilities, locked_owner) s
       ORDER BY s.ocr_rank OFFSET offset_ LIMIT lim;
    RETURN;
  END IF;
  -- each branch contributes its top 2x the page (as Supabase's and ParadeDB's hybrid search do)
  branch := least(2 * (lim + offset_), 2000);
  RETURN QUERY
    SELECT coalesce(o.asset_id, c.asset_id),
           coalesce(ocr_weight / (rrf_k + o.ocr_rank), 0) + coalesce(clip_weight / (rrf_k + c.clip_rank), 0),
           o.ocr_rank, c.clip_rank
      FROM cnai.search_ocr(q, owner_ids, branch, visibilities, locked_owner) o
      FULL OUTER JOIN cnai.search_clip(query_embedding, owner_ids, branch, visibilities, locked_owner, clip_model) c
        ON c.asset_id = o.asset_id
     ORDER BY 2 DESC, 1
    OFFSET offset_ LIMIT lim;
END $$;

-- The explicit all-users path, for administrators (`cnai search` on the command line): every user's photos.
-- Never call it on behalf of a signed-in user.
CREATE OR REPLACE FUNCTION cnai.search_all_owners(query text, query_embedding vector DEFAULT NULL,
                                                  lim integer DEFAULT 100, offset_ integer DEFAULT 0,
                                                  ocr_weight float8 DEFAULT 1.0, clip_weight float8 DEFAULT 1.0,
                                                  rrf_k integer DEFAULT 60)
RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer, clip_rank integer) LANGUAGE sql STABLE AS $$
  SELECT * FROM cnai.search(query, query_embedding, ARRAY(SELECT u.id FROM public."user" u), lim, offset_,
                            ocr_weight, clip_weight, rrf_k);
$$;

-- Whether cnai.clip holds embeddings of this model (cnai.clip.model, e.g. 'cn-clip/ViT-B-16'): a hybrid search
-- embeds its query with that model, which is only worth it where photos were embedded with it too.
CREATE OR REPLACE FUNCTION cnai.clip_has_model(clip_model text) RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT FROM cnai.clip c WHERE c.model = clip_model);
$$;
