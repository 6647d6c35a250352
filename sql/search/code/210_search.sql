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

-- Score of one OCR match, 0-1 and comparable across queries (the front shows it; hybrid fusion uses ranks).
-- share: the share of the photo's text (whitespace aside) that the query covers, so a photo whose text is mostly
-- the query (a sign, a label, a title) beats a long page that mentions it once; it counts half when a multi-word
-- query's words are not adjacent in the order typed (as_typed false). 1 means the text is the query.
-- Without zhparser (words NULL):
--   0.5-1: found as typed: 0.5 + 0.5 x share.
--   below 0.5: found only by the fuzzy fallback (an OCR error allowed): 0.45 x share.
-- Where zhparser is usable (012_zh_words.sql), whether the text holds the query's words splits each band:
--   0.75-1: found as typed, and the query's words are words of the text: 0.75 + 0.25 x share.
--   0.5-0.75: found as typed, but not as words (上海 in 楼上海景厅, 市长 in 南京市长江大桥): 0.5 + 0.25 x share.
--   0.45-0.5: not as typed, but its words are all in the text, anywhere (增值税发票 in 增值税专用发票):
--             0.45 + 0.05 x share.
--   below 0.45: the fuzzy fallback, as without zhparser.
-- The query's verbatim occurrence in the text is not scored: it doubled the cost and changed no ranking on the
-- labelled set, and it made quotes or brackets in a query change a score 500-fold.
DROP FUNCTION IF EXISTS cnai.ocr_match_score(tsvector, text, tsquery, text);
DROP FUNCTION IF EXISTS cnai.ocr_score(text, integer, boolean, boolean);
DROP FUNCTION IF EXISTS cnai.ocr_score(integer, integer, boolean, boolean);
-- text_chars: the photo's cnai.searchable_chars (cnai.ocr.text_chars).
CREATE OR REPLACE FUNCTION cnai.ocr_text_share(text_chars integer, query_chars integer) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN least(1.0, query_chars::float8 / greatest(1, text_chars));
-- A single expression, so that PostgreSQL inlines it where a search scores thousands of matches.
CREATE OR REPLACE FUNCTION cnai.ocr_score(text_chars integer, query_chars integer, as_typed boolean, fuzzy boolean,
                                          words boolean DEFAULT NULL)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN CASE WHEN fuzzy AND words THEN 0.45 + 0.05 * cnai.ocr_text_share(text_chars, query_chars)
              WHEN fuzzy THEN 0.45 * cnai.ocr_text_share(text_chars, query_chars)
              ELSE CASE WHEN words IS NULL THEN 0.5 WHEN words THEN 0.75 ELSE 0.5 END
                   + CASE WHEN words IS NULL THEN 0.5 ELSE 0.25 END * cnai.ocr_text_share(text_chars, query_chars)
                     * CASE WHEN as_typed THEN 1.0 ELSE 0.5 END END;

-- Exact matches under this many: the fuzzy fallback adds matches with one OCR error allowed, ranked after them.
CREATE OR REPLACE FUNCTION cnai.fuzzy_below() RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 5;

-- A whole-number setting of cnai's (ALTER DATABASE ... SET, or SET in a session): default_value when unset, a clear
-- error when it is not a whole number of at least least_value.
CREATE OR REPLACE FUNCTION cnai.whole_number_setting(name text, default_value integer, least_value integer)
RETURNS integer LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
  setting text := nullif(btrim(current_setting(name, true)), '');
BEGIN
  IF setting IS NULL THEN
    RETURN default_value;
  END IF;
  IF setting !~ '^[0-9]{1,9}$' OR setting::integer < least_value THEN
    RAISE EXCEPTION '% must be a whole number of at least %, got %', name, least_value, setting
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN setting::integer;
END $$;

