-- Selection rules over the index catalog (DuckDB SQL). Edit here; `dvc repro` reruns
-- `select` and nothing upstream.
--
-- Contract of every stages/select/*.sql file (`ctcurate select` runs them sorted by name):
--   * one SELECT statement (a trailing `;` is allowed), no other statements;
--   * it returns the columns (site, series_instance_uid, rule_reason), at most one row per
--     (site, series_instance_uid); rule_reason is NULL when the series passes the file's
--     rules, else the name of the first rule it fails (snake_case, it becomes a report key);
--     a series the file does not return passes it;
--   * views it may read: `series` and `instances` (the index tables, see docs/data.md;
--     `series` adds body_region and body_region_source from stages/select/body_region.yaml)
--     and `candidates` (the rows of `series` that passed every earlier file);
--   * params of the `select` section arrive as DuckDB named parameters: $min_slices,
--     $max_slice_thickness_mm, $min_z_coverage_mm, $pandemic_start (an unknown $name fails
--     the stage, naming the file).
-- A series' rule_reason in data/select/series.parquet is the first failing rule in file
-- order; selected = no rule failed.
--
-- This file: per-series header rules, first failing rule wins (order of the CASE).
SELECT
    site,
    series_instance_uid,
    CASE
        WHEN modality IS DISTINCT FROM 'CT' THEN 'not_ct'
        -- dose reports, screenshots and secondary captures arrive with other SOP classes;
        -- only CT Image Storage is a reconstructable CT series
        WHEN sop_class_uid IS DISTINCT FROM '1.2.840.10008.5.1.4.1.1.2' THEN 'not_ct_image'
        WHEN list_contains(string_split(upper(coalesce(image_type, '')), '\'), 'LOCALIZER')
            THEN 'localizer'
        WHEN list_has_any(
                string_split(upper(coalesce(image_type, '')), '\'), ['DERIVED', 'SECONDARY']
            ) THEN 'derived'
        WHEN orientation IS DISTINCT FROM 'axial' THEN 'not_axial'
        -- body_region: from the headers and stages/select/body_region.yaml; `unknown` (no
        -- header names a region) goes on to the pneumonia scorer, which reads the image
        WHEN body_region NOT IN ('chest', 'unknown') THEN 'not_chest'
        WHEN slice_thickness IS NULL OR slice_thickness > $max_slice_thickness_mm
            THEN 'thick_slices'
        WHEN slice_count IS NULL OR slice_count < $min_slices THEN 'too_few_slices'
        WHEN z_coverage_mm IS NULL OR z_coverage_mm < $min_z_coverage_mm
            THEN 'short_z_coverage'
        WHEN coalesce(n_gaps, 0) > 0 THEN 'slice_gaps'
        WHEN coalesce(n_duplicate_positions, 0) > 0 THEN 'duplicate_positions'
        -- index flags that make the volume unbuildable or ambiguous, named `flag_<flag>`
        -- (harmless flags such as no_meta or uid_shared_across_sites do not reject)
        WHEN len(blocking_flags) > 0 THEN 'flag_' || blocking_flags[1]
        WHEN study_instance_uid IS NULL THEN 'no_study_uid'
        WHEN study_date IS NULL THEN 'no_study_date'
    END AS rule_reason
FROM (
    SELECT
        *,
        list_sort(list_intersect(coalesce(flags, []::VARCHAR[]), [
            'missing_geometry', 'bad_image_orientation_patient', 'bad_image_position_patient',
            'mixed_orientation', 'varying_spacing', 'gantry_tilt', 'mixed_study',
            'mixed_matrix', 'multiframe', 'bad_pixel_spacing', 'bad_rescale_slope',
            'bad_rescale_intercept'
        ])) AS blocking_flags
    FROM series
)
