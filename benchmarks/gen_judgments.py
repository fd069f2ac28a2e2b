"""Seeded bulk generator of realistic raw judgment batches for the benchmarks.

Structure of the output (canonical JSONL): ~3.3 judgments per pair (2-3 humans, sometimes an
AI judge, sometimes in both display orders), ~1.25 pairs per prompt, prompts and responses of
random pseudo-words sized so the average line is ``--row-bytes`` long, 200 human annotators
(one position-biased), 4 AI judges, locales en/ja-JP/zh-CN, 1 % re-delivered duplicates,
2 % near-duplicate prompts and 0.1 % malformed rows.

    python benchmarks/gen_judgments.py OUT.jsonl --judgments 1000000 --row-bytes 1600
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import orjson

_SYL = ["ka", "to", "ri", "mo", "ne", "sa", "lu", "pe", "di", "ga", "xo", "in", "er", "an", "ol", "us", "ve", "qui"]


def _vocab(rng: random.Random, n: int = 6000) -> list[str]:
    return ["".join(rng.choices(_SYL, k=rng.randint(1, 4))) for _ in range(n)]


def generate(out: Path, judgments: int, row_bytes: int = 1600, seed: int = 0, uniform: bool = False) -> dict[str, int]:
    """Write the batch; ``uniform`` gives every row the same shape and no malformed rows, so that
    the bare Arrow/Polars JSON readers (which reject mixed types and bad lines) can parse it too."""
    rng = random.Random(seed)
    vocab = _vocab(rng)
    # ~7 bytes per word; a row is ~200 bytes of fields + prompt + 2 responses (prompt : resp = 1 : 2 : 2)
    words_total = max(30, (row_bytes - 330) * 10 // 60)
    w_prompt, w_resp = max(8, words_total // 5), max(10, 2 * words_total // 5)
    n_pairs = max(1, int(judgments / 3.3))
    n_prompts = max(1, int(n_pairs / 1.25))

    def text(k: int) -> str:
        return " ".join(rng.choices(vocab, k=max(3, int(rng.gauss(k, k / 4)))))

    prompts = [text(w_prompt) for _ in range(n_prompts)]
    for i in rng.sample(range(n_prompts), k=n_prompts // 50):  # near-duplicate prompts: one word changed
        words = prompts[i - 1].split()
        words[rng.randrange(len(words))] = rng.choice(vocab)
        prompts[i] = " ".join(words)
    humans = [f"rev-{i:03d}" for i in range(200)]
    ais = ["judge-alpha", "judge-beta", "judge-gamma", "judge-delta"]
    locales = ["en"] * 8 + ["ja-JP", "zh-CN"]
    written = dups = bad = 0
    cid = 0
    t0 = time.perf_counter()
    with open(out, "wb") as fh:
        pair = 0
        while written < judgments:
            p = pair % n_prompts
            ra, rb = text(w_resp), text(w_resp)
            truth = rng.random() < 0.5
            raters = [(h, "human") for h in rng.sample(humans, rng.choice((2, 3, 3)))]
            if rng.random() < 0.3:
                raters.append((rng.choice(ais), "ai"))
            loc = locales[p % len(locales)]
            for who, kind in raters:
                if written >= judgments:
                    break
                orders = ("a", "b") if kind == "ai" and rng.random() < 0.5 else (rng.choice("ab"),)
                for shown in orders:
                    correct = rng.random() < 0.85
                    if who == "rev-007":  # position-biased annotator
                        label = shown if rng.random() < 0.9 else ("b" if shown == "a" else "a")
                    else:
                        label = ("a" if truth else "b") if correct else ("b" if truth else "a")
                    if rng.random() < 0.04:
                        label = rng.choice(("tie", "both_bad", "escalate"))
                    row = {
                        "comparison_id": f"bench-{cid:08d}", "batch_id": f"bench-{seed}",
                        "prompt": prompts[p] if pair % 2 and not uniform else [{"role": "user", "content": prompts[p]}],
                        "response_a": {"text": ra, "model": "m-7b", "model_version": "2026-10"},
                        "response_b": rb, "shown_first": shown, "label": label,
                        "strength": round(rng.random(), 2), "confidence": round(rng.random(), 2),
                        "annotator_id": who, "annotator_kind": kind, "locale": loc, "tags": ["bench"],
                        "created_at": f"2026-11-{1 + cid % 28:02d}T10:00:00Z",
                    }
                    cid += 1
                    line = orjson.dumps(row)
                    if rng.random() < 0.001 and not uniform:
                        line, bad = line[: len(line) // 2], bad + 1  # truncated: invalid JSON
                    fh.write(line + b"\n")
                    written += 1
                    if rng.random() < 0.01 and written < judgments:  # re-delivered duplicate
                        row["comparison_id"] = f"bench-{cid:08d}"
                        cid += 1
                        fh.write(orjson.dumps(row) + b"\n")
                        written += 1
                        dups += 1
            pair += 1
    return {"judgments": written, "pairs": pair, "prompts": min(pair, n_prompts), "duplicates": dups,
            "malformed": bad, "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--judgments", type=int, default=1_000_000)
    ap.add_argument("--row-bytes", type=int, default=1600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--uniform", action="store_true", help="one row shape, no malformed rows (bare readers can parse it)")
    a = ap.parse_args()
    print(generate(a.out, a.judgments, a.row_bytes, a.seed, a.uniform))


if __name__ == "__main__":
    main()