-- How an `ocr:` search stays quick on a large library: cnai.ocr's text index (ocr_search_keys) holds each lexeme
-- prefixed with the photo's owner and the bucket of its text's length, so the search reads one user's matches
-- only, shortest texts first (a match there scores best, cnai.ocr_score), a range of length buckets at a time, and
-- stops once no text longer than those read could enter the page. A very common character (的, 店) matches tens
-- of thousands of a user's photos; its page comes from the first few hundred.

-- At most this many matches are read and scored per search, for a query of several words or phrases (whose score
-- also depends on whether the words are adjacent as typed, so longer texts may still outscore shorter ones):
-- reading stops earlier as soon as the page is certain. Above it, a match in a longer text is left out even where
-- the words are adjacent there and not in the shorter ones. 500 changed no page of 100 against ranking every match
-- (the labelled set; 32 searches of a million photos, bench/search_scale.py) and halved the 8-client p95 of such
-- queries there against 2000. A query of one word or phrase never needs it. The setting `cnai.ocr_candidates`
-- (ALTER DATABASE ... SET, or SET in a session) changes it; a page deeper than it raises it to the page's end.
CREATE OR REPLACE FUNCTION cnai.ocr_candidates() RETURNS integer LANGUAGE sql STABLE PARALLEL SAFE
  RETURN cnai.whole_number_setting('cnai.ocr_candidates', 500, 1);

-- The tsquery with each phrase operator made an AND: the GIN index answers it alone, with no recheck that reads
-- every match's tokens. Lexemes never hold '<' or '>' (cnai.separator_class splits them out).
CREATE OR REPLACE FUNCTION cnai.tsquery_unordered(q tsquery) RETURNS tsquery LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN regexp_replace(q::text, ' <(-|[0-9]+)> ', ' & ', 'g')::tsquery;

-- `unordered` (no phrase operators: cnai.tsquery_unordered) as a query of ocr_search_keys: its matches among the
-- texts of owners whose length is in buckets lo..hi.
CREATE OR REPLACE FUNCTION cnai.ocr_keys_query(unordered tsquery, owners uuid[], lo integer, hi integer)
RETURNS tsquery LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT string_agg('(' || regexp_replace(unordered::text, '''((?:[^'']|'''')*)''',
                                          '''' || cnai.ocr_key_prefix(o, b) || '\1''', 'g') || ')', ' | ')::tsquery
    FROM (SELECT DISTINCT o FROM unnest(owners) AS o WHERE o IS NOT NULL) AS d(o), generate_series(lo, hi) b;
$$;

-- How many terms a search asks the index for at most: 16, fewer for many owners (about 500 per length bucket in all).
CREATE OR REPLACE FUNCTION cnai.ocr_most_terms(owners integer) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN greatest(1, least(16, 500 / greatest(1, owners)));

