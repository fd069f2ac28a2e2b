"""Held-out evaluation on the version's test split: per slice, before vs after training, with bootstrap CIs.

For every test pair i with summed completion log-probs of the reference (r), the policy before
training (b: the initial weights) and after (a), and phase p in {before, after}::

    reward_chosen_i  = beta * (logp_p(chosen_i)   - logp_r(chosen_i))        (TRL's implicit reward)
    reward_rejected_i = beta * (logp_p(rejected_i) - logp_r(rejected_i))
    reward_margin_i  = reward_chosen_i - reward_rejected_i
    reward_accuracy_i = [reward_chosen_i > reward_rejected_i]                 (TRL's definition: a tie is wrong)
    dpo_loss_i       = the run's objective (trainer.objectives) on the four log-probs
    logp_accuracy_i  = [logp_p(chosen_i) > logp_p(rejected_i)]                (does the model's likelihood
                                                                               prefer the chosen reply?)

When the reference is the initial policy (the default), "before" has zero rewards by
construction (loss log 2, reward accuracy 0); its ``logp_accuracy`` is the informative
baseline.  Each metric is a plain mean over the slice's pairs (pair weights are not applied:
a slice estimate should not depend on the curation policy's weighting).

Slices: ``all``; ``locale``; ``tag`` (a pair is in every slice of its tags, from the version's
``pairs.parquet``; "(none)" without tags); ``annotator_kind``; ``agreement`` and ``strength``
buckets (``< 0.6``, ``0.6-0.8``, ``>= 0.8``; ``n/a`` when missing).  Confidence intervals:
percentile bootstrap over the slice's pairs (``resamples`` draws, seeded); the ``delta`` phase
(after - before) resamples pairs jointly, so it is a paired interval.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.objectives import DPOLossConfig

METRICS = ("dpo_loss", "reward_accuracy", "reward_margin", "logp_accuracy")
SLICE_KINDS = ("all", "protected", "locale", "tag", "annotator_kind", "agreement", "strength")
BUCKETS = ((0.6, "< 0.6"), (0.8, "0.6-0.8"), (math.inf, ">= 0.8"))


@dataclass(frozen=True)
class BootstrapConfig:
    resamples: int = 1000
    ci: float = 0.95
    seed: int = 0


def bucket(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return next(label for upper, label in BUCKETS if x < upper)


def pair_metrics(logp_chosen: np.ndarray, logp_rejected: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray,
                 loss: DPOLossConfig, lengths: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-pair metrics of one phase (arrays of shape (n,), float64); ``lengths`` = completion
    token counts (chosen, rejected), which IPO and RPO need."""
    import torch

    from trainer.objectives import dpo_objective

    t = [torch.as_tensor(x, dtype=torch.float64) for x in (logp_chosen, logp_rejected, ref_chosen, ref_rejected)]
    losses, _ = dpo_objective(*t, loss, chosen_lengths=torch.as_tensor(lengths[0]),
                              rejected_lengths=torch.as_tensor(lengths[1]))
    rc, rr = loss.beta * (t[0] - t[2]), loss.beta * (t[1] - t[3])
    return {"dpo_loss": losses.detach().double().numpy(), "reward_accuracy": (rc > rr).double().numpy(),
            "reward_margin": (rc - rr).numpy(), "logp_accuracy": (t[0] > t[1]).double().numpy(),
            "reward_chosen": rc.numpy(), "reward_rejected": rr.numpy()}


