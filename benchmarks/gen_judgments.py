"""Seeded bulk generator of realistic raw judgment batches for the benchmarks.

Structure of the output (canonical JSONL): ~3.3 judgments per pair (2-3 humans, sometimes an
AI judge, sometimes in both display orders), ~1.25 pairs per prompt, prompts and responses of
real words sampled at their corpus frequency from the repo's source texts (``data/source``:
English for ``en``, Japanese and Chinese character pieces for ``ja-JP``/``zh-CN``), sized so the
average line is ``--row-bytes`` long, 200 human annotators
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

GEN_VERSION = 2  # part of cached file names: bump when the generated text changes
SOURCE = Path(__file__).resolve().parent.parent / "data" / "source"


def _texts(name: str) -> list[str]:
    out = []
    for line in (SOURCE / name).read_text(encoding="utf-8").splitlines():
        row = orjson.loads(line)
        prompt = row["prompt"] if isinstance(row["prompt"], str) else " ".join(m["content"] for m in row["prompt"])
        out += [prompt, row.get("chosen") or "", row.get("rejected") or ""]
    return [t for t in out if t]


def _vocab() -> dict[str, tuple[list[str], str]]:
    """Per locale: tokens with their corpus frequency (a list with repeats) and the joiner.
    Random text from it has the function-word and script statistics of real text."""
    en = [w for t in _texts("hh_harmless.jsonl") + _texts("llamafactory_dpo_en.jsonl") for w in t.split()]

    def pieces(name: str) -> list[str]:  # CJK: 2-character pieces of the running text
        chars = "".join(ch for t in _texts(name) for ch in t if not ch.isspace())
        return [chars[i:i + 2] for i in range(0, len(chars) - 1, 2)]

    return {"en": (en, " "), "ja-JP": (pieces("ja_handwritten.jsonl"), ""), "zh-CN": (pieces("llamafactory_dpo_zh.jsonl"), "")}


def generate(out: Path, judgments: int, row_bytes: int = 1600, seed: int = 0, uniform: bool = False) -> dict[str, int]:
    """Write the batch; ``uniform`` gives every row the same shape and no malformed rows, so that
    the bare Arrow/Polars JSON readers (which reject mixed types and bad lines) can parse it too."""
    rng = random.Random(seed)
    vocabs = _vocab()
    # ~7 bytes per word; a row is ~200 bytes of fields + prompt + 2 responses (prompt : resp = 1 : 2 : 2)
    words_total = max(30, (row_bytes - 330) * 10 // 60)
    w_prompt, w_resp = max(8, words_total // 5), max(10, 2 * words_total // 5)
    n_pairs = max(1, int(judgments / 3.3))
    n_prompts = max(1, int(n_pairs / 1.25))

    locales = ["en"] * 8 + ["ja-JP", "zh-CN"]

    def words(loc: str, k: int) -> list[str]:
        return rng.choices(vocabs[loc][0], k=max(3, int(rng.gauss(k, k / 4))))

    def text(loc: str, k: int) -> str:
        return vocabs[loc][1].join(words(loc, k))

    prompt_words = [words(locales[p % len(locales)], w_prompt) for p in range(n_prompts)]
    for i in rng.sample(range(1, n_prompts), k=n_prompts // 50):  # near-duplicate prompts: one word changed
        loc = locales[i % len(locales)]
        if loc != locales[(i - 1) % len(locales)]:
            continue
        w = list(prompt_words[i - 1])
        w[rng.randrange(len(w))] = rng.choice(vocabs[loc][0])
        prompt_words[i] = w
    prompts = [vocabs[locales[p % len(locales)]][1].join(w) for p, w in enumerate(prompt_words)]
    del prompt_words
    humans = [f"rev-{i:03d}" for i in range(200)]
    ais = ["judge-alpha", "judge-beta", "judge-gamma", "judge-delta"]
    written = dups = bad = 0
    cid = 0
    t0 = time.perf_counter()
    with open(out, "wb") as fh:
        pair = 0
        while written < judgments:
            p = pair % n_prompts
            loc = locales[p % len(locales)]
            ra, rb = text(loc, w_resp), text(loc, w_resp)
            truth = rng.random() < 0.5
            raters = [(h, "human") for h in rng.sample(humans, rng.choice((2, 3, 3)))]
            if rng.random() < 0.3:
                raters.append((rng.choice(ais), "ai"))
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


def cached_batch(judgments: int, row_bytes: int, *, prefix: str = "messy", seed: int = 0, uniform: bool = False) -> Path:
    """The generated batch under $TMPDIR/prefpipe-bench/ (generated once, atomically)."""
    import tempfile

    cache = Path(tempfile.gettempdir()) / "prefpipe-bench"
    cache.mkdir(exist_ok=True)
    path = cache / f"{prefix}-v{GEN_VERSION}-{judgments}-{row_bytes}.jsonl"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        tmp = path.with_suffix(".tmp")
        print(generate(tmp, judgments, row_bytes, seed=seed, uniform=uniform), flush=True)
        tmp.replace(path)
    return path


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
