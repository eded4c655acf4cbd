"""The site of an archive file, from the declared layout rule ``index.site_from``.

The default rule (``path_component: 0``) is the first folder under the archive root, which
the header readers already put in each row; any other rule rewrites the ``site`` column
(and the ``no_site`` flag) of the rows a chunk read, before they reach the ledger.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from functools import lru_cache

from ctcurate.dicom.header import FileOutcome
from ctcurate.params import SiteRule

#: The rule the header readers apply themselves.
DEFAULT_RULE = SiteRule(path_component=0)
NO_SITE = "no_site"


@lru_cache(maxsize=16)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def site_of(path: str, rule: SiteRule) -> str | None:
    """The site of the file at ``path`` (POSIX, relative to the archive) under ``rule``."""
    if rule.path_regex is not None:
        match = _regex(rule.path_regex).search(path)
        return (match.group("site") or None) if match else None
    folders = path.split("/")[:-1]
    k = rule.path_component
    if k is None or not -len(folders) <= k < len(folders):
        return None
    return folders[k] or None


def apply_site_rule(outcomes: Sequence[FileOutcome], rule: SiteRule) -> list[FileOutcome]:
    """``outcomes`` with the site of each indexed row set by ``rule``."""
    if rule == DEFAULT_RULE:
        return list(outcomes)
    out = []
    for outcome in outcomes:
        if outcome.record is None:
            out.append(outcome)
            continue
        site = site_of(outcome.path, rule)
        flags = set(outcome.record["flags"]) - {NO_SITE}
        if site is None:
            flags.add(NO_SITE)
        record = outcome.record | {"site": site, "flags": sorted(flags)}
        out.append(dataclasses.replace(outcome, record=record))
    return out


def site_sql(rule: SiteRule, column: str = "path") -> str:
    """A DuckDB expression giving the site of the archive path in ``column`` under ``rule``
    (NULL: no site), as :func:`site_of` does; for tables that keep only the path (the
    quarantine). A regex runs under DuckDB's RE2, which lacks look-around."""
    if rule.path_regex is not None:
        pattern = rule.path_regex.replace("'", "''")
        return f"nullif(regexp_extract({column}, '{pattern}', ['site']).site, '')"
    k = rule.path_component
    parts = f"string_split({column}, '/')"
    if k is None:  # pragma: no cover - the model requires one rule
        return "NULL::VARCHAR"
    if k >= 0:  # the (k+1)-th folder: the path needs k + 2 parts
        return f"CASE WHEN len({parts}) >= {k + 2} THEN nullif({parts}[{k + 1}], '') END"
    # folders = parts[:-1]; folders[k] is part len(parts) + k (1-based) when -k <= folders
    return f"CASE WHEN len({parts}) - 1 >= {-k} THEN nullif({parts}[len({parts}) + {k}], '') END"
