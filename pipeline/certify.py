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
* ``protected_contamination``      no pair of a protected evaluation set (same pair, near-duplicate cluster or prompt,
                                   or a near duplicate of a protected prompt) in train or validation (``prefpipe protect``)
* ``split_leakage``                clusters/prompts in several splits == 0
* ``quarantine_rate``              quarantined / rows in <= ``max_quarantine_rate``
* ``label_balance``                share of kept pairs whose chosen response is ``a``, within ``label_balance``
* ``ai_share``                     share of kept pairs labelled by AI judges only, within ``ai_share``
* ``expectations``                 every Great Expectations expectation met on every part of every split, and no
                                   ``pair_id`` in two parts of a split

Per part (``pipeline.certify_parts``): what a gate computes from one part alone (its GX result, its
rows per locale, its AI-labelled rows, its kept pairs and those labelled ``a``, the file's inode,
size and mtime when its sha256 was checked) is kept in a facts file bound by sha256 into the
record.  The next certification of the version, or of a child, takes those facts for every part
with the same sha256 (a file hashed again only when its inode, size or mtime changed) and
computes the new parts only: a child of a large history costs its batch.  ``--from-scratch``
takes nothing.  The agreement and qualified-overlap gates run on integer sums over pairs kept
in the record (``Certification.agreement_state``): a child's are its parent's updated with the
pairs its new judgments touch.  Still read across the version: the flags, the ``pair_id`` column
of every split part, the parent's split assignments, the judgments' pair ids when the sums are
updated (the touched pairs' judgments are read by filter), and every judgment for the
biased-annotator share when an unresolved biased annotator exists.

The record goes to ``STORE/certifications/VERSION.json`` (history kept); GX results and Data
Docs to ``STORE/certifications/VERSION/``.  The version directory is never touched.  The version
(and its parent) is held shared (``Store.in_use``) while it is certified: ``prefpipe gc`` keeps it.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.certify_parts import (NO_LOCALE, VersionFacts, agreement_state, empty_facts, full_agreement_state,
                                    load_prior_facts, stat_facts, table_parts, write_facts)
from pipeline.store import SPLITS, Store, StoreError, VersionHandle, VersionNotFound, verify_files
from schemas.manifest import Certification, GateResult
from pipeline.checks import flag_actions, resolve_policy
from schemas.policy import CertifyConfig, Policy
from schemas.version import code_version

BIAS_REASONS = ("position_bias", "length_bias", "order_inconsistent")


def _check(m, name: str) -> dict[str, Any]:
    return m.check(name).model_dump()


def _gate(name: str, value: Any, threshold: Any, passed: bool, detail: str = "") -> GateResult:
    # the value recorded is the value compared: a rounded one (0.4413 for 0.44128) read as passing a threshold of
    # 0.4413 next to a verdict that failed it
    return GateResult(name=name, value=value, threshold=threshold, passed=bool(passed), detail=detail)


def evaluate_gates(h: VersionHandle, policy: Policy, *, run_gx: bool = True, gx_dir: Path | None = None,
                   facts: VersionFacts | None = None, facts_from: str | None = None,
                   agreement: tuple[dict[str, Any], str] | None = None) -> list[GateResult]:
    """Every gate but integrity.  ``facts``: the parts' facts (GX result, counts), taken from an
    earlier certification where a part is unchanged (``pipeline.certify_parts``); computed otherwise."""
    cfg = policy.certify
    m = h.manifest()
    facts = facts or VersionFacts(h, empty_facts(), {})
    gates: list[GateResult] = []
    for split in SPLITS:
        need = cfg.min_pairs_per_split[split]  # (every split: the schema fills a left-out one with its default)
        rows = m.splits[split].rows if split in m.splits else 0
        gates.append(_gate(f"min_pairs.{split}", rows, need, rows >= need))

    locales: Counter[str] = Counter()
    n_ai = 0
    for split in SPLITS:
        for _, row in facts.split(split):
            locales.update({d["locale"]: d["n"] for d in row["locales"]})
            n_ai += row["ai"]
    n_kept = sum(locales.values())
    for loc, n in sorted(locales.items()):
        gates.append(_gate(f"min_pairs.locale={loc}", n, cfg.min_pairs_per_locale, n >= cfg.min_pairs_per_locale))

    gates += agreement_gates(h, cfg, agreement)
    gates += qualified_overlap_gates(h, cfg, locales=set(locales), state=agreement)

    flags = h.read("flags.parquet")
    ann_flags = flags.filter(pl.col("subject_kind") == "annotator")
    # "unresolved": flagged for bias, and not removed by the policy (a drop action on any of its flags)
    drop_reasons = [r for r, a in flag_actions(m.policy.select).items() if a == "drop"]
    dropped_ids = set(ann_flags.filter(pl.col("reason").is_in(drop_reasons))["subject_id"].to_list())
    biased = ann_flags.filter(pl.col("reason").is_in(list(BIAS_REASONS)))
    biased_ids = sorted(set(biased["subject_id"].to_list()) - dropped_ids)
    share = 0.0
    if n_kept and biased_ids:
        kept = pl.concat([h.read_split(s, columns=["pair_id", "source_comparison_ids"]) for s in SPLITS])
        j = h.read("judgments.parquet", columns=["comparison_id", "annotator_id"])
        by_pair = kept.explode("source_comparison_ids").join(
            j, left_on="source_comparison_ids", right_on="comparison_id", how="left")
        touched = by_pair.filter(pl.col("annotator_id").is_in(biased_ids))["pair_id"].n_unique()
        share = touched / n_kept
    # "flagged: none" read as no bias found when the version's policy had dropped a flagged annotator: say both
    resolved = sorted(set(biased["subject_id"].to_list()) & dropped_ids)
    detail = f"flagged: {', '.join(biased_ids) or 'none'}" + (
        f"; flagged and dropped by the version's policy: {', '.join(resolved)}" if resolved else "")
    gates.append(_gate("biased_annotator_share", share, cfg.max_biased_annotator_share,
                       share <= cfg.max_biased_annotator_share, detail))

    n_j = max(m.ledger.judgments_valid, 1)
    exact = flags.filter(pl.col("reason") == "exact_duplicate").height
    gates.append(_gate("exact_duplicate_rate", exact / n_j, cfg.max_exact_duplicate_rate, exact / n_j <= cfg.max_exact_duplicate_rate,
                       f"{exact} of {m.ledger.judgments_valid} judgments"))
    near = flags.filter(pl.col("reason") == "near_duplicate")["subject_id"].n_unique()
    rate = near / max(m.ledger.pairs, 1)
    gates.append(_gate("near_duplicate_rate", rate, cfg.max_near_duplicate_rate, rate <= cfg.max_near_duplicate_rate,
                       f"{near} of {m.ledger.pairs} pairs"))

    ids = split_pair_ids(h)
    gates.append(stability_gate(h, ids))
    gates.append(protection_gate(h))

    leak = _check(m, "split_leakage").get("metrics", {})
    n_leak = sum(int(leak.get(k, 0)) for k in ("clusters_in_several_splits", "pairs_in_several_splits", "prompts_in_several_splits"))
    gates.append(_gate("split_leakage", n_leak, 0, n_leak == 0 and bool(leak), "" if leak else "leakage not measured"))

    q_rate = m.ledger.quarantined / max(m.ledger.rows_in, 1)
    gates.append(_gate("quarantine_rate", q_rate, cfg.max_quarantine_rate, q_rate <= cfg.max_quarantine_rate,
                       f"{m.ledger.quarantined} of {m.ledger.rows_in} rows"))

    keep = keep_a = 0
    for _, row in facts.pairs():
        keep, keep_a = keep + row["keep"], keep_a + row["keep_a"]
    # no kept pair: neither share is measured, and a made-up value (0.5, 0.0) must not pass the interval
    lo, hi = cfg.label_balance
    if keep:
        a_share = keep_a / keep
        gates.append(_gate("label_balance", a_share, [lo, hi], lo <= a_share <= hi, "share of kept pairs where a is chosen"))
    else:
        gates.append(_gate("label_balance", None, [lo, hi], False, "no kept pairs: the share of a chosen was not measured"))
    lo, hi = cfg.ai_share
    if n_kept:
        ai = n_ai / n_kept
        gates.append(_gate("ai_share", ai, [lo, hi], lo <= ai <= hi, "share of kept pairs labelled by AI judges only"))
    else:
        gates.append(_gate("ai_share", None, [lo, hi], False, "no kept pairs in the splits: the AI share was not measured"))

    if cfg.require_expectations and run_gx:
        gates.append(expectations_gate(facts, ids, gx_dir or Path("gx"), facts_from))
    elif cfg.require_expectations:  # the policy requires the suite: skipping it cannot certify
        gates.append(_gate("expectations", None, "run", False,
                           "Great Expectations suite not run (--no-expectations) but certify.require_expectations is set"))
    else:  # (an opt-out the certificate shows, as require_agreement's)
        gates.append(_gate("expectations", None, "opted out", True, "opted out by the policy (certify.require_expectations = "
                           "false): the Great Expectations suite was not run (recorded in the certificate's opt_outs)"))
    return gates


def split_pair_ids(h: VersionHandle) -> pl.DataFrame:
    """``pair_id`` and ``split`` of every kept pair: the one column read from every split part
    (the integrity gate has checked the files; a pair id's uniqueness across parts and the
    stability gate need them all)."""
    frames = []
    for s in SPLITS:
        files = [str(h.path / path) for path, _ in table_parts(h, f"data/{s}")]
        frame = (pl.scan_parquet(files, glob=False).select("pair_id").collect() if files
                 else pl.DataFrame(schema={"pair_id": pl.String}))
        frames.append(frame.with_columns(split=pl.lit(s)))
    return pl.concat(frames)


GX_BATCH_ROWS = 100_000  # rows of one GX validation: a first certification of a large version holds one batch at a time


def _gx_batches(h: VersionHandle, split: str, todo: list[tuple[str, dict[str, Any]]]) -> list[list[tuple[str, dict[str, Any]]]]:
    """The split's parts to validate, in consecutive groups of at most ``GX_BATCH_ROWS`` rows (a
    bigger part alone)."""
    rows = {p.path: p.rows for p in (h.table(f"data/{split}").parts if h.table(f"data/{split}") else [])}
    groups: list[list[tuple[str, dict[str, Any]]]] = []
    size = 0
    for item in todo:
        n = rows.get(item[0], 0)
        if not groups or size + n > GX_BATCH_ROWS:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def expectations_gate(facts: VersionFacts, ids: pl.DataFrame, gx_dir: Path, facts_from: str | None) -> GateResult:
    """The GX suite met by every part of every split.  Parts an earlier certification validated
    (same sha256) keep their result; the others are validated now, in batches of at most
    ``GX_BATCH_ROWS`` rows of one split, read when validated.  The suite's ``pair_id`` uniqueness
    holds within a batch; across a split's parts it is checked here on the id column."""
    h = facts.h
    batches, validated, split_of, evaluated, reused = {}, {}, {}, {}, 0
    for s in SPLITS:
        todo = facts.unvalidated(s)
        groups = _gx_batches(h, s, todo)
        for i, group in enumerate(groups):
            name = s if len(groups) == 1 else f"{s}-{i + 1}"
            paths = [path for path, _ in group]
            batches[name] = lambda paths=paths: pl.concat([h.read(p) for p in paths], how="vertical_relaxed")
            validated[name], split_of[name] = [row for _, row in group], s
        parts = facts.split(s)
        reused += len(parts) - len(todo)
        evaluated[s] = max((row["gx_evaluated"] or 0 for _, row in parts), default=0)
    failed: dict[str, list[str]] = {}
    docs = ""
    if batches:
        from pipeline.expectations import run_expectations

        gx = run_expectations(batches, gx_dir, staging=h.store.root / ".staging")
        docs = f"; Data Docs: {gx['docs_index']}"
        for name, r in gx["splits"].items():
            s = split_of[name]
            evaluated[s] = r["evaluated"]
            if r["failed"]:
                failed.setdefault(s, []).extend(f for f in r["failed"] if f not in failed.get(s, []))
            else:  # only a passing part's result is kept for later certifications
                for row in validated[name]:
                    row["gx_evaluated"] = r["evaluated"]
    for s, frame in ids.partition_by("split", as_dict=True).items():
        n_dup = frame.height - frame["pair_id"].n_unique()
        if n_dup:
            failed.setdefault(s[0], []).append(f"expect_column_values_to_be_unique(pair_id) across the split's parts: {n_dup} repeated")
    total = sum(evaluated.values())
    n_failed = sum(len(v) for v in failed.values())
    n_new = sum(len(v) for v in validated.values())
    how = f"{n_new} parts validated now, {reused} unchanged since the certification of {facts_from}" if reused else \
        f"{n_new} parts validated now"
    detail = f"failed: {failed}" if failed else f"all {total} expectations met on every part ({how}){docs}"
    return _gate("expectations", total - n_failed, total, not failed, detail)


def stability_gate(h: VersionHandle, ids: pl.DataFrame | None = None) -> GateResult:
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
    now = split_pair_ids(h) if ids is None else ids
    moves = split_moves(prior, now)
    bad = moves.filter((pl.col("to") == "train") & (pl.col("from") != "train"))
    by = ", ".join(f"{a}->{b} {n}" for a, b, n in moves.group_by("from", "to").len().sort("from", "to").iter_rows())
    detail = f"pairs moved since {m.parent_version}: {by or 'none'}"
    if bad.height:
        detail += f"; held-out pairs now in train: {', '.join(bad['pair_id'].head(10).to_list())}"
    return _gate("split_stability", bad.height, 0, bad.height == 0, detail)


def protection_gate(h: VersionHandle) -> GateResult:
    """No pair of a protected evaluation set (``prefpipe protect``) in train or validation: not the same
    pair, cluster or prompt, nor a near duplicate of a protected prompt (examples show both prompts)."""
    from pipeline.protect import contamination, load_protections, near_duplicate_examples, unmatched

    records = load_protections(h.store)
    if not records:
        return _gate("protected_contamination", 0, 0, True, "no protected evaluation sets in this store")
    hits = contamination(h, records)
    by = ", ".join(f"{w} {n}" for w, n in hits.group_by("why").len().sort("why").iter_rows())
    detail = (f"{len(records)} protected set(s); " + (f"{hits.height} train/validation pairs covered ({by}): "
              f"{', '.join(hits['pair_id'].head(10).to_list())}" if hits.height else "none in train or validation"))
    examples = near_duplicate_examples(h.store, hits)
    if examples:
        detail += "; near duplicates: " + "; ".join(examples)
    stale = unmatched(records)
    if stale:
        detail += ("; near-duplicate matching off for " + ", ".join(r.label for r in stale) + " (a record from before "
                   "near-duplicate signatures: only the same pair, cluster or prompt counts until `prefpipe protect "
                   "VERSION --split SPLIT` is run again)")
    return _gate("protected_contamination", hits.height, 0, hits.height == 0, detail)


def agreement_gates(h: VersionHandle, cfg: CertifyConfig, state: tuple[dict[str, Any], str] | None = None) -> list[GateResult]:
    """Agreement must be measured before labels are trusted: per annotator kind present, an
    independent overlap subset of at least ``min(min_overlap_share x pairs, min_overlap_pairs)``
    pairs and its alpha >= ``min_krippendorff_alpha``; pairs judged only by annotators of
    unknown kind cannot be measured.  ``require_agreement = false`` opts out (recorded)."""
    if not cfg.require_agreement:
        return [_gate("agreement", None, "opted out", True, "opted out by the policy (certify.require_agreement = false): agreement was not "
                      "required by the policy (recorded in the certificate's opt_outs)")]
    from pipeline.overlap import from_state, required_overlap

    sums, how = state or (full_agreement_state(h), "computed over every judgment")
    ov = from_state(sums["sums"])
    gates = []
    for kind in ("human", "ai"):
        o = ov[kind]
        if o["pairs"] == 0:
            continue
        need = required_overlap(o["pairs"], cfg.min_overlap_share, cfg.min_overlap_pairs)
        have, alpha = o["overlap_pairs"], o["krippendorff_alpha"]
        gates.append(_gate(f"agreement_overlap.{kind}", have, need, have >= need,
                           f"{have} of {o['pairs']} pairs judged by >= 2 different {kind} annotators "
                           f"(need min({cfg.min_overlap_share:g} x pairs, {cfg.min_overlap_pairs}); sums {how})"))
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


def qualified_overlap_gates(h: VersionHandle, cfg: CertifyConfig, locales: set[str] | None = None,
                            state: tuple[dict[str, Any], str] | None = None) -> list[GateResult]:
    """Built with an annotator registry: per locale of the kept pairs, pairs judged by >= 2 different
    *qualified* humans (judgments the registry check did not flag, whatever the policy did with the
    flags) >= min(``min_overlap_share`` x the locale's pairs, ``min_qualified_overlap_pairs_per_locale``).
    Overlap as in :mod:`pipeline.overlap` (one a/b/tie rating per annotator and pair).  No gate without one.
    ``state``: the agreement state (``pipeline.certify_parts``), which holds the per-locale sums."""
    m = h.manifest()
    if m.policy.annotators is None:
        return []
    from pipeline.overlap import from_state, overlap_state, required_overlap

    sums = state[0] if state is not None and "qualified" in state[0] else full_agreement_state(h)
    if locales is None:
        locales = set(pl.concat([h.read_split(s, columns=["locale"]) for s in SPLITS])["locale"].fill_null(NO_LOCALE).to_list())
    zero = {"pairs": 0, "sums": overlap_state(pl.DataFrame())}
    gates = []
    for loc in sorted(locales):
        q = sums["qualified"].get(loc, zero)
        pairs = q["pairs"]
        o = from_state(q["sums"])["human"]
        # at least 1: a kept locale the sums do not hold (no judgment of it counted) needed 0 and passed
        need = max(1, required_overlap(pairs, cfg.min_overlap_share, cfg.min_qualified_overlap_pairs_per_locale))
        alpha = "n/a" if o["krippendorff_alpha"] is None else f"{o['krippendorff_alpha']:.3f}"
        gates.append(_gate(f"qualified_overlap.locale={loc}", o["overlap_pairs"], need, o["overlap_pairs"] >= need,
                           f"{o['overlap_pairs']} of the locale's {pairs} pairs judged by >= 2 different qualified humans "
                           f"(registry {m.registry_sha256[:12]}; need min({cfg.min_overlap_share:g} x pairs, "
                           f"{cfg.min_qualified_overlap_pairs_per_locale}); their alpha {alpha})"))
    return gates


def _parent(store: Store, h: VersionHandle) -> VersionHandle | None:
    pid = h.manifest().parent_version
    if not pid:
        return None
    try:
        return store.get(pid)
    except StoreError:
        return None


def certify_version(store: Store, ref: str, policy: Policy, *, run_gx: bool = True, reuse: bool = True) -> Certification:
    """Evaluate the gates, refuse a tampered version, append the record.  Never edits the version.

    Tampered: a file differs from the manifest, or the manifest is not one the store published as this version
    (:meth:`pipeline.store.Store.publication`); the ``integrity`` gate fails and no other gate runs.

    The record binds what was evaluated: the sha256 of the manifest bytes read (the manifest
    binds every file), and the policy hash.

    The version is held (:meth:`pipeline.store.Store.in_use`) from its lookup to its record, and its parent while
    certification reads it: ``prefpipe gc`` keeps both (``in_use``).  A version removed before the hold raises
    :class:`pipeline.store.VersionNotFound` (exit 2) and nothing is written."""
    from pipeline.signing import signing_keyring

    signing_keyring()  # a key that cannot sign fails now, before any work is done or written
    policy = resolve_policy(policy)
    h = store.resolve(ref)
    # `prefpipe gc --delete V --apply` removed V while it was read (a traceback, or a record written for a version
    # gone): V is held from here to the record, its parent while it is read (the stability gate, the facts)
    with contextlib.ExitStack() as held:
        held.enter_context(store.in_use(h.version_id))
        if not store.exists(h.version_id):  # (removed between its lookup and the hold)
            raise VersionNotFound(f"version {h.version_id} was removed (`prefpipe gc`) before it could be certified; "
                                  "nothing written")
        parent = _parent(store, h)
        if parent is not None:
            held.enter_context(store.in_use(parent.version_id))
            parent = parent if store.exists(parent.version_id) else None  # (gone before the hold: as one collected)
        return _certify_held(store, h, parent, policy, run_gx=run_gx, reuse=reuse)


def _certify_held(store: Store, h: VersionHandle, parent: VersionHandle | None, policy: Policy, *, run_gx: bool,
                  reuse: bool) -> Certification:
    """:func:`certify_version` once ``h`` (and its parent, if any) is held."""
    manifest_sha = h.manifest_sha256()
    prior, facts_from, prior_record = load_prior_facts(store, (h, parent) if reuse else ())
    known = stat_facts(prior)
    checked: dict[str, tuple[int, int, int]] = {}
    problems = verify_files(h.manifest(), h.path, known=known, checked=checked)
    # the manifest the gates read must be the one the store published: a part edited and the manifest rewritten to
    # match verifies against itself (the version id is derived from the inputs, not the manifest)
    pub = store.publication(h)
    if pub.ok is False:
        problems.insert(0, pub.reason)
    part_facts = state = None
    if problems:
        gates = [_gate("integrity", len(problems), 0, False, "; ".join(problems))]
    else:
        gx_dir = store.root / "certifications" / h.version_id / f"gx-{policy.policy_hash()}"
        unchanged = sum(known.get(sha) == key for sha, key in checked.items())
        how = (f"; {len(checked) - unchanged} files hashed, {unchanged} unchanged since the certification of {facts_from} "
               "hashed them (same inode, size and mtime)") if unchanged else ""
        unpublished = "" if pub.ok else f"; {pub.reason}"
        gates = [_gate("integrity", 0, 0, True, f"every file matches its sha256 in the manifest{how}{unpublished}")]
        facts = VersionFacts(h, prior, checked)
        state = agreement_state(h, parent, prior_record, facts_from) if policy.certify.require_agreement else None
        gates += evaluate_gates(h, policy, run_gx=run_gx, gx_dir=gx_dir, facts=facts, facts_from=facts_from, agreement=state)
        part_facts = write_facts(store, h.version_id, facts.frame())
    cert = Certification(
        version_id=h.version_id,
        verdict="certified" if all(g.passed for g in gates) else "rejected",
        gates=gates,
        policy_hash=policy.policy_hash(),
        policy=policy.model_dump(mode="json"),
        certified_at=datetime.now(UTC),
        code_version=code_version(),
        manifest_sha256=manifest_sha,
        opt_outs=[name for name, required in (("agreement", policy.certify.require_agreement),
                                              ("expectations", policy.certify.require_expectations)) if not required],
        part_facts=part_facts,
        agreement_state=state[0] if state else None,
    )
    store.add_certification(cert)
    return cert
