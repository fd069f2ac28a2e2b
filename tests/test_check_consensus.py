"""The consensus check's abstentions and figures per annotator kind."""
from __future__ import annotations

import random

import numpy as np
import polars as pl

from pipeline.checks.consensus import confidence_expr, run


def test_figures_by_kind_are_those_of_each_kinds_pairs():
    rng = random.Random(2)
    n = 300
    pairs = pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)],
                          "annotator_kind": [rng.choice(["human", "ai", "mixed"]) for _ in range(n)],
                          "p_a_weighted": [rng.choice([rng.random(), None]) for _ in range(n)],
                          "label_consensus": [rng.choice(["a", "b"]) for _ in range(n)]})
    res = run(pl.DataFrame(), pairs=pairs)
    dec = pairs.select("annotator_kind", confidence=confidence_expr()).drop_nulls("confidence")
    assert sorted(res.metrics["by_kind"]) == ["ai", "human", "mixed"]
    for kind, got in res.metrics["by_kind"].items():
        conf = dec.filter(pl.col("annotator_kind") == kind)["confidence"].to_numpy()
        assert got["decided_pairs"] == conf.size and got["abstained"] == int((conf < res.metrics["abstain_below"]).sum())
        assert got["mean_confidence"] == float(np.sort(conf).mean())  # (the mean of the sorted values: order-free)
        assert got["confidence_quantiles"] == [round(float(x), 4) for x in np.quantile(conf, [0.05, 0.25, 0.5, 0.75, 0.95])]
    assert sum(k["decided_pairs"] for k in res.metrics["by_kind"].values()) == res.metrics["decided_pairs"] == dec.height
