-- Schema (append-only), standalone only.
-- A minimal Immich-compatible schema (Immich 3.x names and types) for the embedded default and tests.
-- Only the tables and columns cnai reads or writes. Applied only when no Immich schema exists
-- (`cnai migrate --standalone`, or the embedded server); never on a real Immich database.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS cube;
CREATE EXTENSION IF NOT EXISTS earthdistance;

CREATE OR REPLACE FUNCTION f_unaccent(text) RETURNS text
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
  RETURN unaccent('unaccent', $1);

CREATE TABLE IF NOT EXISTS "user" (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  email varchar NOT NULL UNIQUE,
  name varchar NOT NULL DEFAULT '',
  "isAdmin" boolean NOT NULL DEFAULT false,
  "createdAt" timestamptz NOT NULL DEFAULT now(),
  "updatedAt" timestamptz NOT NULL DEFAULT now(),
  "deletedAt" timestamptz
);

CREATE TABLE IF NOT EXISTS asset (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "ownerId" uuid NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
  type varchar NOT NULL DEFAULT 'IMAGE',
  "originalPath" text NOT NULL,
  "originalFileName" varchar NOT NULL,
  "fileCreatedAt" timestamptz NOT NULL DEFAULT now(),
  "fileModifiedAt" timestamptz NOT NULL DEFAULT now(),
  "localDateTime" timestamptz NOT NULL DEFAULT now(),
  "createdAt" timestamptz NOT NULL DEFAULT now(),
  "updatedAt" timestamptz NOT NULL DEFAULT now(),
  "deletedAt" timestamptz,
  status varchar NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'trashed', 'deleted')),
  visibility varchar NOT NULL DEFAULT 'timeline' CHECK (visibility IN ('archive', 'timeline', 'hidden', 'locked')),
  "isFavorite" boolean NOT NULL DEFAULT false,
  "isOffline" boolean NOT NULL DEFAULT false,
  "isExternal" boolean NOT NULL DEFAULT false,
  "libraryId" uuid,
  "livePhotoVideoId" uuid,
  "stackId" uuid,
  "duplicateId" uuid,
  checksum bytea NOT NULL,
  "checksumAlgorithm" varchar NOT NULL DEFAULT 'sha1',
  thumbhash bytea,
  duration varchar,
  width integer,
  height integer,
  "isEdited" boolean NOT NULL DEFAULT false,
  "updateId" uuid NOT NULL DEFAULT gen_random_uuid(),
  UNIQUE ("ownerId", checksum)
);

CREATE TABLE IF NOT EXISTS asset_file (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "assetId" uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE,
  type varchar NOT NULL CHECK (type IN ('fullsize', 'preview', 'thumbnail', 'sidecar', 'encoded_video')),
  path varchar NOT NULL,
  "isEdited" boolean NOT NULL DEFAULT false,
  "isProgressive" boolean NOT NULL DEFAULT false,
  "isTransparent" boolean NOT NULL DEFAULT false,
  "createdAt" timestamptz NOT NULL DEFAULT now(),
  "updatedAt" timestamptz NOT NULL DEFAULT now(),
  "updateId" uuid NOT NULL DEFAULT gen_random_uuid(),
  UNIQUE ("assetId", type, "isEdited")
);

CREATE TABLE IF NOT EXISTS asset_job_status (
  "assetId" uuid PRIMARY KEY REFERENCES asset(id) ON DELETE CASCADE,
  "facesRecognizedAt" timestamptz,
  "metadataExtractedAt" timestamptz,
  "duplicatesDetectedAt" timestamptz,
  "ocrAt" timestamptz
);

CREATE TABLE IF NOT EXISTS smart_search (
  "assetId" uuid PRIMARY KEY REFERENCES asset(id) ON DELETE CASCADE,
  embedding vector(512) NOT NULL
);
ALTER TABLE smart_search ALTER COLUMN embedding SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS clip_index ON smart_search
  USING hnsw (embedding vector_cosine_ops) WITH (ef_construction = 300, m = 16);

CREATE TABLE IF NOT EXISTS person (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "createdAt" timestamptz NOT NULL DEFAULT now(),
  "updatedAt" timestamptz NOT NULL DEFAULT now(),
  "ownerId" uuid NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
  name varchar NOT NULL DEFAULT '',
  "thumbnailPath" varchar NOT NULL DEFAULT '',
  "isHidden" boolean NOT NULL DEFAULT false,
  "birthDate" date,
  "faceAssetId" uuid,
  "isFavorite" boolean NOT NULL DEFAULT false,
  color varchar,
  "updateId" uuid NOT NULL DEFAULT gen_random_uuid()
);

CREATE TABLE IF NOT EXISTS asset_face (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "assetId" uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE,
  "personId" uuid REFERENCES person(id) ON DELETE SET NULL,
  "imageWidth" integer NOT NULL DEFAULT 0,
  "imageHeight" integer NOT NULL DEFAULT 0,
  "boundingBoxX1" integer NOT NULL DEFAULT 0,
  "boundingBoxY1" integer NOT NULL DEFAULT 0,
  "boundingBoxX2" integer NOT NULL DEFAULT 0,
  "boundingBoxY2" integer NOT NULL DEFAULT 0,
  "sourceType" varchar NOT NULL DEFAULT 'machine-learning',
  "deletedAt" timestamptz,
  "updatedAt" timestamptz NOT NULL DEFAULT now(),
  "updateId" uuid NOT NULL DEFAULT gen_random_uuid(),
  "isVisible" boolean NOT NULL DEFAULT true
);
CREATE INDEX IF NOT EXISTS asset_face_asset_person ON asset_face ("assetId", "personId");
ALTER TABLE person DROP CONSTRAINT IF EXISTS person_face_asset_fk;
ALTER TABLE person ADD CONSTRAINT person_face_asset_fk
  FOREIGN KEY ("faceAssetId") REFERENCES asset_face(id) ON DELETE SET NULL;

CREATE TABLE IF NOT EXISTS face_search (
  "faceId" uuid PRIMARY KEY REFERENCES asset_face(id) ON DELETE CASCADE,
  embedding vector(512) NOT NULL
);

CREATE TABLE IF NOT EXISTS asset_ocr (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  "assetId" uuid NOT NULL REFERENCES asset(id) ON DELETE CASCADE,
  x1 real NOT NULL, y1 real NOT NULL, x2 real NOT NULL, y2 real NOT NULL,
  x3 real NOT NULL, y3 real NOT NULL, x4 real NOT NULL, y4 real NOT NULL,
  "boxScore" real NOT NULL,
  "textScore" real NOT NULL,
  text text NOT NULL,
  "isVisible" boolean NOT NULL DEFAULT true,
  "updateId" uuid NOT NULL DEFAULT gen_random_uuid()
);
CREATE INDEX IF NOT EXISTS "asset_ocr_assetId_idx" ON asset_ocr ("assetId");

CREATE TABLE IF NOT EXISTS ocr_search (
  "assetId" uuid PRIMARY KEY REFERENCES asset(id) ON DELETE CASCADE,
  text text NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_ocr_search_text ON ocr_search USING gin (f_unaccent(text) gin_trgm_ops);

CREATE TABLE IF NOT EXISTS system_metadata (
  key varchar PRIMARY KEY,
  value jsonb NOT NULL
);
