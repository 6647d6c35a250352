-- Schema (append-only: never edit once released; add a new numbered file).
-- The length a match's score is measured against, stored beside the text: ranking the matches of a common character
-- reads this number instead of every matching text (cnai.search_ocr). Adding it rewrites cnai.ocr once, on upgrade.
ALTER TABLE cnai.ocr ADD COLUMN IF NOT EXISTS text_chars integer
  GENERATED ALWAYS AS (cnai.searchable_chars(text)) STORED;
