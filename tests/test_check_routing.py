"""Routing check: routed counts, label imbalance per slice, too_easy / ambiguous."""
from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.aggregate import aggregate
from pipeline.checks import routing
from pipeline.ingest import judgments_from_records
from schemas.policy import ChecksConfig
from tests.synth import make_planted
from tests.test_aggregate import rec


def test_planted_imbalance_slice() -> None:
    pt = make_planted(4)
    j = pt.judgments()
    res = routing.run(j, ChecksConfig(), pairs=aggregate(j).pairs)
    imb = res.flags.filter(pl.col("reason") == "label_imbalance")
    assert set(imb["subject_id"]) == {"locale=de-DE"}
    assert set(imb["subject_kind"]) == {"slice"} and set(imb["check"]) == {"routing"} and set(imb["severity"]) == {"warn"}
    assert res.metrics["slices"]["locale=de-DE"]["share_a"] > 0.75
    assert res.status == "warn"
    easy = set(res.flags.filter(pl.col("reason") == "too_easy")["subject_id"])
    assert pt.truth["too_easy"] <= easy and set(res.flags.filter(pl.col("reason") != "label_imbalance")["severity"]) == {"info"}


def _slice(locale: str, n: int, share_a: float, rng: np.random.Generator) -> list[dict]:
    recs = []
    for p in range(n):
        lab = "a" if rng.random() < share_a else "b"
        recs += [rec(f"{locale}{p}-{k}", lab, f"h{k}", prompt=f"{locale}-{p}", locale=locale) for k in range(2)]
    return recs


def test_imbalance_needs_size_and_significance() -> None:
    rng = np.random.default_rng(0)
    recs = _slice("de", 10, 1.0, rng) + _slice("fr", 80, 0.85, rng) + _slice("en", 400, 0.5, rng) + _slice("it", 60, 0.12, rng)
    res = routing.run(judgments_from_records(recs))
    assert set(res.flags.filter(pl.col("reason") == "label_imbalance")["subject_id"]) == {"locale=fr", "locale=it"}
    t = {r["slice"]: r for r in res.tables["slices"].iter_rows(named=True)}
    assert t["locale=de"]["share_a"] == 1.0 and t["locale=de"]["p_value"] is None  # 10 pairs: not tested
    assert not t["locale=en"]["imbalanced"]


def test_counts_easy_and_ambiguous() -> None:
    recs = [
        rec("e1", "a", "h1", prompt="easy", strength=0.95), rec("e2", "a", "h2", prompt="easy", strength=1.0),
        rec("m1", "a", "h1", prompt="amb", strength=0.2), rec("m2", "a", "h2", prompt="amb", strength=0.3),
        rec("m3", "b", "h3", prompt="amb", strength=0.9),
        rec("n1", "a", "h1", prompt="nostrength"), rec("n2", "b", "h2", prompt="nostrength"), rec("n3", "a", "h3", prompt="nostrength"),
        rec("t1", "tie", "h1", prompt="tie"), rec("t2", "tie", "h2", prompt="tie"),
        rec("b1", "both_bad", "h1", prompt="bad"), rec("s1", "escalate", "h2", prompt="bad"), rec("s2", "escalate", "h3", prompt="bad"),
    ]
    j = judgments_from_records(recs)
    res = routing.run(j)
    pid = dict(j.select("prompt_text", "pair_id").unique().iter_rows())
    by_reason = {r: set(res.flags.filter(pl.col("reason") == r)["subject_id"]) for r in ("too_easy", "ambiguous")}
    assert by_reason == {"too_easy": {pid["easy"]}, "ambiguous": {pid["amb"]}}
    m = res.metrics
    assert m["judgment_labels"] == {"a": 6, "b": 2, "tie": 2, "both_bad": 1, "escalate": 2}
    assert m["routed_pairs"] == {"tie": 1, "both_bad": 0, "escalate": 1}
    assert m["pair_consensus"]["a"] == 3


def test_edge_cases() -> None:
    one = judgments_from_records([rec("c1", "a", "h1")])
    r = routing.run(one)
    assert r.flags.height == 0 and r.status == "pass"
    r = routing.run(one.head(0))
    assert r.flags.height == 0 and r.metrics["pairs"] == 0