-- The terms the index is asked for: `unordered` itself, or, for an AND of more than most_terms distinct lexemes,
-- most_terms of them (the rows found are checked against all). The index query holds each term once per owner and
-- length bucket: a 256-character query, or an administrator's search of every user on a large server, would make
-- it too large for a tsquery.
CREATE OR REPLACE FUNCTION cnai.ocr_index_terms(unordered tsquery, most_terms integer) RETURNS tsquery
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN regexp_replace(unordered::text, '''(?:[^'']|'''')*''(?::\*)?', '', 'g') ~ '^[&() ]*$'
               AND numnode(unordered) > 2 * most_terms - 1
              THEN (SELECT string_agg(l, ' & ')
                      FROM (SELECT DISTINCT m[1] AS l
                              FROM regexp_matches(unordered::text, '(''(?:[^'']|'''')*''(?::\*)?)', 'g') AS m
                             ORDER BY 1 LIMIT most_terms) AS x)::tsquery
              ELSE unordered END;
$$;

-- The ranges of length buckets (cnai.length_bucket) a search reads in turn, by their last bucket: the first holds
-- texts of up to 5 characters; the last, 1449 characters and more. Ranges of long texts hold two buckets each, not
-- one range from 182 characters on: a search of several words often ends among those (cnai.search_ocr), and a
-- range is read whole before its rows are sorted by length (at a million photos, `奶茶 半价` 5.8 -> 3.8 ms).
CREATE OR REPLACE FUNCTION cnai.ocr_bucket_ranges() RETURNS integer[] LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN ARRAY[4, 6, 8, 10, 12, 14, 16, 18, 20, 24];

-- The shortest text a bucket holds.
CREATE OR REPLACE FUNCTION cnai.bucket_least_chars(bucket integer) RETURNS integer LANGUAGE sql IMMUTABLE
PARALLEL SAFE
  RETURN ceil(power(2.0, bucket / 2.0) - 1e-9)::integer;

-- The least score a page can end on, from matches read in order of length (their lengths, and whether they hold
-- the query's words: NULL without zhparser): the need-th best of their scores with their words apart (as typed for
-- a query of one word or phrase). A match scores at least that, so the page's last score is at least this.
CREATE OR REPLACE FUNCTION cnai.ocr_page_floor(lengths integer[], hits boolean[], query_chars integer,
                                               one_group boolean, need integer) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT cnai.ocr_score(x.n, query_chars, one_group, false, x.hit) AS least_score
    FROM unnest(lengths, hits) AS x(n, hit)
   ORDER BY 1 DESC OFFSET need - 1 LIMIT 1;
$$;

-- The word pass of cnai.search_ocr, where zhparser is usable: texts that hold the query's words anywhere (words,
-- AND-ed: cnai.zh_words_query) but not the query as typed (exact), shortest texts first (their score follows the
-- length alone), read from the word index a range of length buckets at a time, as the exact pass reads.
DROP FUNCTION IF EXISTS cnai.search_ocr_words(tsquery, tsquery, integer, uuid[], integer, integer, text[], uuid);
CREATE OR REPLACE FUNCTION cnai.search_ocr_words(words tsquery, exact tsquery, query_chars integer, owner_ids uuid[],
                                                 lim integer, visibilities text[], locked_owner uuid)
RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
  -- as the exact pass reads: the rows found are checked against all words
  index_terms tsquery := cnai.ocr_index_terms(words, cnai.ocr_most_terms(cardinality(owner_ids)));
  keys tsquery;
  lo integer := 0;
  hi integer;
  ids uuid[] := '{}';
  lengths integer[] := '{}';
  more_ids uuid[];
  more_lengths integer[];
BEGIN
  FOREACH hi IN ARRAY cnai.ocr_bucket_ranges() LOOP
    keys := cnai.ocr_keys_query(index_terms, owner_ids, lo, hi);
    SELECT coalesce(array_agg(m.asset_id ORDER BY m.text_chars, m.asset_id), '{}'),
           coalesce(array_agg(m.text_chars ORDER BY m.text_chars, m.asset_id), '{}')
      INTO more_ids, more_lengths
      FROM (SELECT m.asset_id, m.text_chars
              FROM (SELECT o.ctid, o.asset_id, o.text_chars FROM cnai.ocr o
                     WHERE cnai.ocr_word_keys(o.owner_id, o.text_chars, o.text) @@ keys
                       AND o.owner_id = ANY (owner_ids)
                     ORDER BY o.text_chars, o.asset_id OFFSET 0) m
             WHERE (SELECT NOT coalesce(o.tokens @@ exact, false)
                           AND (index_terms = words OR cnai.zh_words(o.text) @@ words)
                      FROM cnai.ocr o WHERE o.ctid = m.ctid)
               AND (SELECT cnai.search_may_show(a."ownerId", a.visibility::text, a.status::text, a."deletedAt",
                                                owner_ids, visibilities, locked_owner)
                      FROM public.asset a WHERE a.id = m.asset_id)
             ORDER BY m.text_chars, m.asset_id
             LIMIT lim - cardinality(ids)) m;
    ids := ids || more_ids;
    lengths := lengths || more_lengths;
    EXIT WHEN cardinality(ids) >= lim;
    lo := hi + 1;
  END LOOP;
  RETURN QUERY
    SELECT c.asset_id, cnai.ocr_score(c.text_chars, query_chars, false, true, true), c.k::integer
      FROM unnest(ids, lengths) WITH ORDINALITY AS c(asset_id, text_chars, k);
END $$;

CREATE OR REPLACE FUNCTION cnai.search_ocr(q_text text, owner_ids uuid[], lim integer,
                                           visibilities text[] DEFAULT NULL, locked_owner uuid DEFAULT NULL)
RETURNS TABLE (asset_id uuid, score float8, ocr_rank integer) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
  -- parsed once, into variables: inside the query, a prepared statement's generic plan (from its 6th run on)
  -- would parse it again for every row
  q record := cnai.zh_query(q_text);
  one_group boolean := q.exact = q.phrase;
  bound integer := greatest(cnai.ocr_candidates(), lim);
  -- NULL without a usable zhparser: bigrams alone. Not for one character: the word index holds every character
  -- (multi modes), so the words would change no rank and only cost a read of the word index.
  words tsquery := CASE WHEN q.query_chars > 1 THEN cnai.zh_words_query(q_text) END;
  word_terms tsquery := cnai.ocr_index_terms(words, cnai.ocr_most_terms(cardinality(owner_ids)));
  word_keys tsquery;
  -- what the word pass found, ranked after the exact matches
  word_ids uuid[] := '{}';
  word_scores float8[] := '{}';
  found_before integer := 0;
  found_now integer;
  must tsquery := q.exact;
  must_not tsquery;
  -- the score follows the text's length alone: the shortest matches are the page
  by_length boolean;
  -- matches this pass reads at most: the rest of the page, or (scores not by length alone) the bound
  wanted integer;
  -- the page's rest, and the least score it can end on (page_floor, below)
  need integer;
  page_floor float8;
  index_exact boolean;
  index_terms tsquery;
  keys tsquery;
  lo integer;
  hi integer;
  -- the matches read, in order of length: ids, lengths, where their rows are, whether they hold the query's words
  -- (where zhparser is usable; else empty, read as NULL), whether they hold the words adjacent as typed
  ids uuid[];
  lengths integer[];
  places tid[];
  hits boolean[];
  typed boolean[];
  more_ids uuid[];
  more_lengths integer[];
  more_places tid[];
  more_hits boolean[];
BEGIN
  -- exact matches, then (when they are few) those with the query's words anywhere, then the fuzzy fallback's
  -- others, each ranked after the ones before
  FOR fuzzy IN 0..1 LOOP
    IF fuzzy = 1 AND words IS NOT NULL AND found_before < least(lim, cnai.fuzzy_below()) THEN
      SELECT coalesce(array_agg(w.asset_id ORDER BY w.ocr_rank), '{}'),
             coalesce(array_agg(w.score ORDER BY w.ocr_rank), '{}')
        INTO word_ids, word_scores
        FROM cnai.search_ocr_words(words, q.exact, q.query_chars, owner_ids, lim - found_before, visibilities,
                                   locked_owner) w;
      RETURN QUERY SELECT w.asset_id, w.score, found_before + w.k::integer
                     FROM unnest(word_ids, word_scores) WITH ORDINALITY AS w(asset_id, score, k);
      found_before := found_before + cardinality(word_ids);
    END IF;
    IF fuzzy = 1 THEN
      EXIT WHEN found_before >= least(lim, cnai.fuzzy_below()) OR q.fuzzy = q.exact;
      must := q.fuzzy;
      must_not := q.exact;
    END IF;
    EXIT WHEN must IS NULL;
    index_terms := cnai.ocr_index_terms(cnai.tsquery_unordered(must), cnai.ocr_most_terms(cardinality(owner_ids)));
    -- a fuzzy query of a long run holds a variant per character: too large an index query for what it finds
    EXIT WHEN fuzzy = 1 AND numnode(index_terms) * cardinality(owner_ids) > 1000;
    by_length := fuzzy = 1 OR (one_group AND words IS NULL);
    need := lim - found_before;
    -- the fuzzy pass leaves out what the word pass found: read that many more
    wanted := CASE WHEN by_length THEN need + cardinality(word_ids) ELSE bound END;
    -- the index answers must exactly (no phrase in it, nothing to exclude): no text needs reading to check it
    index_exact := must = index_terms AND must_not IS NULL;
    ids := '{}';
    lengths := '{}';
    places := '{}';
    hits := '{}';
    lo := 0;
    -- the owners' matches, a range of length buckets at a time, each checked in order (subqueries, not joins, so
    -- only rows up to the last one kept are read)
    FOREACH hi IN ARRAY cnai.ocr_bucket_ranges() LOOP
      keys := cnai.ocr_keys_query(index_terms, owner_ids, lo, hi);
      SELECT coalesce(array_agg(m.asset_id ORDER BY m.text_chars, m.asset_id), '{}'),
             coalesce(array_agg(m.text_chars ORDER BY m.text_chars, m.asset_id), '{}'),
             coalesce(array_agg(m.ctid ORDER BY m.text_chars, m.asset_id), '{}')
        INTO more_ids, more_lengths, more_places
        FROM (SELECT m.ctid, m.asset_id, m.text_chars
                FROM (SELECT o.ctid, o.asset_id, o.text_chars FROM cnai.ocr o
                       WHERE cnai.ocr_search_keys(o.owner_id, o.text_chars, o.tokens) @@ keys
                         AND o.owner_id = ANY (owner_ids)
                       ORDER BY o.text_chars, o.asset_id OFFSET 0) m
               WHERE (index_exact OR (SELECT o.tokens @@ must AND NOT coalesce(o.tokens @@ must_not, false)
                                        FROM cnai.ocr o WHERE o.ctid = m.ctid))
                 AND (SELECT cnai.search_may_show(a."ownerId", a.visibility::text, a.status::text, a."deletedAt",
                                                  owner_ids, visibilities, locked_owner)
                        FROM public.asset a WHERE a.id = m.asset_id)
               ORDER BY m.text_chars, m.asset_id
               LIMIT wanted - cardinality(ids)) m;
      -- which of them hold the query's words: one read of the word index for the owners and these lengths, its rows
      -- matched to the new matches by ctid, instead of segmenting each text (which costs ~40 us for a short text
      -- and a millisecond for a long one)
      IF fuzzy = 0 AND words IS NOT NULL AND cardinality(more_places) > 0 THEN
        word_keys := cnai.ocr_keys_query(word_terms, owner_ids, lo, hi);
        SELECT coalesce(array_agg(w.place IS NOT NULL
                                  AND (word_terms = words OR (SELECT cnai.zh_words(o.text) @@ words
                                                                FROM cnai.ocr o WHERE o.ctid = c.place))
                                  ORDER BY c.n), '{}')
          INTO more_hits
          FROM unnest(more_places) WITH ORDINALITY AS c(place, n)
          LEFT JOIN (SELECT o.ctid AS place FROM cnai.ocr o
                      WHERE cnai.ocr_word_keys(o.owner_id, o.text_chars, o.text) @@ word_keys OFFSET 0) w
            ON w.place = c.place;
        hits := hits || more_hits;
      END IF;
      ids := ids || more_ids;
      lengths := lengths || more_lengths;
      places := places || more_places;
      EXIT WHEN cardinality(ids) >= wanted;
      -- scores not by length alone: no longer text could enter the page (page_floor, below)
      IF NOT by_length AND cardinality(ids) >= need THEN
        page_floor := cnai.ocr_page_floor(lengths, hits, q.query_chars, one_group, need);
        EXIT WHEN cnai.ocr_score(cnai.bucket_least_chars(hi + 1), q.query_chars, true, false,
                                 CASE WHEN words IS NOT NULL THEN true END) < page_floor;
      END IF;
      lo := hi + 1;
    END LOOP;
    -- A match scores at least as much as with its words apart (page_floor: the page's worth of best such scores
    -- among the matches read sets the least score the page ends on). A match whose score with its words adjacent
    -- stays below it cannot enter the page: left out without reading whether its words are adjacent.
    IF NOT by_length AND cardinality(ids) > need THEN
      page_floor := cnai.ocr_page_floor(lengths, hits, q.query_chars, one_group, need);
      SELECT coalesce(array_agg(c.asset_id ORDER BY c.k), '{}'), coalesce(array_agg(c.n ORDER BY c.k), '{}'),
             coalesce(array_agg(c.place ORDER BY c.k), '{}'), coalesce(array_agg(c.hit ORDER BY c.k), '{}')
        INTO ids, lengths, places, hits
        FROM unnest(ids, lengths, places, hits) WITH ORDINALITY AS c(asset_id, n, place, hit, k)
       WHERE cnai.ocr_score(c.n, q.query_chars, true, false, c.hit) >= page_floor;
    END IF;
    -- whether each match holds the words adjacent as typed: read at the row's ctid (the calling query's snapshot,
    -- which a STABLE function keeps, keeps each row version where it was), as a second descent of the primary key
    -- for each match cost as much as reading its tokens
    IF one_group OR fuzzy = 1 THEN
      typed := array_fill(true, ARRAY[cardinality(ids)]);
    ELSE
      SELECT coalesce(array_agg(t.typed ORDER BY c.n), '{}') INTO typed
        FROM unnest(places) WITH ORDINALITY AS c(place, n)
        LEFT JOIN LATERAL (SELECT o.tokens @@ q.phrase AS typed FROM cnai.ocr o WHERE o.ctid = c.place) t ON true;
    END IF;
    RETURN QUERY
      SELECT c.asset_id, s.score, found_before + (row_number() OVER (ORDER BY s.score DESC, c.n, c.asset_id))::integer
        FROM unnest(ids, lengths, typed, hits) AS c(asset_id, n, typed, hit)
       CROSS JOIN LATERAL (SELECT cnai.ocr_score(c.n, q.query_chars, c.typed, fuzzy = 1,
                                                 CASE WHEN fuzzy = 0 THEN c.hit END) AS score) s
       -- the word pass had those
       WHERE NOT c.asset_id = ANY (word_ids)
       ORDER BY s.score DESC, c.n, c.asset_id
       LIMIT need;
    GET DIAGNOSTICS found_now = ROW_COUNT;
    found_before := found_before + found_now;
  END LOOP;
END $$;

-- Users (owner_ids together) with fewer photos than this are searched by comparing the query with each of their
-- photos' vectors: exact, and quicker than the HNSW index, which must skip past other users' photos (for a user
-- with a small share of a large library, past so many that pgvector gives up before finding enough).
CREATE OR REPLACE FUNCTION cnai.clip_exact_below() RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 3000;

-- The nearest photos through the HNSW index, skipping those the search may not show. The planner is kept from
-- comparing every photo instead (sort and sequential scan off): it prices that below the index for a user with a
-- tenth of the library, and it is slower there and grows with the library.
CREATE OR REPLACE FUNCTION cnai.clip_nearest_indexed(query_embedding vector, owner_ids uuid[], lim integer,
                                                     visibilities text[], locked_owner uuid, clip_model text)
RETURNS TABLE (asset_id uuid, distance float8) LANGUAGE plpgsql STABLE
SET enable_sort = off SET enable_seqscan = off AS $$
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
    SELECT c.asset_id, (c.embedding <=> query_embedding)::float8
      FROM cnai.clip c JOIN public.asset a ON a.id = c.asset_id
     WHERE cnai.search_may_show(a."ownerId", a.visibility::text, a.status::text, a."deletedAt",
                                owner_ids, visibilities, locked_owner)
       AND (clip_model IS NULL OR c.model = clip_model)
     ORDER BY c.embedding <=> query_embedding
     LIMIT lim;
END $$;

-- clip_model: only embeddings of this model (cnai.clip.model), as a query embedded by one model means nothing
-- next to another model's vectors.
CREATE OR REPLACE FUNCTION cnai.search_clip(query_embedding vector, owner_ids uuid[], lim integer,
                                            visibilities text[] DEFAULT NULL, locked_owner uuid DEFAULT NULL,
                                            clip_model text DEFAULT NULL)
RETURNS TABLE (asset_id uuid, distance float8, clip_rank integer) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
  exact_below integer := cnai.clip_exact_below();
BEGIN
  IF (SELECT count(*) FROM (SELECT FROM public.asset a WHERE a."ownerId" = ANY (owner_ids) LIMIT exact_below) n)
     < exact_below THEN
    RETURN QUERY
      SELECT n.asset_id, n.distance, (row_number() OVER (ORDER BY n.distance, n.asset_id))::integer
        FROM (SELECT c.asset_id, (c.embedding <=> query_embedding)::float8 AS distance
                FROM public.asset a JOIN cnai.clip c ON c.asset_id = a.id
               WHERE a."ownerId" = ANY (owner_ids)
                 AND cnai.search_may_show(a."ownerId", a.visibility::text, a.status::text, a."deletedAt",
                                          owner_ids, visibilities, locked_owner)
                 AND (clip_model IS NULL OR c.model = clip_model)) n
       ORDER BY n.distance, n.asset_id
       LIMIT lim;
    RETURN;
  END IF;
  RETURN QUERY
    SELECT n.asset_id, n.distance, (row_number() OVER (ORDER BY n.distance, n.asset_id))::integer
      FROM cnai.clip_nearest_indexed(query_embedding, owner_ids, lim, visibilities, locked_owner, clip_model) n
     ORDER BY n.distance, n.asset_id;
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
  -- each branch contributes as deep as the page reaches. Twice that depth (as Supabase's and ParadeDB's hybrid
  -- search take) doubled the CLIP branch's cost on a large library, which the HNSW scan past other users' photos
  -- dominates; it changes the page's lower part (bench/search_scale.py prints how much).
  branch := least(lim + offset_, 2000);
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

-- The part of an OCR text that a query matched, for showing under a result: about `width` characters around the
-- first match, each matched stretch between mark_open and mark_close (default «…»), newlines as spaces, "…" where
-- text was cut. Matching is the search's: folded (Traditional/Simplified, width, case), across spaces that OCR put
-- inside a word (`«停 车场»`); for a result that only the fuzzy fallback found, the query's 2-character runs that
-- occur are marked. NULL when nothing of the query occurs. The text is not escaped: a caller that shows it as
-- HTML escapes it first, or passes marks that cannot occur in OCR text.
CREATE OR REPLACE FUNCTION cnai.ocr_snippet(doc text, query text, width integer DEFAULT 40,
                                            mark_open text DEFAULT '«', mark_close text DEFAULT '»')
RETURNS text LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  chars text[] := regexp_split_to_array(coalesce(doc, ''), '');
  n integer := coalesce(array_length(chars, 1), 0);
  origin integer[];   -- for each searchable folded character: the index in chars it comes from
  folded text;        -- the searchable folded characters, separators left out
  marked boolean[] := array_fill(false, ARRAY[greatest(n, 1)]);
  needles text[];
  needle text;
  at integer;
  found integer;
  first_mark integer;
  last_mark integer;
  lo integer;
  hi integer;
  out text := '';
BEGIN
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  width := greatest(coalesce(width, 40), 1);
  -- fold character by character, so each folded character knows where it came from (NFKC may expand one)
  SELECT array_agg(i ORDER BY i, j), string_agg(f, '' ORDER BY i, j) INTO origin, folded
    FROM unnest(chars) WITH ORDINALITY AS c(ch, i),
         regexp_split_to_table(cnai.zh_fold(ch), '') WITH ORDINALITY AS x(f, j)
   WHERE f !~ ('[' || cnai.separator_class() || ']');
  SELECT array_agg(piece ORDER BY ord) INTO needles FROM cnai.query_pieces(regexp_replace(query, '^\s*ocr:', '', 'i'));
  IF folded IS NULL OR needles IS NULL THEN
    RETURN NULL;
  END IF;
  FOR pass IN 1..2 LOOP
    FOREACH needle IN ARRAY needles LOOP
      at := 0;
      LOOP
        found := strpos(substr(folded, at + 1), needle);
        EXIT WHEN found = 0;
        at := at + found;
        FOR k IN origin[at]..origin[at + char_length(needle) - 1] LOOP
          marked[k] := true;
        END LOOP;
      END LOOP;
    END LOOP;
    EXIT WHEN true = ANY (marked);
    -- nothing as typed (a fuzzy match): mark the query's 2-character runs that occur
    SELECT array_agg(substr(piece, i, 2)) INTO needles
      FROM cnai.query_pieces(regexp_replace(query, '^\s*ocr:', '', 'i')), generate_series(1, char_length(piece) - 1) i
     WHERE is_cjk;
    EXIT WHEN needles IS NULL;
  END LOOP;
  SELECT min(i), max(i) INTO first_mark, last_mark FROM generate_series(1, n) i WHERE marked[i];
  IF first_mark IS NULL THEN
    RETURN NULL;
  END IF;
  -- the window: the first matched stretch, then context on both sides
  last_mark := first_mark;
  WHILE last_mark < n AND marked[last_mark + 1] LOOP
    last_mark := last_mark + 1;
  END LOOP;
  lo := greatest(1, first_mark - greatest(0, width - (last_mark - first_mark + 1)) / 2);
  hi := least(n, greatest(last_mark, lo + width - 1));
  lo := greatest(1, least(lo, hi - width + 1));
  FOR i IN lo..hi LOOP
    IF marked[i] AND (i = lo OR NOT marked[i - 1]) THEN
      out := out || mark_open;
    END IF;
    out := out || CASE WHEN chars[i] ~ '[\r\n]' THEN ' ' ELSE chars[i] END;
    IF marked[i] AND (i = hi OR NOT marked[i + 1]) THEN
      out := out || mark_close;
    END IF;
  END LOOP;
  RETURN CASE WHEN lo > 1 THEN '…' ELSE '' END || out || CASE WHEN hi < n THEN '…' ELSE '' END;
END $$;

-- Snippets for search results: cnai.ocr_snippet of each of asset_ids that belongs to one of owner_ids (the same
-- owners as the cnai.search call; required, as there), for the same query (an 'ocr:' prefix is fine).
CREATE OR REPLACE FUNCTION cnai.search_snippets(query text, asset_ids uuid[], owner_ids uuid[],
                                                width integer DEFAULT 40, mark_open text DEFAULT '«',
                                                mark_close text DEFAULT '»')
RETURNS TABLE (asset_id uuid, snippet text) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
  IF owner_ids IS NULL THEN
    RAISE EXCEPTION 'cnai.search_snippets: owner_ids is required: the ids of the users whose photos were searched'
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  RETURN QUERY
    SELECT o.asset_id, cnai.ocr_snippet(o.text, search_snippets.query, search_snippets.width,
                                        search_snippets.mark_open, search_snippets.mark_close)
      FROM cnai.ocr o JOIN public.asset a ON a.id = o.asset_id
     WHERE o.asset_id = ANY (asset_ids) AND a."ownerId" = ANY (owner_ids) AND a."deletedAt" IS NULL;
END $$;

-- zhparser's word index, where zhparser is usable (a no-op elsewhere, and never an error): here, as a new
-- database has cnai.ocr only now.
SELECT cnai.zh_words_prepare();
