-- Schema (append-only: never edit once released; add a new numbered file).
-- cnai.zh_tsvector now folds text before tokenizing it (Traditional -> Simplified, NFKC width and compatibility
-- forms): rows written before keep their old tokens, since a stored generated column is computed only when its row
-- is written. Rewriting the text recomputes them, so a Traditional sign indexed earlier is found by a Simplified
-- query too. One pass over cnai.ocr, once per database (minutes for a few hundred thousand photos, on upgrade).
UPDATE cnai.ocr SET text = text;
