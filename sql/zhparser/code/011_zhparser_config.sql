-- Code (re-applied whenever this file changes).
-- Where zhparser is installed, also provide a word-segmenting configuration for operators who want it.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'zhparser') THEN
    CREATE EXTENSION IF NOT EXISTS zhparser;
    IF NOT EXISTS (SELECT 1 FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
                    WHERE n.nspname = 'cnai' AND c.cfgname = 'zh') THEN
      CREATE TEXT SEARCH CONFIGURATION cnai.zh (PARSER = zhparser);
      ALTER TEXT SEARCH CONFIGURATION cnai.zh ADD MAPPING FOR n, v, a, i, e, l WITH simple;
    END IF;
  END IF;
-- not only a missing privilege: a listed zhparser whose library cannot load (a build for another server, a missing
-- dependency) must not stop the migration, as the built-in tokenizer serves without it
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'cnai: zhparser is available but could not be enabled (% %); using the built-in CJK tokenizer',
    SQLSTATE, SQLERRM;
END $$;
