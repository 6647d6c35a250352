-- Code (re-applied whenever this file changes): whether cnai's CLIP vectors may also fill Immich's smart_search,
-- and writing them there. Immich's CLIP model can change at any time (system_metadata 'system-config'); Immich
-- then empties smart_search and resizes its column to the new model's dimension. Mirror only while Immich asks
-- for a model our gateway answers with cn-clip, and the column has cnai.clip's dimension: never mix two models'
-- vectors in one column.

-- The CLIP model Immich is configured to use, without its owner prefix ('immich-app/ViT-B-32__openai'), or
-- Immich's default.
CREATE OR REPLACE FUNCTION cnai.immich_clip_model() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    (SELECT nullif(regexp_replace(m.value -> 'machineLearning' -> 'clip' ->> 'modelName', '^.*/', ''), '')
       FROM public.system_metadata m WHERE m.key = 'system-config'),
    'ViT-B-32__openai');
$$;

-- p_serve_as: the Immich model names our gateway answers with cnai's CLIP model.
CREATE OR REPLACE FUNCTION cnai.smart_search_mirror_ok(p_serve_as text[]) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT coalesce(
    cnai.immich_clip_model() = ANY (p_serve_as)
    AND (SELECT s.atttypmod = c.atttypmod
           FROM pg_catalog.pg_attribute s, pg_catalog.pg_attribute c
          WHERE s.attrelid = to_regclass('public.smart_search') AND s.attname = 'embedding' AND NOT s.attisdropped
            AND c.attrelid = 'cnai.clip'::regclass AND c.attname = 'embedding')
    AND has_table_privilege(to_regclass('public.smart_search'), 'INSERT, UPDATE'),
    false);
$$;

-- Write one CLIP vector to smart_search when Immich's current model allows it; returns whether it did. The
-- decision is made once per transaction (a listener's batch settles in one) and kept in a transaction-local
-- setting, so a batch reads Immich's configuration once however many vectors it writes.
CREATE OR REPLACE FUNCTION cnai.mirror_to_smart_search(p_asset_id uuid, p_embedding vector, p_serve_as text[])
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  decided text := current_setting('cnai.smart_search_mirror', true);  -- '' or NULL: not decided yet
BEGIN
  IF coalesce(decided, '') = '' THEN
    decided := cnai.smart_search_mirror_ok(p_serve_as)::text;
    PERFORM set_config('cnai.smart_search_mirror', decided, true);
  END IF;
  IF NOT decided::boolean THEN
    RETURN false;
  END IF;
  -- marked as cnai's own, so the trigger that follows Immich's smart_search writes (130_immich_reruns.sql) does not
  -- take it for Immich re-running CLIP
  PERFORM set_config('cnai.writer', 'listener', true);
  INSERT INTO public.smart_search ("assetId", embedding) VALUES (p_asset_id, p_embedding)
  ON CONFLICT ("assetId") DO UPDATE SET embedding = excluded.embedding;
  PERFORM set_config('cnai.writer', '', true);
  RETURN true;
END $$;
