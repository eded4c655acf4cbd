-- One series per study, each series counted once (contract: see rules.sql).
--
-- Reads `candidates`, the series that passed rules.sql:
--   * duplicate_site: the same series uid sent by several sites is kept once, at the
--     lexicographically first site;
--   * not_best_recon: of the remaining series of a study, keep the thinnest slices, then a
--     lung / sharp kernel over a soft one, then the lowest series uid.
WITH by_site AS (
    SELECT
        site,
        series_instance_uid,
        row_number() OVER (PARTITION BY series_instance_uid ORDER BY site) AS site_rank
    FROM candidates
),
kept AS (
    SELECT
        c.site,
        c.series_instance_uid,
        c.study_instance_uid,
        c.slice_thickness,
        regexp_matches(
            coalesce(c.convolution_kernel, ''),
            '(?i)(lung|sharp|bone|edge|detail|high|^[bi]r?[5-9][0-9]|^fc[58][0-9]|^y[bc]$|^l$)'
        ) OR regexp_matches(coalesce(c.series_description, ''), '(?i)lung') AS lung_kernel
    FROM candidates AS c
    JOIN by_site AS b USING (site, series_instance_uid)
    WHERE b.site_rank = 1
),
by_study AS (
    SELECT
        site,
        series_instance_uid,
        row_number() OVER (
            PARTITION BY study_instance_uid
            ORDER BY slice_thickness ASC, lung_kernel DESC, series_instance_uid ASC, site ASC
        ) AS recon_rank
    FROM kept
)
SELECT
    b.site,
    b.series_instance_uid,
    CASE
        WHEN b.site_rank > 1 THEN 'duplicate_site'
        WHEN r.recon_rank > 1 THEN 'not_best_recon'
    END AS rule_reason
FROM by_site AS b
LEFT JOIN by_study AS r USING (site, series_instance_uid)
