-- Code (re-applied whenever this file changes).
-- Where zhparser is installed, also provide a word-segmenting configuration, cnai.zh: a ranking signal and a
-- match of words anywhere in a text on top of the bigram index (012_zh_words.sql says how search uses it). Every
-- token type maps to a lexeme: the earlier n, v, a, i, e, l mapping dropped time words (周日), distinguishing
-- words (红烧) and whatever SCWS tags otherwise, and a query word dropped on one side only never matches.
-- Returns whether zhparser is enabled. `cnai migrate` calls it again on each run while zhparser is available on the
-- server but not enabled in the database (installed after this file ran), so installing it needs no code change.
CREATE OR REPLACE FUNCTION cnai.zhparser_enable() RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  types text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'zhparser') THEN
    RETURN false;
  END IF;
  CREATE EXTENSION IF NOT EXISTS zhparser;
  IF NOT EXISTS (SELECT 1 FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
                  WHERE n.nspname = 'cnai' AND c.cfgname = 'zh') THEN
    CREATE TEXT SEARCH CONFIGURATION cnai.zh (PARSER = zhparser);
  END IF;
  SELECT string_agg(quote_ident(t.alias), ', ' ORDER BY t.tokid) INTO types
    FROM pg_ts_config c, ts_token_type(c.cfgparser) t
   WHERE c.oid = 'cnai.zh'::regconfig;
  EXECUTE format('ALTER TEXT SEARCH CONFIGURATION cnai.zh DROP MAPPING IF EXISTS FOR %s', types);
  EXECUTE format('ALTER TEXT SEARCH CONFIGURATION cnai.zh ADD MAPPING FOR %s WITH simple', types);
  RETURN true;
-- not only a missing privilege: a listed zhparser whose library cannot load (a build for another server, a missing
-- dependency) must not stop the migration, as the built-in tokenizer serves without it
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'cnai: zhparser is available but could not be enabled (% %); using the built-in CJK tokenizer',
    SQLSTATE, SQLERRM;
  RETURN false;
END $$;

SELECT cnai.zhparser_enable();
