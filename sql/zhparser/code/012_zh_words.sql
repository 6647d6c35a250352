-- Code (re-applied whenever this file changes).
-- Words, where zhparser (SCWS) is installed and usable: a signal on top of the bigram index, never instead of it.
-- As the only index, word segmentation loses recall (a compound kept whole or split elsewhere finds nothing for
-- 药, 建设, 长江); on top of bigram matching it tells a real word from a false friend (上海 in 楼上海景厅, 市长
-- in 南京市长江大桥) and finds a query's words where they are not adjacent (增值税发票 in 增值税专用发票).
--   cnai.zh_words(text):       a text's words and, with SCWS's multi modes, the shorter words and characters inside
--                              them (长江大桥 also gives 长江, 大桥, 长, ...): what the word index holds.
--   cnai.zh_words_query(text): a query's words, AND-ed (no multi modes: 增值税发票 -> 增值税 & 发票); NULL where
--                              words are unusable, so callers fall back to bigrams alone.
-- zhparser's settings are pinned on each function (SET clauses): what a text gives must not depend on a session.
-- A change to what cnai.zh_words gives needs a new index (a new name below), as the index holds its old output.

-- COST: a segmentation per row is what the word index is there to avoid; the planner is told so.
CREATE OR REPLACE FUNCTION cnai.zh_words(t text) RETURNS tsvector LANGUAGE plpgsql IMMUTABLE PARALLEL RESTRICTED
  COST 1000 SET zhparser.multi_short = on SET zhparser.multi_duality = on SET zhparser.multi_zmain = on
  SET zhparser.multi_zall = on SET zhparser.punctuation_ignore = on SET zhparser.seg_with_duality = off AS $$
BEGIN
  RETURN to_tsvector('cnai.zh', cnai.zh_fold(t));
END $$;

-- The words that a query's text segments into, multi modes off (words only).
CREATE OR REPLACE FUNCTION cnai.zh_query_words(t text) RETURNS tsvector LANGUAGE plpgsql IMMUTABLE
  PARALLEL RESTRICTED
  SET zhparser.multi_short = off SET zhparser.multi_duality = off SET zhparser.multi_zmain = off
  SET zhparser.multi_zall = off SET zhparser.punctuation_ignore = on SET zhparser.seg_with_duality = off AS $$
BEGIN
  RETURN to_tsvector('cnai.zh', cnai.zh_fold(t));
END $$;

-- Whether zhparser's dictionary loaded: without one, SCWS gives single characters and nothing is a word (and says
-- so only in a NOTICE), so a zhparser without its dictionary counts as absent.
CREATE OR REPLACE FUNCTION cnai.zh_dictionary_loaded() RETURNS boolean LANGUAGE plpgsql STABLE PARALLEL RESTRICTED
AS $$
BEGIN
  RETURN EXISTS (SELECT FROM pg_ts_config c WHERE c.cfgname = 'zh' AND c.cfgnamespace = 'cnai'::regnamespace)
     AND tsvector_to_array(cnai.zh_query_words('增值税发票')) @> ARRAY['增值税', '发票'];
EXCEPTION WHEN OTHERS THEN  -- a library that no longer loads
  RETURN false;
END $$;

-- What the word index holds: a text's words, each prefixed as in ocr_search_keys with the photo's owner and the
-- bucket of its text's length (cnai.ocr_key_prefix, cnai.length_bucket: 204_ocr_owner.sql), so a search reads one
-- user's texts of a range of lengths from it, as from the bigram keys, and never segments a text to rank it.
CREATE OR REPLACE FUNCTION cnai.ocr_word_keys(owner_id uuid, text_chars integer, t text) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE PARALLEL RESTRICTED COST 1000 AS $$
DECLARE
  prefix text := cnai.ocr_key_prefix(owner_id, cnai.length_bucket(text_chars));
BEGIN
  RETURN array_to_tsvector(ARRAY(SELECT prefix || w FROM unnest(tsvector_to_array(cnai.zh_words(t))) AS w));
END $$;

-- The index that the word match of cnai.search_ocr reads; NULL until created (where zhparser is usable).
CREATE OR REPLACE FUNCTION cnai.zh_words_index() RETURNS regclass LANGUAGE sql STABLE PARALLEL SAFE
  RETURN to_regclass('cnai.ocr_word_keys');

