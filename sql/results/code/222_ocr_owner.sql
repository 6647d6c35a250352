-- Code (re-applied whenever this file changes): cnai.ocr.owner_id follows its asset's owner (204_ocr_owner.sql).

-- Every OCR row takes its owner from its asset when written, whoever writes it.
CREATE OR REPLACE FUNCTION cnai.ocr_take_owner() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  SELECT a."ownerId" INTO NEW.owner_id FROM public.asset a WHERE a.id = NEW.asset_id;
  RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER cnai_ocr_take_owner BEFORE INSERT OR UPDATE OF asset_id ON cnai.ocr
  FOR EACH ROW EXECUTE FUNCTION cnai.ocr_take_owner();

-- Immich does not move a photo to another user today; should it, the photo's text moves with it. The WHEN clause
-- keeps Immich's other updates of "ownerId" (the same value) free.
CREATE OR REPLACE FUNCTION cnai.ocr_follow_owner() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  UPDATE cnai.ocr SET owner_id = NEW."ownerId" WHERE asset_id = NEW.id;
  RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER cnai_ocr_follow_owner AFTER UPDATE OF "ownerId" ON public.asset
  FOR EACH ROW WHEN (OLD."ownerId" IS DISTINCT FROM NEW."ownerId") EXECUTE FUNCTION cnai.ocr_follow_owner();
