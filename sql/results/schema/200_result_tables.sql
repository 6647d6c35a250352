-- Schema (append-only: never edit once released; add a new numbered file): the result tables.
-- Each row belongs to an Immich asset and goes with it (ON DELETE CASCADE).
CREATE TABLE IF NOT EXISTS cnai.ocr (
  asset_id uuid PRIMARY KEY REFERENCES public.asset(id) ON DELETE CASCADE,
  text text NOT NULL,            -- all lines, in reading order, joined by newlines
  lines jsonb NOT NULL,          -- [{text, box: [x1,y1,..,x4,y4] normalised 0-1, box_score, text_score}]
  model text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  tokens tsvector GENERATED ALWAYS AS (cnai.zh_tsvector(text)) STORED
);
CREATE INDEX IF NOT EXISTS ocr_tokens ON cnai.ocr USING gin (tokens);

CREATE TABLE IF NOT EXISTS cnai.clip (
  asset_id uuid PRIMARY KEY REFERENCES public.asset(id) ON DELETE CASCADE,
  model text NOT NULL,
  embedding vector(512) NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS clip_embedding ON cnai.clip USING hnsw (embedding vector_cosine_ops);

CREATE TABLE IF NOT EXISTS cnai.face (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  asset_id uuid NOT NULL REFERENCES public.asset(id) ON DELETE CASCADE,
  x1 real NOT NULL, y1 real NOT NULL, x2 real NOT NULL, y2 real NOT NULL,  -- pixels of the analysed image
  score real NOT NULL,
  embedding vector(512) NOT NULL,
  image_width integer NOT NULL CHECK (image_width > 0),   -- never 0x0: the old system's bug
  image_height integer NOT NULL CHECK (image_height > 0),
  model text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS face_asset ON cnai.face (asset_id);
CREATE INDEX IF NOT EXISTS face_embedding ON cnai.face USING hnsw (embedding vector_cosine_ops);
