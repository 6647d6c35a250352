-- Code (re-applied whenever this file changes).
-- Chinese-aware tokenization that needs no C extension (works on stock Immich PostgreSQL, any locale).
-- CJK runs become overlapping bigrams plus unigrams (like Lucene's CJK analyzer with unigrams), so substrings
-- and 1-character queries match; other scripts split into case-folded words. Positions are kept so a
-- multi-character query matches as a phrase (its bigrams adjacent), not as scattered characters.

-- Han (incl. extension A and compatibility), kana, Hangul.
CREATE OR REPLACE FUNCTION cnai.cjk_class() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN '\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u309f\u30a0-\u30ff\uac00-\ud7af';

-- Separators: whitespace, ASCII punctuation, CJK and full-width punctuation, general punctuation.
CREATE OR REPLACE FUNCTION cnai.separator_class() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN '[:space:][:punct:]\u2000-\u206f\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u00a0-\u00bf';

-- Pieces of the text in order: each is either a CJK run or a word of another script.
CREATE OR REPLACE FUNCTION cnai.text_pieces(t text) RETURNS TABLE (piece text, is_cjk boolean, ord bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT p, p ~ ('^[' || cnai.cjk_class() || ']+$'), o
    FROM regexp_split_to_table(
           regexp_replace(lower(coalesce(t, '')), '([' || cnai.cjk_class() || ']+)', ' \1 ', 'g'),
           '[' || cnai.separator_class() || ']+') WITH ORDINALITY AS s(p, o)
   WHERE p <> '';
$$;

-- Tokens with positions: (token, position). A CJK run of n characters at base b gives unigram i and bigram
-- (i, i+1) both at b+i; a word takes one position.
CREATE OR REPLACE FUNCTION cnai.text_tokens(t text) RETURNS TABLE (token text, pos integer)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  WITH pieces AS (
    SELECT piece, is_cjk, ord,
           coalesce(sum(CASE WHEN is_cjk THEN char_length(piece) ELSE 1 END)
                      OVER (ORDER BY ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)::integer + 1 AS base
      FROM cnai.text_pieces(t)
  )
  SELECT piece, base FROM pieces WHERE NOT is_cjk
  UNION ALL
  SELECT substr(piece, i, 1), base + i - 1 FROM pieces, generate_series(1, char_length(piece)) i WHERE is_cjk
  UNION ALL
  SELECT substr(piece, i, 2), base + i - 1 FROM pieces, generate_series(1, char_length(piece) - 1) i WHERE is_cjk;
$$;

-- tsvector built through its input syntax ('lexeme':pos), so no text-search parser or locale is involved.
CREATE OR REPLACE FUNCTION cnai.zh_tsvector(t text) RETURNS tsvector LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(string_agg(
           '''' || replace(replace(token, '\', '\\'), '''', '''''') || ''':' || least(pos, 16383), ' '),
         '')::tsvector
    FROM cnai.text_tokens(t);
$$;

-- Query: CJK runs of 2+ characters become a phrase of their bigrams, a lone CJK character its unigram,
-- other words a prefix match (so "RE16" finds "RE16TGK"); pieces are AND-ed. NULL when nothing is searchable.
CREATE OR REPLACE FUNCTION cnai.zh_tsquery(q text) RETURNS tsquery LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  WITH parts AS (
    SELECT ord, CASE
      WHEN NOT is_cjk THEN quote_literal(piece) || ':*'
      WHEN char_length(piece) = 1 THEN quote_literal(piece)
      ELSE '(' || (SELECT string_agg(quote_literal(substr(piece, i, 2)), ' <-> ' ORDER BY i)
                     FROM generate_series(1, char_length(piece) - 1) i) || ')'
    END AS part
      FROM cnai.text_pieces(q)
  )
  SELECT string_agg(part, ' & ' ORDER BY ord)::tsquery FROM parts;
$$;
