-- Schema (append-only: never edit once released; add a new numbered file).
-- Each OCR row carries its photo's owner, and the text index is keyed by owner and text length, so a search reads
-- only one user's matches, shortest texts first (the best a match can score), and stops when it has enough:
-- ocr_search_keys holds each of a text's lexemes prefixed with its owner and its length's bucket (`<owner>:<bucket>:`),
-- so one user's matches of a term in texts of a given length are one posting list, with no other user's photos to
-- skip and no row read to learn a length. owner_id follows public.asset."ownerId" (222_ocr_owner.sql).
-- Adding it rewrites cnai.ocr and rebuilds its text index once, on upgrade.

-- Length buckets: half octaves of the text's searchable characters (1, 2, 3, 4-5, 6-7, 8-11, 12-15, 16-22, ...,
-- 4096 and more). The functions below are part of the index's definition: never change them.
CREATE OR REPLACE FUNCTION cnai.length_bucket(text_chars integer) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN least(floor(2 * log(2.0, greatest(text_chars, 1)::numeric))::integer, 24);
-- An owner's lexemes' prefix: 12 hex digits of the id (two users that share them only read each other's matches
-- and drop them: the search checks owner_id) and the bucket. A text's own lexemes never hold ':'
-- (cnai.separator_class splits there), so no prefix is confused with text.
CREATE OR REPLACE FUNCTION cnai.ocr_key_prefix(owner_id uuid, bucket integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN left(replace(owner_id::text, '-', ''), 12) || ':' || bucket || ':';
-- The prefix is computed once per text, not once per lexeme (as a SQL function's subquery would: 24x slower to index).
CREATE OR REPLACE FUNCTION cnai.ocr_search_keys(owner_id uuid, text_chars integer, tokens tsvector) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  prefix text := cnai.ocr_key_prefix(owner_id, cnai.length_bucket(text_chars));
BEGIN
  RETURN array_to_tsvector(ARRAY(SELECT prefix || lexeme FROM unnest(tsvector_to_array(tokens)) AS lexeme));
END $$;

ALTER TABLE cnai.ocr ADD COLUMN IF NOT EXISTS owner_id uuid;
UPDATE cnai.ocr o SET owner_id = a."ownerId" FROM public.asset a WHERE a.id = o.asset_id AND o.owner_id IS NULL;
ALTER TABLE cnai.ocr ALTER COLUMN owner_id SET NOT NULL;

CREATE INDEX IF NOT EXISTS ocr_search_keys ON cnai.ocr
  USING gin (cnai.ocr_search_keys(owner_id, text_chars, tokens));
-- every search now goes through ocr_search_keys
DROP INDEX IF EXISTS cnai.ocr_tokens;