def slice_members(rows: list[dict[str, Any]], tags: dict[str, list[str]] | None = None,
                  protected: set[str] | None = None) -> dict[tuple[str, str], list[int]]:
    """(kind, value) -> indices of ``rows`` in that slice.  ``protected``: pair ids of protected
    evaluation sets (``prefpipe protect``): their test pairs form the slice ``protected/yes``."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        keys = [("all", "all"), ("locale", str(r.get("locale") or "n/a")),
                ("annotator_kind", str(r.get("annotator_kind") or "n/a")),
                ("agreement", bucket(r.get("agreement"))), ("strength", bucket(r.get("strength")))]
        if tags is not None:
            keys += [("tag", t) for t in (tags.get(str(r["pair_id"])) or ["(none)"])]
        if protected and str(r["pair_id"]) in protected:
            keys.append(("protected", "yes"))
        for k in keys:
            out.setdefault(k, []).append(i)
    order = {k: n for n, k in enumerate(SLICE_KINDS)}
    return dict(sorted(out.items(), key=lambda kv: (order[kv[0][0]], -len(kv[1]), kv[0][1])))


def bootstrap(values: dict[str, np.ndarray], idx: np.ndarray, cfg: BootstrapConfig, rng: np.random.Generator
              ) -> dict[str, dict[str, float]]:
    """Mean and percentile CI of each metric over the pairs ``idx`` (same resamples for every metric)."""
    n = len(idx)
    draws = rng.integers(0, n, size=(cfg.resamples, n)) if n else np.zeros((0, 0), dtype=int)
    lo_q, hi_q = (1 - cfg.ci) / 2, 1 - (1 - cfg.ci) / 2
    out = {}
    for name, v in values.items():
        x = v[idx]
        if n == 0:
            out[name] = {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan}
            continue
        means = x[draws].mean(1)
        out[name] = {"mean": float(x.mean()), "ci_low": float(np.quantile(means, lo_q)),
                     "ci_high": float(np.quantile(means, hi_q))}
    return out


def evaluate_slices(rows: list[dict[str, Any]], logps: dict[str, dict[str, tuple[float, float]]],
                    lengths: dict[str, tuple[int, int]], loss: DPOLossConfig, *,
                    tags: dict[str, list[str]] | None = None, protected: set[str] | None = None,
                    boot: BootstrapConfig = BootstrapConfig()
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluate the test ``rows`` (kept pairs, with their slice columns).

    ``logps``: phase ("reference", "before", "after") -> pair_id -> (chosen, rejected) summed log-probs;
    ``lengths``: pair_id -> (chosen, rejected) completion tokens.
    Returns (summary for eval.json, tidy rows for eval.parquet, per-pair rows).
    """
    ids = [str(r["pair_id"]) for r in rows]
    arr = {ph: (np.array([logps[ph][i][0] for i in ids], dtype=np.float64),
                np.array([logps[ph][i][1] for i in ids], dtype=np.float64)) for ph in logps}
    lens = (np.array([lengths[i][0] for i in ids], dtype=np.float64), np.array([lengths[i][1] for i in ids], dtype=np.float64))
    per = {ph: pair_metrics(*arr[ph], *arr["reference"], loss, lens) for ph in ("before", "after")}
    delta = {m: per["after"][m] - per["before"][m] for m in METRICS}
    slices, tidy = [], []
    for (kind, value), members in slice_members(rows, tags, protected).items():
        idx = np.asarray(members, dtype=np.int64)
        entry: dict[str, Any] = {"kind": kind, "value": value, "pairs": len(members)}
        for phase, values in (("before", per["before"]), ("after", per["after"]), ("delta", delta)):
            rng = np.random.default_rng([boot.seed, len(slices)])  # the same draws for the three phases
            stats = bootstrap({m: values[m] for m in METRICS}, idx, boot, rng)
            entry[phase] = stats
            tidy += [{"kind": kind, "value": value, "pairs": len(members), "phase": phase, "metric": m, **s}
                     for m, s in stats.items()]
        slices.append(entry)
    pairs = [{"pair_id": pid, "locale": r.get("locale"), "annotator_kind": r.get("annotator_kind"),
              "agreement": r.get("agreement"), "strength": r.get("strength"),
              "tags": (tags or {}).get(pid, []),
              **{f"{ph}_logp_chosen": float(arr[ph][0][i]) for ph in arr},
              **{f"{ph}_logp_rejected": float(arr[ph][1][i]) for ph in arr},
              **{f"{ph}_{m}": float(per[ph][m][i]) for ph in per for m in (*METRICS, "reward_chosen", "reward_rejected")}}
             for i, (pid, r) in enumerate(zip(ids, rows))]
    summary = {"split": "test", "pairs": len(rows), "objective": loss.loss_type, "beta": loss.beta,
               "metrics": list(METRICS), "bootstrap": {"resamples": boot.resamples, "ci": boot.ci, "seed": boot.seed},
               "overall": slices[0] if slices else None, "slices": slices}
    return summary, tidy, pairs


def summary_lines(summary: dict[str, Any], *, max_slices: int = 12) -> list[str]:
    """The evaluation summary for a terminal: overall before -> after, then the slices (plain text)."""
    def fmt(s: dict[str, float], pct: bool) -> str:
        k = 100 if pct else 1
        d = 1 if pct else 3
        return f"{s['mean'] * k:.{d}f} [{s['ci_low'] * k:.{d}f}, {s['ci_high'] * k:.{d}f}]"

    o = summary.get("overall")
    if not o:
        return [f"test split: no pairs to evaluate ({summary.get('note', 'empty test split')})"]
    ci = int(summary["bootstrap"]["ci"] * 100)
    lines = [f"test split: {summary['pairs']} pairs, {summary['objective']} beta {summary['beta']}, {ci}% bootstrap CIs "
             f"({summary['bootstrap']['resamples']} resamples)",
             f"  DPO loss         before {fmt(o['before']['dpo_loss'], False)} -> after {fmt(o['after']['dpo_loss'], False)}",
             f"  reward accuracy  after {fmt(o['after']['reward_accuracy'], True)} %, margin "
             f"{fmt(o['after']['reward_margin'], False)}",
             f"  logp accuracy    before {fmt(o['before']['logp_accuracy'], True)} % -> after "
             f"{fmt(o['after']['logp_accuracy'], True)} %",
             "  per slice (pairs: reward accuracy after %, DPO loss before -> after):"]
    for s in [s for s in summary["slices"] if s["kind"] != "all"][:max_slices]:
        lines.append(f"    {s['kind']}={s['value']} ({s['pairs']}): {fmt(s['after']['reward_accuracy'], True)}, "
                     f"{s['before']['dpo_loss']['mean']:.3f} -> {s['after']['dpo_loss']['mean']:.3f}")
    rest = len([s for s in summary["slices"] if s["kind"] != "all"]) - max_slices
    if rest > 0:
        lines.append(f"    ... {rest} more slices in eval.json")
    return lines


def tags_by_pair(frame_rows: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    return {str(r["pair_id"]): [str(t) for t in (r.get("tags") or [])] for r in frame_rows}


def run_summary_lines(run_dir) -> list[str]:
    """:func:`summary_lines` of a finished run directory's ``eval.json`` (what ``./dev demo`` prints last)."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "eval.json"
    if not path.exists():
        return [f"no evaluation in {run_dir} (trained with test_eval=False?)"]
    lines = summary_lines(json.loads(path.read_text(encoding="utf-8")))
    return [*lines, f"  run report: {Path(run_dir) / 'report.html'} (and report.md)"]
