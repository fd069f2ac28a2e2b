"""A scripted reviewer for the demo and the tests: answers the JSONL review tasks of a
``prefpipe review export --format jsonl`` of a version curated from ``data/samples/``.

Deterministic (standard library only).  Two reviewers:

* ``review-bot-1`` answers every task with the pair's hidden true preference
  (``data/samples/answer_key/pairs.json``, matched by the pair's texts in the sample batches);
  a pair the key does not know is answered ``both_bad``;
* ``review-bot-2`` also answers the tasks whose pair id hashes to 0 mod 4, and on half of those
  picks the other side: those pairs get one review each way, a tie between reviews, and stay routed.

Each answered row is the exported task plus ``annotator_id``, ``annotator_kind``, ``label`` and a
``critique``: the JSONL review format that ``prefpipe review import --format jsonl`` reads.

Usage: ``python data/review_bot.py TASKS.jsonl --out ANSWERS.jsonl [--samples DIR]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _text(r: object) -> str:
    return r["text"] if isinstance(r, dict) else str(r)


def _prompt_key(p: object) -> str:
    msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
    return json.dumps([[m["role"], m["content"].strip()] for m in msgs], ensure_ascii=False)


def truth(samples: Path) -> dict[tuple[str, str, str], str]:
    """(prompt, text a, text b) of every sample pair -> the text of its truly better response."""
    key = {k["task_id"]: k["true_label"] for k in json.loads((samples / "answer_key" / "pairs.json").read_text("utf-8"))}
    out: dict[tuple[str, str, str], str] = {}
    for batch in sorted(samples.glob("batch-*.jsonl")):
        for line in batch.read_text("utf-8").splitlines():
            try:
                row = json.loads(line)
                a, b = _text(row["response_a"]).strip(), _text(row["response_b"]).strip()
                label = key.get(row.get("task_id"))
                if label in ("a", "b"):
                    out[(_prompt_key(row["prompt"]), *sorted((a, b)))] = a if label == "a" else b
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # the planted malformed lines
    return out


def answer(task: dict, better: str | None, reviewer: str, flip: bool) -> dict:
    a, b = _text(task["response_a"]).strip(), _text(task["response_b"]).strip()
    if better is None:
        label, why = "both_bad", "Neither response is acceptable."
    else:
        label = "a" if a == better else "b"
        if flip:
            label = "b" if label == "a" else "a"
        why = "Response 1 is better." if label == task["shown_first"] else "Response 2 is better."
    return {**task, "annotator_id": reviewer, "annotator_kind": "human", "label": label, "critique": why}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=Path, default=HERE / "samples")
    args = ap.parse_args(argv)
    known = truth(args.samples)
    rows = []
    for line in args.tasks.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        k = (_prompt_key(task["prompt"]), *sorted((_text(task["response_a"]).strip(), _text(task["response_b"]).strip())))
        better = known.get(k)
        rows.append(answer(task, better, "review-bot-1", flip=False))
        h = int(hashlib.sha256(task["pair_id"].encode("utf-8")).hexdigest(), 16)
        if h % 4 == 0:
            rows.append(answer(task, better, "review-bot-2", flip=h % 8 == 0))
    tmp = args.out.with_name(args.out.name + ".tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tmp.replace(args.out)
    print(f"review-bot: {len(rows)} answers to {len({r['task_id'] for r in rows})} tasks -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
