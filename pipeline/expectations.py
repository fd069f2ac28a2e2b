"""Great Expectations suite over a version's DPO splits, run through GX's own API.

An ephemeral GX context (nothing written to a GX project), a pandas datasource with one
dataframe asset per split, one suite, one validation definition per split, run by a
checkpoint; the Data Docs site is built once, after the last split, into ``docs_dir`` (the
same pages as an ``UpdateDataDocsAction`` per checkpoint, which rebuilt the site every time:
~1 s a split).  A run's folder (results, summary, Data Docs) is written into a staging
directory and renamed into place whole: a reader never sees a half-written one.  GX is imported
lazily (its import costs ~4-7 s).  Certification validates only the parts no earlier
certification validated (``pipeline.certify_parts``).

The suite (per split): the DPO schema (exact column set in order), non-null required
columns, ``pair_id`` unique, ``weight`` in (0, 1], ``agreement`` in [0, 1], ``strength``
in [0, 1], ``n_judgments`` >= 1, ``annotator_kind`` in {human, ai, unknown, mixed}, chosen text !=
rejected text, prompt ends with a user turn, chosen/rejected are one assistant message
(derived scalar columns: GX validates flat pandas columns).  Text columns reach GX HTML-escaped (its Data
Docs render unexpected values as they are); validation_<name>.json therefore shows them escaped.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.store import StageMark, atomic_write_bytes, replace_dir
from schemas.arrow import polars_schema
from schemas.records import PAIR_ANNOTATOR_KINDS, DPORow

REQUIRED_NON_NULL = ("prompt", "chosen", "rejected", "pair_id", "weight", "agreement", "n_judgments", "annotator_kind")


def _json_text(name: str) -> pl.Expr:
    """A nested column as its JSON text (null stays null)."""
    text = pl.struct(pl.col(name).alias("v")).struct.json_encode().str.strip_prefix('{"v":').str.strip_suffix("}")
    return pl.when(pl.col(name).is_null()).then(None).otherwise(text).alias(name)


def _flatten_for_gx(df: pl.DataFrame):
    """GX checks pandas columns; nested message lists become derived scalar columns, and the
    nested columns themselves their JSON text.  (GX fingerprints every batch: a frame with list
    columns is not hashable by pandas, and GX falls back to pickling the whole frame -- 66 of the
    96 s of a 3M-judgment version's first certification.)"""
    flat = df.with_columns(
        chosen_text=pl.col("chosen").list.last().struct.field("content"),
        rejected_text=pl.col("rejected").list.last().struct.field("content"),
        chosen_role=pl.col("chosen").list.last().struct.field("role"),
        rejected_role=pl.col("rejected").list.last().struct.field("role"),
        n_chosen_messages=pl.col("chosen").list.len(),
        n_rejected_messages=pl.col("rejected").list.len(),
        prompt_last_role=pl.col("prompt").list.last().struct.field("role"),
        prompt_turns=pl.col("prompt").list.len(),
    ).with_columns(chosen_differs_from_rejected=pl.col("chosen_text") != pl.col("rejected_text"))
    nested = [c for c, dt in df.schema.items() if isinstance(dt, (pl.List, pl.Struct, pl.Array))]
    flat = flat.with_columns([_json_text(c) for c in nested])
    return flat.with_columns([_html_escaped(c) for c, dt in flat.schema.items() if dt == pl.String]).to_pandas()


def _html_escaped(name: str) -> pl.Expr:
    """A text column HTML-escaped: GX's Data Docs put a failing expectation's unexpected values into the page
    as they are (a ``<script>`` in a pair id or an annotator kind ran in the reader's browser).  Escaping is
    one-to-one and leaves every expectation of the suite meaning the same (uniqueness, non-null, non-empty,
    membership in sets of plain words; chosen != rejected is compared before), so results do not change."""
    e = pl.col(name)
    for ch, ent in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#x27;")):
        e = e.str.replace_all(ch, ent, literal=True)
    return e.alias(name)


def build_suite(gx):
    E = gx.expectations
    suite = gx.ExpectationSuite(name="prefpipe_dpo_split")
    cols = list(polars_schema(DPORow))
    suite.add_expectation(E.ExpectTableColumnsToMatchSet(column_set=cols + [
        "chosen_text", "rejected_text", "chosen_role", "rejected_role", "n_chosen_messages", "n_rejected_messages",
        "prompt_last_role", "prompt_turns", "chosen_differs_from_rejected"], exact_match=True))
    for c in REQUIRED_NON_NULL:
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=c))
    suite.add_expectation(E.ExpectColumnValuesToBeUnique(column="pair_id"))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="weight", min_value=0, max_value=1, strict_min=True))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="agreement", min_value=0, max_value=1))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="strength", min_value=0, max_value=1, mostly=1.0))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="n_judgments", min_value=1))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="annotator_kind", value_set=list(PAIR_ANNOTATOR_KINDS)))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="chosen_differs_from_rejected", value_set=[True]))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="chosen_role", value_set=["assistant"]))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="rejected_role", value_set=["assistant"]))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="n_chosen_messages", value_set=[1]))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="n_rejected_messages", value_set=[1]))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="prompt_last_role", value_set=["user"]))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="prompt_turns", min_value=1))
    suite.add_expectation(E.ExpectColumnValueLengthsToBeBetween(column="chosen_text", min_value=1))
    suite.add_expectation(E.ExpectColumnValueLengthsToBeBetween(column="rejected_text", min_value=1))
    return suite


