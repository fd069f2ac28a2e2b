"""Certify: evaluate a version against the policy's gates; write a record beside it.

Gates (``policy.certify``), each recorded with value / threshold / passed:

* ``min_pairs.<split>``            rows per split >= ``min_pairs_per_split[split]``
* ``min_pairs.locale=<loc>``       kept pairs per locale >= ``min_pairs_per_locale``
* ``agreement_overlap.<kind>``     per kind present (human, ai): pairs judged by >= 2 different annotators of that
                                   kind >= min(``min_overlap_share`` x pairs, ``min_overlap_pairs``)
* ``krippendorff_alpha.<kind>``    α (nominal) on that overlap subset >= ``min_krippendorff_alpha``; not computable
                                   (e.g. one judgment per pair) -> fails: agreement was not measured
* ``agreement.unknown_kind``       no pair judged only by annotators of unknown kind (their agreement cannot be
                                   measured); ``require_agreement = false`` replaces these gates by a recorded opt-out
* ``qualified_overlap.locale=<loc>`` built with an annotator registry: per locale of the kept pairs, pairs judged by
                                   >= 2 different qualified humans >= min(``min_overlap_share`` x the locale's pairs,
                                   ``min_qualified_overlap_pairs_per_locale``); no gate without a registry
* ``biased_annotator_share``       share of kept pairs with a judgment by an annotator flagged for
                                   position or length bias (not dropped by the policy) <= ``max_biased_annotator_share``
* ``exact_duplicate_rate``         exact-duplicate judgments / valid judgments <= ``max_exact_duplicate_rate``
* ``near_duplicate_rate``          near-duplicate-flagged pairs / pairs <= ``max_near_duplicate_rate``
* ``split_stability``              no pair of the parent's (or an ancestor's) validation/test split is in train
* ``protected_contamination``      no pair of a protected evaluation set (same pair, near-duplicate cluster or prompt)
                                   in train or validation (``prefpipe protect``)
* ``split_leakage``                clusters/prompts in several splits == 0
* ``quarantine_rate``              quarantined / rows in <= ``max_quarantine_rate``
* ``label_balance``                share of kept pairs whose chosen response is ``a``, within ``label_balance``
* ``ai_share``                     share of kept pairs labelled by AI judges only, within ``ai_share``
* ``expectations``                 every Great Expectations expectation met on every split

The record goes to ``STORE/certifications/VERSION.json`` (history kept); GX results and Data
Docs to ``STORE/certifications/VERSION/``.  The version directory is never touched.
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.store import SPLITS, Store, StoreError, VersionHandle
from schemas.manifest import Certification, GateResult
from pipeline.checks import flag_actions, resolve_policy
from schemas.policy import CertifyConfig, Policy
from schemas.version import code_version

BIAS_REASONS = ("position_bias", "length_bias", "order_inconsistent")


def _check(m, name: str) -> dict[str, Any]:
    return m.check(name).model_dump()


def _gate(name: str, value: Any, threshold: Any, passed: bool, detail: str = "") -> GateResult:
    if isinstance(value, float):
        value = round(value, 4)
    return GateResult(name=name, value=value, threshold=threshold, passed=bool(passed), detail=detail)


def evaluate_gates(h: VersionHandle, policy: Policy, *, run_gx: bool = True, gx_dir: Path | None = None) -> list[GateResult]:
    cfg = policy.certify
    m = h.manifest()
    gates: list[GateResult] = []
    for split in SPLITS:
        need = cfg.min_pairs_per_split.get(split, 0)
        rows = m.splits[split].rows if split in m.splits else 0
        gates.append(_gate(f"min_pairs.{split}", rows, need, rows >= need))

    kept = pl.concat([h.read_split(s) for s in SPLITS])
    for loc, n in sorted(kept.group_by(pl.col("locale").fill_null("(none)")).len().iter_rows()):
        gates.append(_gate(f"min_pairs.locale={loc}", n, cfg.min_pairs_per_locale, n >= cfg.min_pairs_per_locale))

    gates += agreement_gates(h, cfg)
    gates += qualified_overlap_gates(h, cfg)

    flags = h.read("flags.parquet")
    ann_flags = flags.filter(pl.col("subject_kind") == "annotator")
    # "unresolved": flagged for bias, and not removed by the policy (a drop action on any of its flags)
    drop_reasons = [r for r, a in flag_actions(m.policy.select).items() if a == "drop"]
    dropped_ids = set(ann_flags.filter(pl.col("reason").is_in(drop_reasons))["subject_id"].to_list())
    biased = ann_flags.filter(pl.col("reason").is_in(list(BIAS_REASONS)))
    biased_ids = sorted(set(biased["subject_id"].to_list()) - dropped_ids)
    share = 0.0
    if kept.height and biased_ids:
        j = h.read("judgments.parquet", columns=["comparison_id", "annotator_id"])
        by_pair = kept.select("pair_id", "source_comparison_ids").explode("source_comparison_ids").join(
            j, left_on="source_comparison_ids", right_on="comparison_id", how="left")
        touched = by_pair.filter(pl.col("annotator_id").is_in(biased_ids))["pair_id"].n_unique()
        share = touched / kept.height
    gates.append(_gate("biased_annotator_share", share, cfg.max_biased_annotator_share,
                       share <= cfg.max_biased_annotator_share, f"flagged: {', '.join(biased_ids) or 'none'}"))

    n_j = max(m.ledger.judgments_valid, 1)
    exact = flags.filter(pl.col("reason") == "exact_duplicate").height
    gates.append(_gate("exact_duplicate_rate", exact / n_j, cfg.max_exact_duplicate_rate, exact / n_j <= cfg.max_exact_duplicate_rate,
                       f"{exact} of {m.ledger.judgments_valid} judgments"))
    near = flags.filter(pl.col("reason") == "near_duplicate")["subject_id"].n_unique()
    rate = near / max(m.ledger.pairs, 1)
    gates.append(_gate("near_duplicate_rate", rate, cfg.max_near_duplicate_rate, rate <= cfg.max_near_duplicate_rate,
                       f"{near} of {m.ledger.pairs} pairs"))

    gates.append(stability_gate(h))
    gates.append(protection_gate(h))

    leak = _check(m, "split_leakage").get("metrics", {})
    n_leak = sum(int(leak.get(k, 0)) for k in ("clusters_in_several_splits", "pairs_in_several_splits", "prompts_in_several_splits"))
    gates.append(_gate("split_leakage", n_leak, 0, n_leak == 0 and bool(leak), "" if leak else "leakage not measured"))

    q_rate = m.ledger.quarantined / max(m.ledger.rows_in, 1)
    gates.append(_gate("quarantine_rate", q_rate, cfg.max_quarantine_rate, q_rate <= cfg.max_quarantine_rate,
                       f"{m.ledger.quarantined} of {m.ledger.rows_in} rows"))

    pairs = h.read("pairs.parquet").filter(pl.col("decision") == "keep")
    a_share = (pairs["label_consensus"] == "a").mean() if pairs.height else 0.5
    lo, hi = cfg.label_balance
    gates.append(_gate("label_balance", float(a_share), [lo, hi], lo <= a_share <= hi, "share of kept pairs where a is chosen"))
    ai = (kept["annotator_kind"] == "ai").mean() if kept.height else 0.0
    lo, hi = cfg.ai_share
    gates.append(_gate("ai_share", float(ai), [lo, hi], lo <= ai <= hi, "share of kept pairs labelled by AI judges only"))

    if cfg.require_expectations and run_gx:
        from pipeline.expectations import run_expectations

        gx = run_expectations({s: h.split_path(s) for s in SPLITS}, gx_dir or Path("gx"))
        failed = {s: r["failed"] for s, r in gx["splits"].items() if r["failed"]}
        total = sum(r["evaluated"] for r in gx["splits"].values())
        gates.append(_gate("expectations", total - sum(len(v) for v in failed.values()), total, gx["success"],
                           f"failed: {failed}" if failed else f"all {total} expectations met; Data Docs: {gx['docs_index']}"))
    elif cfg.require_expectations:  # the policy requires the suite: skipping it cannot certify
        gates.append(_gate("expectations", None, "run", False,
                           "Great Expectations suite not run (--no-expectations) but certify.require_expectations is set"))
    return gates


def stability_gate(h: VersionHandle) -> GateResult:
    """No pair of the parent's validation/test (nor of any ancestor's: the assignment table is
    inherited) is in this version's train split.  Recomputed from the parent's files, not taken
    from the child's own report; when the parent is gone, the child's recorded figure is used."""
    from pipeline.split import prior_assignments, split_moves

    m = h.manifest()
    if not m.parent_version:
        return _gate("split_stability", 0, 0, True, "first version: no parent to compare with")
    try:
        parent = h.store.get(m.parent_version)
        prior = prior_assignments(parent)
    except StoreError as err:
        rec = _check(m, "split_stability").get("metrics", {})
        n = int(rec.get("into_train_from_held_out", 0) or 0)
        return _gate("split_stability", n, 0, n == 0 and bool(rec),
                     f"parent {m.parent_version} not readable ({err}); figure recorded at curate time")
    now = pl.concat([h.read_split(s, columns=["pair_id"]).with_columns(split=pl.lit(s)) for s in SPLITS])
    moves = split_moves(prior, now)
    bad = moves.filter((pl.col("to") == "train") & (pl.col("from") != "train"))
    by = ", ".join(f"{a}->{b} {n}" for a, b, n in moves.group_by("from", "to").len().sort("from", "to").iter_rows())
    detail = f"pairs moved since {m.parent_version}: {by or 'none'}"
    if bad.height:
        detail += f"; held-out pairs now in train: {', '.join(bad['pair_id'].head(10).to_list())}"
    return _gate("split_stability", bad.height, 0, bad.height == 0, detail)


def protection_gate(h: VersionHandle) -> GateResult:
    """No pair of a protected evaluation set (``prefpipe protect``) in train or validation."""
    from pipeline.protect import contamination, load_protections

    records = load_protections(h.store)
    if not records:
        return _gate("protected_contamination", 0, 0, True, "no protected evaluation sets in this store")
    hits = contamination(h, records)
    by = ", ".join(f"{w} {n}" for w, n in hits.group_by("why").len().sort("why").iter_rows())
    detail = (f"{len(records)} protected set(s); " + (f"{hits.height} train/validation pairs covered ({by}): "
              f"{', '.join(hits['pair_id'].head(10).to_list())}" if hits.height else "none in train or validation"))
    return _gate("protected_contamination", hits.height, 0, hits.height == 0, detail)


def agreement_gates(h: VersionHandle, cfg: CertifyConfig) -> list[GateResult]:
    """Agreement must be measured before labels are trusted: per annotator kind present, an
    independent overlap subset of at least ``min(min_overlap_share x pairs, min_overlap_pairs)``
    pairs and its alpha >= ``min_krippendorff_alpha``; pairs judged only by annotators of
    unknown kind cannot be measured.  ``require_agreement = false`` opts out (recorded)."""
    if not cfg.require_agreement:
        return [_gate("agreement", None, "opted out", True, "opted out by the policy (certify.require_agreement = false): agreement was not "
                      "required by the policy (recorded in the certificate's opt_outs)")]
    from pipeline.overlap import COLUMNS, overlap_agreement, required_overlap

    judgments = h.read("judgments.parquet", columns=["comparison_id", *COLUMNS])
    conflicts = h.read("flags.parquet", columns=["subject_kind", "reason", "subject_id"]).filter(
        (pl.col("subject_kind") == "judgment") & (pl.col("reason") == "pair_id_conflict"))
    if conflicts.height:  # a pair_id naming two different pairs is no pair to agree on
        judgments = judgments.join(conflicts.select(comparison_id="subject_id"), on="comparison_id", how="anti")
    ov = overlap_agreement(judgments)
    gates = []
    for kind in ("human", "ai"):
        o = ov[kind]
        if o["pairs"] == 0:
            continue
        need = required_overlap(o["pairs"], cfg.min_overlap_share, cfg.min_overlap_pairs)
        have, alpha = o["overlap_pairs"], o["krippendorff_alpha"]
        gates.append(_gate(f"agreement_overlap.{kind}", have, need, have >= need,
                           f"{have} of {o['pairs']} pairs judged by >= 2 different {kind} annotators "
                           f"(need min({cfg.min_overlap_share:g} x pairs, {cfg.min_overlap_pairs}))"))
        if alpha is None:
            gates.append(_gate(f"krippendorff_alpha.{kind}", None, cfg.min_krippendorff_alpha, False,
                               f"not computable on the {have} overlap pairs (no pair with two ratings, or every rating "
                               "the same): agreement was not measured"))
        else:
            gates.append(_gate(f"krippendorff_alpha.{kind}", float(alpha), cfg.min_krippendorff_alpha,
                               alpha >= cfg.min_krippendorff_alpha, f"nominal alpha on the {have} independent overlap pairs"))
    unknown_only = ov["unknown"]["unknown_only_pairs"]
    if ov["unknown"]["pairs"]:
        gates.append(_gate("agreement.unknown_kind", unknown_only, 0, unknown_only == 0,
                           f"{unknown_only} pairs were judged only by annotators of unknown kind: their agreement cannot "
                           "be measured (give --annotator-kind human|ai when the source says who judged, or opt out "
                           "with certify.require_agreement = false)" if unknown_only else
                           "judgments of unknown kind only on pairs that human or AI annotators also judged"))
    if not gates:
        gates.append(_gate("agreement", None, "measured", False, "no judgments: agreement was not measured"))
    return gates


def qualified_overlap_gates(h: VersionHandle, cfg: CertifyConfig) -> list[GateResult]:
    """Built with an annotator registry: per locale of the kept pairs, pairs judged by >= 2 different
    *qualified* humans (judgments the registry check did not flag, whatever the policy did with the
    flags) >= min(``min_overlap_share`` x the locale's pairs, ``min_qualified_overlap_pairs_per_locale``).
    Overlap as in :mod:`pipeline.overlap` (one a/b/tie rating per annotator and pair).  No gate without one."""
    m = h.manifest()
    if m.policy.annotators is None:
        return []
    from pipeline.checks.registry import REASONS
    from pipeline.overlap import COLUMNS, overlap_agreement, required_overlap

    flags = h.read("flags.parquet", columns=["subject_kind", "reason", "subject_id"]).filter(
        (pl.col("subject_kind") == "judgment") & pl.col("reason").is_in([*REASONS, "pair_id_conflict"]))
    j = h.read("judgments.parquet", columns=["comparison_id", "locale", *COLUMNS]).with_columns(
        pl.col("locale").fill_null("(none)"))
    qualified = j.join(flags.select(comparison_id="subject_id"), on="comparison_id", how="anti").filter(
        pl.col("annotator_kind") == "human")
    kept = pl.concat([h.read_split(s, columns=["locale"]) for s in SPLITS])
    pairs_of = dict(j.group_by("locale").agg(pl.col("pair_id").n_unique()).iter_rows())
    by_locale = qualified.partition_by("locale", as_dict=True)
    gates = []
    for loc in sorted(set(kept["locale"].fill_null("(none)").to_list())):
        pairs = pairs_of.get(loc, 0)
        o = overlap_agreement(by_locale.get((loc,), qualified.clear()))["human"]
        need = required_overlap(pairs, cfg.min_overlap_share, cfg.min_qualified_overlap_pairs_per_locale)
        alpha = "n/a" if o["krippendorff_alpha"] is None else f"{o['krippendorff_alpha']:.3f}"
        gates.append(_gate(f"qualified_overlap.locale={loc}", o["overlap_pairs"], need, o["overlap_pairs"] >= need,
                           f"{o['overlap_pairs']} of the locale's {pairs} pairs judged by >= 2 different qualified humans "
                           f"(registry {m.registry_sha256[:12]}; need min({cfg.min_overlap_share:g} x pairs, "
                           f"{cfg.min_qualified_overlap_pairs_per_locale}); their alpha {alpha})"))
    return gates


def certify_version(store: Store, ref: str, policy: Policy, *, run_gx: bool = True) -> Certification:
    """Evaluate the gates, refuse a tampered version, append the record.  Never edits the version.

    The record binds what was evaluated: the sha256 of the manifest bytes read (the manifest
    binds every file), and the policy hash."""
    policy = resolve_policy(policy)
    h = store.resolve(ref)
    manifest_sha = h.manifest_sha256()
    problems = h.verify()
    if problems:
        gates = [_gate("integrity", len(problems), 0, False, "; ".join(problems))]
    else:
        gx_dir = store.root / "certifications" / h.version_id / f"gx-{policy.policy_hash()}"
        gates = [_gate("integrity", 0, 0, True, "every file matches its sha256 in the manifest")]
        gates += evaluate_gates(h, policy, run_gx=run_gx, gx_dir=gx_dir)
    cert = Certification(
        version_id=h.version_id,
        verdict="certified" if all(g.passed for g in gates) else "rejected",
        gates=gates,
        policy_hash=policy.policy_hash(),
        policy=policy.model_dump(mode="json"),
        certified_at=datetime.now(UTC),
        code_version=code_version(),
        manifest_sha256=manifest_sha,
        opt_outs=[] if policy.certify.require_agreement else ["agreement"],
    )
    store.add_certification(cert)
    return cert
