-- Schema (append-only: never edit once released; add a new numbered file).
-- Each OCR row carries its photo's owner, so a search reaches one user's matches without visiting every user's:
--  * ocr_owner_tokens: the tokens plus one lexeme naming the owner, so the GIN index intersects a user's photos
--    with the query's terms before any row is read (cnai.search_ocr's index path);
--  * ocr_owner_length: a user's photos with text, shortest first, so a very common term's best matches (the
--    shortest texts) are found by reading a user's photos in that order until enough match (its walk path).
-- owner_id follows public.asset."ownerId" (cnai.ocr_take_owner and cnai.ocr_follow_owner, 222_ocr_owner.sql).
-- Adding it rewrites cnai.ocr and rebuilds its text index once, on upgrade.

-- The owner's lexeme: `owner:` and the id. A text's own lexemes never hold ':' (cnai.separator_class splits
-- there), so no text can match it. Both functions are part of the index's definition: never change them.
CREATE OR REPLACE FUNCTION cnai.owner_lexeme(owner_id uuid) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN 'owner:' || owner_id::text;
CREATE OR REPLACE FUNCTION cnai.ocr_search_tokens(owner_id uuid, tokens tsvector) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN tokens || array_to_tsvector(ARRAY[cnai.owner_lexeme(owner_id)]);

ALTER TABLE cnai.ocr ADD COLUMN IF NOT EXISTS owner_id uuid;
UPDATE cnai.ocr o SET owner_id = a."ownerId" FROM public.asset a WHERE a.id = o.asset_id AND o.owner_id IS NULL;
ALTER TABLE cnai.ocr ALTER COLUMN owner_id SET NOT NULL;

CREATE INDEX IF NOT EXISTS ocr_owner_tokens ON cnai.ocr USING gin (cnai.ocr_search_tokens(owner_id, tokens));
CREATE INDEX IF NOT EXISTS ocr_owner_length ON cnai.ocr (owner_id, text_chars, asset_id) WHERE text_chars > 0;
-- every search now goes through ocr_owner_tokens
DROP INDEX IF EXISTS cnai.ocr_tokens;