def run_expectations(batches: dict[str, pl.DataFrame | Callable[[], pl.DataFrame]], out_dir: Path, *,
                     staging: Path | None = None) -> dict[str, Any]:
    """Validate each batch (rows of a split: parts that no earlier certification validated, at
    most a bounded number of rows a batch); write ``validation_<name>.json``, ``summary.json`` and
    Data Docs as the folder ``out_dir``.  A batch given as a function is read when it is validated
    and dropped after, so only one batch is in memory at a time.

    The folder is written whole into a staging directory (under ``staging``, e.g. the store's
    ``.staging/``, marked as its writer's while it lives; default: a hidden one beside ``out_dir``)
    and renamed into place, replacing an older ``out_dir`` (:func:`pipeline.store.replace_dir`): a
    crash or a failure leaves the older folder (or none) as it was, and two runs into one ``out_dir``
    never mix their files (GX wrote straight into ``out_dir``: a half-written site, validation files
    of two runs side by side).  ``out_dir`` holds one run's results: a batch another run validated is
    not in it.

    Returns ``{"success": bool, "splits": {name: {...}}, "docs_index": path}`` (the path in ``out_dir``).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    final = out_dir.resolve()  # GX needs an absolute base_directory
    final.parent.mkdir(parents=True, exist_ok=True)
    nonce = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    stage = (staging.resolve() / f"gx-{final.parent.name}-{final.name}.{nonce}" if staging is not None
             else final.with_name(f".{final.name}.{nonce}.tmp"))
    mark = StageMark(stage) if staging is not None else None  # (a sweep removes it once its writer is gone)
    try:
        stage.mkdir(parents=True)
        summary = _validate_into(gx, batches, stage, docs_index=final / "data_docs" / "index.html")
        replace_dir(stage, final, aside_in=stage.parent if staging is not None else None)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if mark is not None:
            mark.release()
    return summary


def _validate_into(gx, batches: dict[str, pl.DataFrame | Callable[[], pl.DataFrame]], out_dir: Path, *,
                   docs_index: Path) -> dict[str, Any]:
    """:func:`run_expectations`'s work, written into the staging directory ``out_dir`` (absolute)."""
    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    docs_dir = out_dir / "data_docs"
    ctx.add_data_docs_site(site_name="prefpipe", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    suite = ctx.suites.add(build_suite(gx))
    ds = ctx.data_sources.add_pandas("prefpipe")
    results: dict[str, Any] = {}
    ok = True
    for name, batch in batches.items():
        df = batch() if callable(batch) else batch
        asset = ds.add_dataframe_asset(name)
        bd = asset.add_batch_definition_whole_dataframe(f"{name}_all")
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"dpo_{name}", data=bd, suite=suite))
        cp = ctx.checkpoints.add(gx.Checkpoint(name=f"cp_{name}", validation_definitions=[vd], actions=[]))
        run = cp.run(batch_parameters={"dataframe": _flatten_for_gx(df)})
        vr = next(iter(run.run_results.values()))
        failed = [f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column', '')})"
                  for r in vr.results if not r.success]
        stats = vr.statistics
        results[name] = {"success": bool(vr.success), "rows": df.height,
                         "evaluated": int(stats["evaluated_expectations"]), "failed": failed}
        ok = ok and results[name]["success"]
        atomic_write_bytes(out_dir / f"validation_{name}.json", json.dumps(vr.to_json_dict(), indent=1, default=str).encode())
        del df, run, vr
    ctx.build_data_docs()
    summary = {"success": ok, "splits": results, "docs_index": str(docs_index)}
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
