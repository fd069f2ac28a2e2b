"""Toy DPO data and certified stores for the trainer's tests and benchmark (no pipeline run needed).

``planted_rows`` makes pairs whose chosen reply always ends with a marker word and whose
rejected reply never does, so a model that learns the preference gets reward accuracy near
1 on held-out pairs.  ``source_rows`` turns ``data/source/*.jsonl`` (en / zh / ja
preference data) into DPO rows.  ``make_store`` writes a version with
``Store.write_version`` and, unless told otherwise, a "certified" record with
``Store.add_certification`` -- the same public writers the pipeline uses.
"""
from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

from pipeline.store import Store, write_parquet
from schemas.manifest import Certification, GateResult, IngestLedger, Ledger, Manifest

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river stone cloud paper garden window lamp orange music table winter letter bridge forest candle "
         "mirror train coffee island thunder").split()
MARKER = "absolutely"


def _row(pid: str, prompt: str, chosen: str, rejected: str, weight: float = 1.0, locale: str = "en") -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "pair_id": pid, "weight": weight,
            "agreement": 1.0, "n_judgments": 3, "strength": 0.8, "locale": locale, "annotator_kind": "human",
            "chosen_model": "m-a", "rejected_model": "m-b", "source_comparison_ids": [f"c-{pid}"]}


def planted_rows(n: int, seed: int = 0, prefix: str = "p") -> list[dict]:
    """Pairs where the chosen reply ends with MARKER; otherwise both replies are random words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = "Tell me about " + " ".join(rng.choices(WORDS, k=3)) + "."
        chosen = " ".join(rng.choices(WORDS, k=rng.randint(3, 6))) + " " + MARKER
        rejected = " ".join(rng.choices(WORDS, k=rng.randint(3, 6))) + " maybe"
        rows.append(_row(f"{prefix}-{i:04d}", prompt, chosen, rejected, weight=rng.choice([0.5, 0.75, 1.0])))
    return rows


def source_rows(limit: int | None = None) -> list[dict]:
    """DPO rows from data/source/*.jsonl (English, Chinese, Japanese), in a fixed order."""
    rows = []
    for path in sorted((ROOT / "data" / "source").glob("*.jsonl")):
        locale = "ja" if "ja_" in path.name else ("zh" if path.name.endswith("_zh.jsonl") else "en")
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            prompt = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
            row = _row(r["id"], "", r["chosen"], r["rejected"], locale=locale)
            row["prompt"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
            rows.append(row)
    random.Random(0).shuffle(rows)
    return rows[:limit] if limit else rows


def make_store(root: Path, splits: dict[str, list[dict]], *, version_id: str = "v-toy", certified: bool | None = True) -> Store:
    """A store with one version holding ``splits``; certified (True), rejected (False) or no record (None)."""
    import polars as pl

    store = Store(root)

    def build(stage: Path) -> Manifest:
        infos = {}
        for split, rows in splits.items():
            info = write_parquet(pl.DataFrame(rows), stage / "data" / f"{split}.parquet")
            infos[split] = info.model_copy(update={"path": f"data/{split}.parquet"})
        n = sum(len(r) for r in splits.values())
        return Manifest(
            version_id=version_id, created_at=datetime.now(UTC), code_version="test", policy_hash="p", policy={},
            ledger=Ledger(rows_in=n, quarantined=0, judgments_valid=n, pairs=n, pairs_kept=n,
                          splits={k: len(v) for k, v in splits.items()}),
            ingest=IngestLedger(rows_in=n, rows_valid=n, judgments=n), sources=[], splits=infos, checks=[])

    store.write_version(version_id, build)
    if certified is not None:
        gate = GateResult(name="toy", value=1, threshold=1, passed=certified)
        store.add_certification(Certification(
            version_id=version_id, verdict="certified" if certified else "rejected", gates=[gate], policy_hash="p",
            policy={}, certified_at=datetime.now(UTC), code_version="test",
            manifest_sha256=store.get(version_id).manifest_sha256()))
    return store
