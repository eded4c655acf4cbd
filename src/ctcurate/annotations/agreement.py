"""Inter-reader agreement: Fleiss κ with a varying number of reads, pairwise Cohen κ."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence


def fleiss_kappa(subjects: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' κ over ``subjects`` (each the list of categories its readers gave).

    The number of reads may vary between subjects (generalised Fleiss): each subject's
    agreement uses its own n_i,

        P_i = Σ_j n_ij (n_ij − 1) / (n_i (n_i − 1)),   P̄ = mean of P_i,
        p_j = Σ_i n_ij / Σ_i n_i,                       P_e = Σ_j p_j²,
        κ = (P̄ − P_e) / (1 − P_e).

    Subjects with fewer than two reads carry no agreement information and are left out.
    Returns ``None`` when no subject has two reads or when every read is the same category
    (P_e = 1, κ undefined). With the same n for every subject this is Fleiss (1971).
    """
    rated = [list(s) for s in subjects if len(s) >= 2]
    if not rated:
        return None
    p_bar = 0.0
    totals: Counter[Hashable] = Counter()
    n_reads = 0
    for reads in rated:
        n_i = len(reads)
        counts = Counter(reads)
        p_bar += sum(c * (c - 1) for c in counts.values()) / (n_i * (n_i - 1))
        totals.update(counts)
        n_reads += n_i
    p_bar /= len(rated)
    p_e = sum((c / n_reads) ** 2 for c in totals.values())
    if p_e >= 1.0 - 1e-12:
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's κ of two readers over the same subjects, in the same order.

    κ = (p_o − p_e) / (1 − p_e), p_o the observed agreement, p_e the agreement expected
    from each reader's own category frequencies. ``None`` when there is no subject or
    p_e = 1 (both readers always gave one and the same category).
    """
    if len(first) != len(second):
        msg = f"cohen_kappa: {len(first)} and {len(second)} ratings differ in length"
        raise ValueError(msg)
    n = len(first)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(first, second, strict=True)) / n
    ca, cb = Counter(first), Counter(second)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if p_e >= 1.0 - 1e-12:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def pairwise_cohen(reads: Mapping[str, Mapping[str, Hashable]]) -> dict[str, dict[str, object]]:
    """Cohen's κ of every reader pair on the subjects both read.

    ``reads`` maps subject → {reader → category}. Returns ``{"A|B": {"kappa", "n"}}`` for
    every pair (A < B) that shares at least one subject, sorted by pair.
    """
    shared: dict[tuple[str, str], list[tuple[Hashable, Hashable]]] = {}
    for subject in sorted(reads):
        by_reader = reads[subject]
        names = sorted(by_reader)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared.setdefault((a, b), []).append((by_reader[a], by_reader[b]))
    out: dict[str, dict[str, object]] = {}
    for (a, b), pairs in sorted(shared.items()):
        kappa = cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs])
        out[f"{a}|{b}"] = {"kappa": kappa, "n": len(pairs)}
    return out
