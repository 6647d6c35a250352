-- Code (re-applied whenever this file changes).
-- Chinese-aware tokenization that needs no C extension (works on stock Immich PostgreSQL, any locale).
-- Text and queries are first folded to one form (cnai.zh_fold): NFKC (full-width letters and digits, the
-- ideographic space, compatibility ideographs and other compatibility forms become their plain forms), Traditional
-- Chinese characters become Simplified (OpenCC's table, 009_traditional_simplified.sql), letters lower case.
-- CJK runs become overlapping bigrams plus unigrams (like Lucene's CJK analyzer with unigrams), so substrings
-- and 1-character queries match; other scripts split into words. Positions are kept so a multi-character query
-- matches as a phrase (its bigrams adjacent), not as scattered characters; separators take no position, so
-- characters that OCR split with a space (`停 车场`) are still adjacent.
-- A change to what cnai.zh_tsvector produces needs a schema file that re-tokenizes cnai.ocr (see 202_retokenize).

-- Han (incl. extension A and compatibility), kana, Hangul.
CREATE OR REPLACE FUNCTION cnai.cjk_class() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN '\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u309f\u30a0-\u30ff\uac00-\ud7af';

-- Separators: whitespace, ASCII punctuation, CJK and full-width punctuation, general punctuation.
CREATE OR REPLACE FUNCTION cnai.separator_class() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN '[:space:][:punct:]\u2000-\u206f\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u00a0-\u00bf';


CREATE OR REPLACE FUNCTION cnai.to_simplified(t text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN t ~ ('[' || cnai.traditional_chars() || ']')
              THEN (SELECT string_agg(coalesce(cnai.traditional_to_simplified() ->> c, c), '' ORDER BY i)
                      FROM regexp_split_to_table(t, '') WITH ORDINALITY AS x(c, i))
              ELSE t END;
$$;

-- normalize() needs a UTF-8 database, as Immich's (and the \u classes here) are.
CREATE OR REPLACE FUNCTION cnai.zh_fold(t text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN lower(cnai.to_simplified(normalize(coalesce(t, ''), NFKC)));

-- Characters of a text that a match's share is measured against: all but whitespace. cnai.ocr stores it
-- (text_chars), so ranking reads a number instead of the text.
CREATE OR REPLACE FUNCTION cnai.searchable_chars(t text) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN char_length(translate(coalesce(t, ''), E' \t\r\n\u3000', ''));

-- Longest word kept (characters): a lexeme may not exceed 2 kB, and no one searches for a longer word.
CREATE OR REPLACE FUNCTION cnai.max_word_chars() RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 100;

-- Pieces of the text in order: each is either a CJK run or a word of another script.
CREATE OR REPLACE FUNCTION cnai.text_pieces(t text) RETURNS TABLE (piece text, is_cjk boolean, ord bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN cjk THEN p ELSE left(p, cnai.max_word_chars()) END, cjk, o
    FROM regexp_split_to_table(
           regexp_replace(cnai.zh_fold(t), '([' || cnai.cjk_class() || ']+)', ' \1 ', 'g'),
           '[' || cnai.separator_class() || ']+') WITH ORDINALITY AS s(p, o)
         CROSS JOIN LATERAL (SELECT p ~ ('^[' || cnai.cjk_class() || ']+$') AS cjk) c
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

-- Longest query (characters) that is read; the rest is ignored: a search box never needs more, and a phrase of
-- thousands of terms would only cost time.
CREATE OR REPLACE FUNCTION cnai.max_query_chars() RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN 256;

-- A lexeme as tsquery input, whatever characters it holds.
CREATE OR REPLACE FUNCTION cnai.tsquery_lexeme(lexeme text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN '''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''';

-- A query's pieces in order. Text between double quotes (also “…”, 「…」, 『…』) is one quoted phrase (seg
-- numbers it); a quote without its partner is ignored.
CREATE OR REPLACE FUNCTION cnai.query_pieces(q text)
RETURNS TABLE (piece text, is_cjk boolean, seg bigint, quoted boolean, ord bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  WITH segs AS (
    SELECT s, n, count(*) OVER () AS total
      FROM regexp_split_to_table(translate(cnai.zh_fold(left(q, cnai.max_query_chars())), '“”「」『』', '""""""'), '"')
           WITH ORDINALITY AS x(s, n)
  )
  SELECT p.piece, p.is_cjk, segs.n, segs.n % 2 = 0 AND segs.n < segs.total,
         row_number() OVER (ORDER BY segs.n, p.ord)
    FROM segs, cnai.text_pieces(segs.s) p;
$$;

-- A piece as a tsquery: a CJK run of 2+ characters is the phrase of its bigrams, a lone CJK character its
-- unigram, another word a prefix match (so "RE16" finds "RE16TGK").
CREATE OR REPLACE FUNCTION cnai.piece_tsquery(piece text, is_cjk boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN NOT is_cjk THEN cnai.tsquery_lexeme(piece) || ':*'
    WHEN char_length(piece) = 1 THEN cnai.tsquery_lexeme(piece)
    ELSE '(' || (SELECT string_agg(cnai.tsquery_lexeme(substr(piece, i, 2)), ' <-> ' ORDER BY i)
                   FROM generate_series(1, char_length(piece) - 1) i) || ')'
  END;
$$;

-- The operator from a piece's last query term to the next piece's first one, when the two are adjacent in the
-- text: a bigram phrase ends one position before its run's last character.
CREATE OR REPLACE FUNCTION cnai.piece_gap(piece text, is_cjk boolean) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN CASE WHEN is_cjk AND char_length(piece) > 1 THEN ' <2> ' ELSE ' <-> ' END;

-- A CJK run read with one OCR error allowed, for the fuzzy fallback: its characters in order (so `停 车场`, split by
-- a space, matches 停车场), or with any one of them misread (`营业吋间` matches 营业时间). Runs under 3 characters
-- stay exact: one error in 2 characters leaves 1.
CREATE OR REPLACE FUNCTION cnai.piece_fuzzy_tsquery(piece text, is_cjk boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN NOT is_cjk OR char_length(piece) < 3 THEN cnai.piece_tsquery(piece, is_cjk)
    ELSE '(' || (
      SELECT string_agg('(' || (
               SELECT string_agg(CASE WHEN i = 1 OR (i = 2 AND skip = 1) THEN '' WHEN i - 1 = skip THEN ' <2> '
                                      ELSE ' <-> ' END || cnai.tsquery_lexeme(substr(piece, i, 1)), '' ORDER BY i)
                 FROM generate_series(1, char_length(piece)) i WHERE i <> skip) || ')', ' | ' ORDER BY skip)
        FROM generate_series(0, char_length(piece)) skip) || ')'
  END;
$$;

-- A search query, parsed once:
--   exact: what a result must contain. Unquoted words are AND-ed, each where it may be; a quoted phrase's words
--          must be adjacent, in order.
--   phrase: every word adjacent, in order (the query as typed): a result that has it ranks higher.
--   fuzzy: exact with one OCR error allowed in each unquoted CJK run of 3+ characters (cnai.piece_fuzzy_tsquery).
--   query_chars: characters the query's words hold (what the ranking compares with a text's length).
-- All NULL (query_chars 0) when nothing in q is searchable. Never raises, whatever q holds.
CREATE OR REPLACE FUNCTION cnai.zh_query(q text, OUT exact tsquery, OUT phrase tsquery, OUT fuzzy tsquery,
                                         OUT query_chars integer)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  WITH p AS (
    SELECT *, cnai.piece_tsquery(piece, is_cjk) AS part,
           lead(ord) OVER (PARTITION BY seg ORDER BY ord) IS NULL AS seg_end,
           lead(ord) OVER (ORDER BY ord) IS NULL AS last
      FROM cnai.query_pieces(q)
  ), groups AS (  -- one group per unquoted piece, one per quoted phrase
    SELECT string_agg(part || CASE WHEN quoted AND NOT seg_end THEN cnai.piece_gap(piece, is_cjk) ELSE '' END, ''
                      ORDER BY ord) AS g,
           CASE WHEN bool_and(quoted) THEN NULL ELSE min(cnai.piece_fuzzy_tsquery(piece, is_cjk)) END AS fuzzy_g
      FROM p GROUP BY CASE WHEN quoted THEN -seg ELSE ord END
  )
  SELECT (SELECT string_agg('(' || g || ')', ' & ') FROM groups)::tsquery,
         (SELECT string_agg(part || CASE WHEN last THEN '' ELSE cnai.piece_gap(piece, is_cjk) END, '' ORDER BY ord)
            FROM p)::tsquery,
         (SELECT string_agg('(' || coalesce(fuzzy_g, g) || ')', ' & ') FROM groups)::tsquery,
         coalesce((SELECT sum(char_length(piece)) FROM p), 0)::integer;
$$;

-- The exact query alone (see cnai.zh_query): `cnai.zh_tsvector(text) @@ cnai.zh_tsquery('发票')`.
CREATE OR REPLACE FUNCTION cnai.zh_tsquery(q text) RETURNS tsquery LANGUAGE sql IMMUTABLE PARALLEL SAFE
  RETURN (SELECT exact FROM cnai.zh_query(q));