-- What zhparser does for this database: (state, detail), state one of
--   absent                 not installed, or installed but not enabled (its library did not load): bigrams only
--   dictionary missing     enabled, but its dictionary did not load: treated as absent
--   index missing          usable, but the word index was not built (the dictionary was missing at migration)
--   used                   used
-- zhparser need not be preloaded (session_preload_libraries): a library first loaded by a parallel worker resets
-- zhparser's settings for the session, but cnai's word functions are PARALLEL RESTRICTED (never run in a worker)
-- and set those settings on every call. cnai never preloads it: a database that preloads a library every
-- connection fails once the library is gone (a new server image), Immich's connections too.
CREATE OR REPLACE FUNCTION cnai.zhparser_state(OUT state text, OUT detail text) LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_ts_config c WHERE c.cfgname = 'zh' AND c.cfgnamespace = 'cnai'::regnamespace) THEN
    state := 'absent';
    detail := CASE WHEN EXISTS (SELECT FROM pg_available_extensions WHERE name = 'zhparser')
                   THEN 'installed on the server but not enabled (its library did not load, see the migration''s '
                        'NOTICE); search uses the built-in bigram tokenizer'
                   ELSE 'not installed; search uses the built-in bigram tokenizer' END;
  ELSIF NOT cnai.zh_dictionary_loaded() THEN
    state := 'dictionary missing';
    detail := 'zhparser is enabled but segments no words: its dictionary (tsearch_data/dict.utf8.xdb in the '
              'server''s share folder, pg_config --sharedir) is missing or unreadable; search uses the built-in '
              'bigram tokenizer. Install the dictionary, then: SELECT cnai.zh_words_prepare()';
  ELSIF cnai.zh_words_index() IS NULL THEN
    state := 'index missing';
    detail := 'zhparser works but its word index was not built: SELECT cnai.zh_words_prepare()';
  ELSE
    state := 'used';
    detail := 'word ranking and word match on top of the bigram index';
  END IF;
END $$;

-- Whether search may use words: enabled, its dictionary loaded, the word index built, and not switched off with
-- the setting `cnai.zh_words` = off (ALTER DATABASE ... SET, or SET in a session: bigrams alone, to compare).
CREATE OR REPLACE FUNCTION cnai.zh_words_usable() RETURNS boolean LANGUAGE sql STABLE PARALLEL RESTRICTED
  RETURN coalesce(nullif(btrim(current_setting('cnai.zh_words', true)), ''), 'on') <> 'off'
     AND cnai.zh_words_index() IS NOT NULL AND cnai.zh_dictionary_loaded();

CREATE OR REPLACE FUNCTION cnai.zh_words_query(q text) RETURNS tsquery LANGUAGE plpgsql STABLE PARALLEL RESTRICTED
AS $$
DECLARE
  words text[];
BEGIN
  IF NOT cnai.zh_words_usable() THEN
    RETURN NULL;
  END IF;
  words := tsvector_to_array(cnai.zh_query_words(q));
  IF coalesce(cardinality(words), 0) = 0 THEN
    RETURN NULL;
  END IF;
  -- each word a quoted lexeme (quote and backslash escaped as tsquery reads them)
  RETURN array_to_string(ARRAY(SELECT '''' || replace(replace(w, '\', '\\'), '''', '''''') || ''''
                                 FROM unnest(words) w), ' & ')::tsquery;
END $$;

-- Builds the word index where zhparser is usable; a no-op without zhparser. The migration runs it; run it again after
-- installing a missing dictionary. Words are an extra: nothing about them raises (a NOTICE says what went wrong),
-- so nothing about them stops a migration.
CREATE OR REPLACE FUNCTION cnai.zh_words_prepare() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  IF to_regclass('cnai.ocr') IS NULL OR NOT cnai.zh_dictionary_loaded() THEN
    RETURN (cnai.zhparser_state()).state;  -- a new database: 210_search.sql runs this again after the tables
  END IF;
  CREATE INDEX IF NOT EXISTS ocr_word_keys ON cnai.ocr USING gin (cnai.ocr_word_keys(owner_id, text_chars, text));
  -- the earlier word index, of words without owner or length: every search that used it segmented each match
  DROP INDEX IF EXISTS cnai.ocr_zh_words_idx;
  RETURN (cnai.zhparser_state()).state;
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'cnai: zhparser''s word index could not be prepared (% %); search uses bigrams alone',
    SQLSTATE, SQLERRM;
  RETURN 'failed';
END $$;

SELECT cnai.zh_words_prepare();
