"""The `prefpipe` command line (Typer).  Wiring only: the logic lives in `pipeline/`.

Exit codes (every command):
  0  success (validate: every row valid; certify: certified)
  1  validate: some rows were quarantined (the report says which)
  2  bad usage, or an input file / policy / store / id / key that cannot be used as a whole
     (the message names the file and the reason; nothing written)
  3  certify: the version was rejected
  4  train: the version is not certified (certificate -> manifest -> files does not verify)
  5  train: the training loss (or gradient norm, or a validation / test loss) became NaN/inf;
     the run stopped at that step and its run.json records the failure
  130  train: interrupted (Ctrl-C; 143: SIGTERM); its run.json records it and --resume continues the run

With --json a failing command prints one JSON document on stdout all the same (ok: false,
exit_code, error, and the file, line and field of the error): see :func:`_fail`.
"""
from __future__ import annotations

import inspect
import json
import sys
from contextvars import ContextVar
from pathlib import Path
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from rich.text import Text

from flows.console import err_console, json_text, markup, out_console, plain, progress_for, stage_progress

app = typer.Typer(
    name="prefpipe",
    help="Curate raw human/AI preference annotations into certified, versioned DPO data, and train on it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
policy_app = typer.Typer(help="Inspect the curation/certification policy.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

EXIT_OK, EXIT_QUARANTINE, EXIT_USAGE, EXIT_REJECTED, EXIT_NOT_CERTIFIED = 0, 1, 2, 3, 4

FilesArg = Annotated[list[Path], typer.Argument(help="Raw batch files: .jsonl, .ndjson or .json (JSON Lines; each also .gz), .parquet, .pq or .csv.", show_default=False)]
InputsArg = Annotated[list[str], typer.Argument(
    help="Raw batch files: .jsonl, .ndjson or .json (JSON Lines; each also .gz), .parquet, .pq or .csv -- local paths, or URLs of any filesystem fsspec knows "
         "(s3://, gs://, az://, https://, ... with its package installed: s3fs, gcsfs, adlfs, aiohttp), copied into "
         "the store and hashed on the way before they are read.", show_default=False)]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="Force the record format: canonical, trl, hh or rated (default: auto-detect per file)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
PolicyOpt = Annotated[Path | None, typer.Option("--policy", "-p", help="Policy file (.toml/.yaml); default: built-in defaults.")]
AnnotatorsOpt = Annotated[Path | None, typer.Option(
    "--annotators", help="Annotator registry, CSV or TOML (docs/input-format.md): every judgment is checked against it "
    "(unknown_annotator, kind_mismatch, unqualified_reviewer); replaces the policy's `annotators`.")]
MaxLineOpt = Annotated[str | None, typer.Option(
    "--max-line-bytes", help="Longest input line accepted (bytes, or e.g. 64MiB); default: the policy's ingest.max_line_bytes.")]
MaxGzipOpt = Annotated[str | None, typer.Option(
    "--max-decompressed-bytes", help="Most bytes a .gz input may decompress to (e.g. 64GiB); default: the policy's "
    "ingest.max_decompressed_bytes.")]


_AS_JSON: ContextVar[bool] = ContextVar("prefpipe_as_json", default=False)  # the running command's --json (set by guarded)


def _fail(message: str, *, code: int = EXIT_USAGE, label: str = "error", err: BaseException | None = None,
          multiline: bool = False, payload: dict | None = None) -> NoReturn:
    """The one way a command ends with a non-zero exit: ``label: message`` on stderr (shown literally;
    a line break in it as ``\\n`` unless ``multiline``: a message our code lays out over several lines),
    and with --json one JSON document on stdout, nothing else there: ``ok: false``, ``exit_code``,
    ``error`` (the message) and :func:`_error_place` (file, line, field; a registry's problems) -- or,
    for a result that is a failure (validate's quarantine, certify's rejection), the ``payload`` the
    command prints with ``ok: false``, ``exit_code`` and ``error`` added.  Then exit ``code``."""
    err_console().print(markup("[bold red]{label}:[/] {message}", label=label, message=plain(message, multiline=multiline)))
    if _AS_JSON.get():
        place = _error_place(err) if payload is None else {}
        _print_failure({**(payload or {}), "ok": False, "exit_code": code, "error": message, **place})
    raise typer.Exit(code)


def _print_failure(doc: dict) -> None:
    print(json_text(doc, indent=2))


def _fail_usage(message: str, *, multiline: bool = False, err: BaseException | None = None) -> NoReturn:
    """:func:`_fail` with exit 2 (bad usage, or an input that cannot be used as a whole); ``err``: the
    error it comes from, whose file, line and field the --json document names."""
    _fail(message, err=err, multiline=multiline)


def _error_place(err: BaseException | None) -> dict:
    """Where an error is, for a --json failure: ``file``, ``line``, ``field`` (null when the error does not
    say), ``where`` (a review file's task, answer or record) and a registry's ``problems`` when it has them."""
    from schemas.registry import RegistryError

    file = getattr(err, "path", None)  # UnreadableFile (ReviewFileError), RegistryError
    if file is None and isinstance(err, OSError) and err.filename is not None:
        file = err.filename
    place = {"file": None if file is None else str(file), "line": getattr(err, "line", None),
             "field": getattr(err, "field", None)}
    if getattr(err, "where", None):
        place["where"] = err.where
    if isinstance(err, RegistryError):
        place["problems"] = [{"line": ln, "field": f, "error": m} for ln, f, m in err.problems]
    return place


def _annotator_kind_option(value: str | None) -> str | None:
    """--annotator-kind checked as an option (exit 2), not row by row: a typo would quarantine every judgment."""
    from schemas.records import ANNOTATOR_KINDS

    if value is not None and value not in ANNOTATOR_KINDS:
        raise typer.BadParameter(f"expected one of {', '.join(ANNOTATOR_KINDS)}, found {value!r}")
    return value


def _known_errors() -> tuple[type[BaseException], ...]:
    from pipeline.readers import UnreadableFile
    from pipeline.signing import SigningConfigError
    from pipeline.store import StoreError
    from schemas.ids import UnsafeId
    from schemas.policy import PolicyError
    from schemas.registry import RegistryError

    return StoreError, UnreadableFile, PolicyError, RegistryError, UnsafeId, SigningConfigError, OSError


def guarded(fn):
    """Run a command so that a broken store, an unreadable file, a bad id or key, or a failing
    disk (full, read-only) ends in exit 2 with the file and the reason, never a traceback; with
    --json, every failure of the command also prints its JSON document (:func:`_fail`)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        as_json = _AS_JSON.set(bool(kwargs.get("as_json")))  # its failures (exit != 0) as JSON on stdout too
        try:
            return fn(*args, **kwargs)
        except _known_errors() as err:
            from schemas.policy import PolicyError
            from schemas.registry import RegistryError

            _fail_usage(_describe_error(err), multiline=isinstance(err, PolicyError | RegistryError), err=err)
        finally:
            _AS_JSON.reset(as_json)

    return run


def _describe_error(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:  # disk full, read-only, permission: the file and the reason
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


def command(*args, **kwargs):
    """``@app.command()`` with :func:`guarded` applied."""
    return lambda fn: app.command(*args, **kwargs)(guarded(fn))


@command()
def validate(
    files: InputsArg,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    max_errors: Annotated[int, typer.Option("--max-errors", min=0, help="How many quarantined rows to print.")] = 20,
    annotator_id: Annotated[str | None, typer.Option(help="annotator_id for formats without one (trl, hh, rated).")] = None,
    annotator_kind: Annotated[str | None, typer.Option(callback=_annotator_kind_option, help="annotator_kind (human, ai or unknown) for formats that do not say who judged (trl, hh, rated; default unknown).")] = None,
    max_line_bytes: MaxLineOpt = None,
    max_decompressed_bytes: MaxGzipOpt = None,
    annotators: AnnotatorsOpt = None,
) -> None:
    """Read and validate raw batch files; print the ledger and the first errors with line numbers.

    Nothing is written.  Exit 0 when every row is valid, 1 when rows were quarantined (or, with
    --annotators, judgments were flagged against the registry), 2 when a file or the registry
    cannot be used at all.
    """
    from pipeline.ingest import UnreadableFile, ingest_files
    from schemas.policy import Policy
    from schemas.registry import load_registry

    limits = _with_ingest_caps(Policy(), max_line_bytes, max_decompressed_bytes).ingest
    registry = load_registry(annotators) if annotators else None  # (a RegistryError: exit 2 through guarded)

    import tempfile

    from pipeline.remote import Staged

    staged = Staged(Path(tempfile.mkdtemp(prefix="prefpipe-inputs-")))  # (URL inputs: copied, hashed, removed at the end)
    try:
        paths, hashed = staged.inputs(files)
        with progress_for("validating", None, unit="rows", enabled=not as_json) as advance:
            # with a registry the judgments are kept for the registry check (memory grows with the input)
            result = ingest_files(paths, fmt=fmt, keep_judgments=registry is not None, on_progress=advance,
                                  annotator_id=annotator_id, annotator_kind=annotator_kind, limits=limits, hashed=hashed)
    except UnreadableFile as raw:
        err = staged.named(raw)
        _fail_usage(f"cannot read {err.path}: {err.why}", err=err)
    finally:
        staged.remove()
    q = result.quarantine
    found = _registry_findings(result.take_judgments(), registry) if registry is not None else None
    flagged = found.height if found is not None else 0
    if as_json:
        payload = {
            "ok": result.ledger.quarantined == 0 and flagged == 0,
            "ledger": result.ledger.model_dump(),
            "sources": [s.model_dump() for s in result.sources],
            "errors": _quarantine_errors(q, max_errors),
        }
        if registry is not None:
            payload["registry"] = {"file": str(annotators), "sha256": registry.sha256(), "annotators": len(registry.annotator),
                                   "flag_counts": dict(sorted(found.group_by("reason").len().iter_rows())),
                                   "flags": found.head(max_errors).to_dicts()}
        if not payload["ok"]:
            led = result.ledger
            found_in = [f"{led.quarantined:,} of {led.rows_in:,} rows quarantined"] + \
                       ([f"{flagged:,} judgments flagged against the registry"] if flagged else [])
            _fail("; ".join(found_in), code=EXIT_QUARANTINE, label="invalid", payload=payload)
        print(json_text(payload, indent=2))
    else:
        _print_ledger(result, out_console())
        if q.height:
            _print_quarantined(q.head(max_errors), q.height, out_console())
        if registry is not None:
            _print_registry_findings(found, registry, annotators, max_errors)
    raise typer.Exit(EXIT_QUARANTINE if result.ledger.quarantined or flagged else EXIT_OK)


def _registry_findings(judgments, registry):
    """Judgments flagged against the registry, with their file and line, in file order."""
    from pipeline.checks.registry import findings

    found = findings(judgments, registry)
    return found.join(judgments.select("comparison_id", "source_file", line="source_line"), on="comparison_id", how="left") \
        .sort("source_file", "line").select("source_file", "line", "comparison_id", "reason", "detail")


def _print_registry_findings(found, registry, path: Path, max_errors: int) -> None:
    con = out_console()
    counts = dict(found.group_by("reason").len().iter_rows())
    con.print(markup("\n[bold]Annotator registry[/] {path} ({n} annotators, sha256 {sha}): {counts}", path=str(path),
                     n=len(registry.annotator), sha=registry.sha256()[:12],
                     counts=", ".join(f"{r} {counts.get(r, 0)}" for r in ("unknown_annotator", "kind_mismatch",
                                                                           "unqualified_reviewer"))))
    for r in found.head(max_errors).iter_rows(named=True):
        con.print(markup("  {file}:{line}  [yellow]{reason}[/]  {detail}", file=r["source_file"], line=r["line"],
                         reason=r["reason"], detail=r["detail"]), soft_wrap=True)


def _quarantine_errors(q, limit: int) -> list[dict]:
    """The first ``limit`` quarantined rows for a --json document: file, line, reason, field, error."""
    return q.select("source_file", "line", "reason", "field", "error").head(limit).to_dicts()


def _print_quarantined(shown, total: int, con) -> None:
    """The quarantined rows ``shown`` (the first of ``total``), one line each (:func:`pipeline.ingest.quarantine_line`)."""
    from pipeline.ingest import quarantine_line

    con.print(markup("\n[bold]First {shown} of {total} quarantined rows:[/]", shown=shown.height, total=total))
    for r in shown.iter_rows(named=True):
        con.print(plain(f"  {quarantine_line(r)}"), soft_wrap=True)


def _print_ledger(result, con) -> None:
    """The ingest ledger of ``result`` (anything with ``sources`` and ``ledger``) as a table, per file and in total."""
    from rich.table import Table

    t = Table(title="Ingest ledger", show_lines=False)
    for col in ("file", "format", "rows in", "valid", "quarantined", "judgments"):
        t.add_column(col, justify="left" if col in ("file", "format") else "right")
    for s in result.sources:
        t.add_row(plain(s.path), plain(s.format), f"{s.rows_in:,}", f"{s.rows_valid:,}", f"{s.quarantined:,}", f"{s.judgments:,}")
    led = result.ledger
    t.add_row(plain("total", style="bold"), "", f"{led.rows_in:,}", f"{led.rows_valid:,}", f"{led.quarantined:,}", f"{led.judgments:,}")
    con.print(t)
    con.print(f"rows in {led.rows_in:,} = valid {led.rows_valid:,} + quarantined {led.quarantined:,}"
              + (f"  (quarantined by reason: {led.quarantined_by_reason})" if led.quarantined else ""), highlight=False)
    if led.skipped:
        con.print(f"candidate pairs not formed: {led.skipped}", highlight=False)


StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Version store directory.", envvar="PREFPIPE_STORE")]


def _load_policy_or_exit(policy: Path | None):
    """The policy, parsed once and resolved against the declared checks (exit 2 naming the key if it cannot be used)."""
    from pipeline.checks import resolve_policy
    from schemas.policy import PolicyError, load_policy

    pol = None
    try:
        pol = load_policy(policy)
        return resolve_policy(pol)
    except PolicyError as err:
        # resolve_policy knows the keys, not the file: name the file the bad key is in
        msg = str(err) if pol is None else f"invalid policy {policy or '(built-in defaults)'}:\n  {err}"
        err.path = err.path or policy
        _fail_usage(msg, multiline=True, err=err)


def _with_ingest_caps(pol, max_line_bytes: str | None, max_decompressed_bytes: str | None,
                      partition_rows: int | None = None):
    """``pol`` with the command line's ingest caps and partition size (part of the policy, so of a
    version's id); a bad value raises ``PolicyError`` (exit 2 through :func:`guarded`)."""
    from schemas.policy import policy_from_dict

    caps = {k: v for k, v in (("max_line_bytes", max_line_bytes), ("max_decompressed_bytes", max_decompressed_bytes),
                              ("partition_rows", partition_rows)) if v}
    if not caps:
        return pol
    return policy_from_dict({**pol.model_dump(mode="json"), "ingest": {**pol.ingest.model_dump(mode="json"), **caps}},
                            "(command-line options)")


def _open_store(store: Path, *, must_exist: bool = True):
    from pipeline.store import Store

    if must_exist and not (store / "versions").is_dir():
        _fail_usage(f"{store} is not a prefpipe store (no versions/ directory); create one with `prefpipe curate ... --store {store}`")
    return Store(store)


def _resolve_or_exit(st, ref: str):
    from pipeline.store import VersionNotFound

    try:
        return st.resolve(ref)
    except VersionNotFound as err:
        _fail_usage(str(err))


@command()
def curate(
    files: InputsArg,
    store: StoreOpt = Path("store"),
    policy: PolicyOpt = None,
    parent: Annotated[str | None, typer.Option("--parent", help="Build a child of this version (id, prefix or 'latest'): its judgments + the new batch.")] = None,
    fmt: FormatOpt = None,
    batch_id: Annotated[str | None, typer.Option(help="batch_id for rows without one (default: the file name).")] = None,
    annotator_id: Annotated[str | None, typer.Option(help="annotator_id for formats without one (trl, hh, rated).")] = None,
    annotator_kind: Annotated[str | None, typer.Option(callback=_annotator_kind_option, help="annotator_kind (human, ai or unknown) for formats that do not say who judged (trl, hh, rated; default unknown).")] = None,
    max_line_bytes: MaxLineOpt = None,
    max_decompressed_bytes: MaxGzipOpt = None,
    annotators: AnnotatorsOpt = None,
    full: Annotated[bool, typer.Option("--full", help="With --parent: recompute every check and pair from all judgments instead of extending the parent's state (still a child: lineage, sticky splits).")] = False,
    one_process: Annotated[bool, typer.Option("--one-process", help="Build a first version with the reference build, which holds every judgment in memory (another version id), instead of partition by partition. A first version is built over partitions of --partition-rows judgments: its tasks run in this process, or on the Dask cluster PREFPIPE_DASK names (tcp://host:8786, or 'local' for 2 local worker processes), whose workers read the partitions under <store>/.work (docs/scale-out.md). A child (--parent) holds only its parent's rows near its batch: its passes over the parent's judgment parts run as tasks the same way; its other stages run in this process.")] = False,
    partitioned: Annotated[bool, typer.Option("--partitioned", hidden=True, help="The default since first versions are always partitioned (kept for scripts).")] = False,
    partition_rows: Annotated[int | None, typer.Option("--partition-rows", min=1000, help="Judgments per partition of a partitioned build (policy ingest.partition_rows, default 250000): a worker holds one partition at a time.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest, check, select, split and write a new immutable dataset version.

    Prints the version id as the last line of stdout (with --json: one JSON document that
    holds it as version_id).  Re-running the same inputs with the
    same policy (and parent) returns the existing version and writes nothing (once its files are
    checked against its manifest: a damaged one is named, never "already there").
    Exit 0 written (or already there); 1 a partition task failed (no version; a retry computes only what is missing); 2 bad usage, unreadable input, input without a valid judgment (every row quarantined: the ledger and the first rows as `validate` lists them) or its version there but damaged (the file named); nothing written.
    """
    from pipeline.curate import CurateOptions, NoValidJudgments
    from pipeline.curate import curate as run_curate
    from pipeline.readers import UnreadableFile

    pol = _with_ingest_caps(_load_policy_or_exit(policy), max_line_bytes, max_decompressed_bytes, partition_rows)
    if annotators:  # part of the policy from here on: its content is in the policy hash, so in the version id
        from schemas.registry import load_registry

        pol = pol.model_copy(update={"annotators": load_registry(annotators)})
    st = _open_store(store, must_exist=False)
    if parent:
        _resolve_or_exit(st, parent)
    opts = CurateOptions(fmt=fmt, batch_id=batch_id, annotator_id=annotator_id, annotator_kind=annotator_kind,
                         partitioned=False if one_process else None)
    if one_process and partitioned:
        _fail_usage("--one-process and --partitioned: choose one")
    con = err_console()
    from pipeline.distributed import PartitionTaskError, partition_progress, state_compression, task_threads

    try:  # the environment's knobs, checked before any work (exit 2)
        task_threads(), state_compression()
    except ValueError as err:
        _fail_usage(str(err))
    try:
        with stage_progress("curating", enabled=not as_json) as prog, partition_progress(prog.partitions):
            res = run_curate(files, st, pol, parent=parent, options=opts, on_stage=prog.stage, on_rows=prog.rows, full=full)
    except UnreadableFile as err:
        _fail_usage(f"cannot read {err.path}: {err.why} (nothing written)", err=err)
    except NoValidJudgments as err:
        _refuse_nothing_valid(err, as_json)
    except PartitionTaskError as err:  # a worker's task failed: no version; a retry computes only the missing partitions
        _fail(f"{err} (nothing written)", code=1, label="curate failed")
    m = res.handle.manifest()
    if as_json:
        print(json.dumps({"version_id": res.version_id, "created": res.created, "path": str(res.handle.path),
                          "ledger": m.ledger.model_dump(), "registry_sha256": m.registry_sha256,
                          "checks": [{"name": c.name, "status": c.status} for c in m.checks],
                          "timings_s": res.timings}, indent=2))
        return
    state = "written" if res.created else "already exists (nothing written)"
    con.print(f"version {res.version_id} {state}: {res.handle.path}")
    if not res.created:
        pub = st.publication(res.handle)
        if pub.ok is None:  # (a version from before publication records: its files were checked, its manifest not)
            con.print(markup("[yellow]note:[/] {why}", why=pub.reason))
    _print_version_summary(m)
    print(res.version_id)


def _refuse_nothing_valid(err, as_json: bool) -> NoReturn:
    """curate of inputs without a valid judgment (bad input, exit 2): the ingest ledger and the first quarantined
    rows as ``validate`` shows them, on stderr (stdout holds nothing, or the --json document with them)."""
    if not as_json:
        con = err_console()
        _print_ledger(err, con)
        _print_quarantined(err.quarantine, err.ledger.quarantined, con)
    _fail(err.summary, payload={"ledger": err.ledger.model_dump(), "sources": [s.model_dump() for s in err.sources],
                                "errors": _quarantine_errors(err.quarantine, err.SHOWN), **_error_place(err)})


SHOW_OPEN_TEXT, SHOW_OPEN_JSON = 10, 1000  # open reviews listed by `show` (oldest first)


def _print_open_reviews(waiting) -> None:
    """The routed pairs still waiting for a review, oldest first, with their age."""
    con = out_console()
    if waiting.height == 0:
        con.print("open reviews: none")
        return
    con.print(markup("open reviews: {n} routed pairs waiting (oldest {age} days; `prefpipe review export` sends them out)",
                     n=f"{waiting.height:,}", age=f"{waiting['age_days'][0]:.1f}"))
    for r in waiting.head(SHOW_OPEN_TEXT).iter_rows(named=True):
        con.print(markup("  {pid}  {route:8s} routed in {vin}  age {age} d  reviews {n}", pid=r["pair_id"], route=r["route"],
                         vin=r["routed_in"], age=f"{r['age_days']:.1f}", n=r["reviews"]))
    if waiting.height > SHOW_OPEN_TEXT:
        con.print(f"  ... {waiting.height - SHOW_OPEN_TEXT:,} more (show --json lists up to {SHOW_OPEN_JSON:,})")


def _counted(by_reason: dict[str, int]) -> str:
    """``3 {'tie': 2, 'escalate': 1}``: a total and its breakdown, the breakdown left out when there is none."""
    total = f"{sum(by_reason.values()):,}"
    return f"{total} {by_reason}" if by_reason else total


def _print_version_summary(m) -> None:
    con = out_console()
    led = m.ledger
    con.print(f"ledger: rows in {led.rows_in:,} -> quarantined {led.quarantined:,}, judgments {led.judgments_valid:,}"
              f" (dropped {_counted(led.judgments_dropped)})")
    con.print(f"        pairs {led.pairs:,} = kept {led.pairs_kept:,} + routed {_counted(led.routed)}"
              f" + dropped {_counted(led.dropped)}")
    if led.reviews is not None:
        r = led.reviews
        con.print(f"reviews: {r.judgments:,} review judgments; routed pairs {r.routed_ever:,} -> exported {r.exported:,}"
                  f" -> reviewed {r.reviewed:,} -> resolved {r.resolved:,} ({r.resolved_by_reviews:,} by reviews,"
                  f" mode {r.mode}); open {r.open:,}")
    con.print("splits: " + ", ".join(f"{k} {v.rows:,}" for k, v in m.splits.items()))
    status_style = {"pass": "green", "warn": "yellow", "fail": "red"}
    con.print(Text("checks: ") + Text("  ").join(plain(f"{c.name}={c.status}", style=status_style.get(c.status, "white"))
                                              for c in m.checks))


@command()
def certify(
    version: Annotated[str, typer.Argument(help="Version id, unique prefix, or 'latest'.")],
    store: StoreOpt = Path("store"),
    policy: PolicyOpt = None,
    no_expectations: Annotated[bool, typer.Option("--no-expectations", help="Skip the Great Expectations suite (gate fails if the policy requires it).")] = False,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Take nothing from earlier certifications: hash every file and validate every part.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a version against the policy's certification gates.

    Parts unchanged since an earlier certification of this version or of its parent (same
    sha256, same inode, size and mtime) keep that certification's results; only the other
    parts are hashed and validated (--from-scratch: all of them).

    Writes certifications/VERSION.json beside the version (history kept; the version is
    never edited) and Great Expectations results + Data Docs under certifications/VERSION/.
    Exit 0 certified, 3 rejected (failing gates printed), 2 bad usage.
    """
    from pipeline.certify import certify_version

    pol = _load_policy_or_exit(policy)
    st = _open_store(store)
    h = _resolve_or_exit(st, version)
    with progress_for("certifying", None, unit="", enabled=not as_json):
        cert = certify_version(st, h.version_id, pol, run_gx=not no_expectations, reuse=not from_scratch)
    failing = [g.name for g in cert.gates if not g.passed]
    if as_json:
        # ok / exit_code on success too: a reader tests one key, as on a rejection (which _fail sets to false / 3)
        record = {**cert.model_dump(mode="json"), "record": str(st.certification_path(h.version_id)),
                  "ok": cert.verdict == "certified", "exit_code": EXIT_OK if cert.verdict == "certified" else EXIT_REJECTED}
        if cert.verdict != "certified":
            _fail(f"{h.version_id}: failing gates: {', '.join(failing)}", code=EXIT_REJECTED, label="REJECTED", payload=record)
        print(json.dumps(record, indent=2))
    else:
        con = out_console()
        for g in cert.gates:
            mark = plain("PASS", style="green") if g.passed else plain("FAIL", style="red")
            con.print(markup("  {mark} {g.name:34s} value {g.value!s:<12} threshold {g.threshold!s:<14} {g.detail}", mark=mark, g=g))
        if failing:
            con.print(markup("[bold red]REJECTED[/] {vid}: failing gates: {gates}", vid=h.version_id, gates=", ".join(failing)))
        else:
            con.print(markup("[bold green]CERTIFIED[/] {vid}", vid=h.version_id))
        con.print(f"record: {st.certification_path(h.version_id)}")
    raise typer.Exit(EXIT_OK if cert.verdict == "certified" else EXIT_REJECTED)


@command()
def versions(store: StoreOpt = Path("store"), as_json: JsonOpt = False,
             fast: Annotated[bool, typer.Option("--fast", help="Check certificate -> manifest only; do not hash the data files (nor read them for protected pairs).")] = False) -> None:
    """List versions: id, created, parent, pairs kept, certified?

    "certified" means the whole chain holds: a certified record for this version whose manifest
    sha256 (and signature, when signing is configured) verifies, that manifest being one the store
    published, every file matching the manifest, and no pair of a protected evaluation set in its
    train/validation splits (what `prefpipe train` checks).  Damaged versions are listed as DAMAGED."""
    from rich.table import Table

    from pipeline.store import DamagedVersion, VersionHandle

    st = _open_store(store)
    rows = []
    for e in st.list_versions():
        h = VersionHandle(st, e.version_id)
        damaged = e.damaged
        if not damaged:
            try:
                m = h.manifest()
            except DamagedVersion as err:  # (changed since the listing's cache took its stat)
                if not h.path.is_dir():  # removed (`prefpipe gc --apply`) since the listing: gone, not damaged
                    continue
                damaged = str(err)
        if damaged:
            rows.append({"version_id": e.version_id, "created_at": None, "parent": None, "pairs_kept": None,
                         "certified": False, "damaged": damaged, "trust": {"ok": False, "link": "manifest", "reason": damaged}})
            continue
        chain = st.trust(h, files=not fast, protections=not fast)
        if not chain.ok and not h.path.is_dir():  # (removed while its files were checked)
            continue
        rows.append({"version_id": e.version_id, "created_at": m.created_at.isoformat(timespec="seconds"), "parent": m.parent_version,
                     "pairs_kept": m.ledger.pairs_kept, "damaged": None,
                     # null: never certified; false: a record exists but the chain does not hold
                     "certified": chain.ok if st.certification_path(e.version_id).exists() else None,
                     "trust": {"ok": chain.ok, "link": chain.link, "reason": chain.reason}})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"versions in {store}")
    for col in ("version", "created", "parent", "pairs kept", "certified"):
        t.add_column(col)
    for r in rows:
        if r["damaged"]:
            t.add_row(plain(r["version_id"]), "-", "-", "-", "DAMAGED")  # a folder name: a line break in it shown as \n
            continue
        link = r["trust"]["link"]
        cert = ("yes" if r["certified"] else "-" if r["certified"] is None  # no record at all
                else {"verdict": "rejected", "protected": "no (protected pairs)"}.get(link, f"no ({link} changed)"))
        t.add_row(plain(r["version_id"]), r["created_at"], plain(r["parent"] or "-"), f"{r['pairs_kept']:,}", cert)
    out_console().print(t, markup=False)
    for r in rows:
        if r["damaged"] or (r["certified"] is not None and r["trust"]["link"] not in (None, "verdict")):
            err_console().print(markup("{vid}: {reason}", vid=r["version_id"], reason=r["trust"]["reason"]))


@command()
def show(version: Annotated[str, typer.Argument(help="Version id, unique prefix, or 'latest'.")],
         store: StoreOpt = Path("store"), as_json: JsonOpt = False) -> None:
    """Show a version: ledger, checks, splits, annotator summary, certification (verified: certificate -> manifest -> files)."""
    st = _open_store(store)
    h = _resolve_or_exit(st, version)
    m = h.manifest()
    chain = st.trust(h)
    trust = {"ok": chain.ok, "link": chain.link, "reason": chain.reason}
    import polars as pl

    from pipeline.reviews_resolve import open_reviews_of

    waiting = open_reviews_of(h)
    if as_json:
        listed = waiting.head(SHOW_OPEN_JSON).with_columns(routed_at=pl.col("routed_at").dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ"))
        print(json.dumps({**m.model_dump(mode="json"), "certification": chain.record if chain.record is not None
                          else _stored_certification(h), "trust": trust,
                          "path": str(h.path),
                          "open_reviews": {"total": waiting.height, "listed": listed.to_dicts(),
                                           "truncated": waiting.height > SHOW_OPEN_JSON,
                                           "age": "days since the version that routed the pair was created"}},
                         indent=2))
        return
    con = out_console()
    con.print(markup("[bold]{m.version_id}[/]  created {m.created_at:%Y-%m-%d %H:%M:%S}Z  parent {parent}  code {m.code_version}",
                     m=m, parent=m.parent_version or "-"))
    con.print(f"path: {h.path}")
    _print_version_summary(m)
    for c in m.checks:
        con.print(markup("  {name:16s} {status:5s} {summary}  {flags}", name=c.name, status=c.status,
                         summary=c.summary, flags=c.flag_counts or ""))
    _print_open_reviews(waiting)
    state = "CERTIFIED" if chain.ok else ("none yet" if not st.certification_path(h.version_id).exists()
                                          else f"NOT certified ({chain.link}): {chain.reason}")
    con.print(markup("certification: {state}", state=state))


def _stored_certification(h):
    """The latest certification record as stored; None when there is none or it is damaged (the
    chain's ``certificate`` link then says so: a damaged record is not a damaged version)."""
    from pipeline.store import StoreError

    try:
        return h.certification()
    except StoreError:
        return None


@command()
def diff(a: Annotated[str, typer.Argument(help="Older version.")], b: Annotated[str, typer.Argument(help="Newer version.")],
         store: StoreOpt = Path("store"), as_json: JsonOpt = False) -> None:
    """Compare two versions: pairs added/removed, label flips, split moves, policy changes, metric deltas.

    --json lists at most 1,000 pair ids per kind (label flips, split moves; `*_truncated` says when
    there are more: the counts are whole).  Exit 0, or 2 for an unknown id or a damaged version."""
    from pipeline.diff import diff_versions

    st = _open_store(store)
    d = diff_versions(_resolve_or_exit(st, a), _resolve_or_exit(st, b))
    if as_json:
        print(json.dumps(d, indent=2))
        return
    con = out_console()
    con.print(f"{d['a']} -> {d['b']}")
    pol = d["policy"]
    if pol["a"] != pol["b"]:
        con.print(markup("policy: {a} -> {b} ({n} settings differ)", a=pol["a"], b=pol["b"], n=len(pol["changed"])))
        for k, (x, y) in pol["changed"].items():
            con.print(markup("  {k:40s} {x} -> {y}", k=k, x=json.dumps(x), y=json.dumps(y)))
    if d["code_version"]:
        con.print(markup("code: {a} -> {b}", a=d["code_version"][0], b=d["code_version"][1]))
    con.print(f"pairs kept: +{d['pairs_added']} added, -{d['pairs_removed']} removed, {d['label_flips']} label flips, "
              f"{d['pairs_common']} in both")
    if d["label_flip_pair_ids"]:
        shown = d["label_flip_pair_ids"][:10]
        more = d["label_flips"] - len(shown)
        con.print(markup("label flipped: {ids}{more}", ids=", ".join(shown), more=f" (+{more} more)" if more else ""))
    if d["split_moves"]:
        con.print(f"split moves: {d['split_moves']} pairs", markup=False)
        for key, n in d["split_moves_by"].items():
            src, dst = key.split("->")
            con.print(markup("  {src} -> {dst}: {n}{note}, e.g. {ids}", src=src, dst=dst, n=n,
                             note=" (held-out pairs now in train)" if dst == "train" else "",
                             ids=", ".join(d["split_move_examples"][key])))
    for k, (x, y) in d["metrics"].items():
        con.print(markup("  {k:40s} {x!s:>12} -> {y!s:<12}", k=k, x=x, y=y))


@command()
def protect(
    version: Annotated[str, typer.Argument(help="Version id, unique prefix, or 'latest'.")],
    store: StoreOpt = Path("store"),
    split: Annotated[str, typer.Option("--split", help="The held-out split to protect: test or validation.")] = "test",
    as_json: JsonOpt = False,
) -> None:
    """Protect a version's test split as an evaluation set: no version may train on its pairs.

    Writes STORE/protected/VERSION-SPLIT.json (pair ids, their near-duplicate clusters, prompt
    hashes) and VERSION-SPLIT.signatures.npy (the prompts' MinHash signatures).  From then on the
    certify gate protected_contamination fails any version with one of those pairs, a member of
    their clusters, the same prompt or a near duplicate of one of those prompts in train or
    validation, and `prefpipe train` refuses such a version (exit 4) even with an older
    certificate.  Run it again on a protection made before signatures existed."""
    from pipeline.protect import protect_version

    st = _open_store(store)
    h = _resolve_or_exit(st, version)
    path, rec = protect_version(st, h.version_id, split)
    if as_json:
        print(json.dumps({"record": str(path), "version_id": rec.version_id, "split": rec.split,
                          "pairs": len(rec.pair_ids), "clusters": len(rec.clusters), "prompts": len(rec.prompt_hashes)}))
        return
    out_console().print(plain(f"protected {rec.version_id}/{rec.split}: {len(rec.pair_ids)} pairs, {len(rec.clusters)} "
                              f"clusters, {len(rec.prompt_hashes)} prompts -> {path}"))


@command()
def gc(
    store: StoreOpt = Path("store"),
    delete: Annotated[list[str] | None, typer.Option("--delete", help="Delete this version (repeatable); its parts shared with other versions stay.")] = None,
    keep_last: Annotated[int | None, typer.Option("--keep-last", min=1, help="Delete every version except the N newest and every certified one.")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Remove what is listed (default: dry run, nothing removed).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Garbage-collect the store: parts no version links, staging dirs of dead writers, and (with
    --delete / --keep-last) whole versions.  A dry run unless --apply.

    Parts are shared between versions (hard links into STORE/objects/): deleting a version frees
    only the parts no other version uses.  A version in use -- the parent a running curate builds on,
    a version (and its parent) a running certify reads, the version a running `review export` reads or a running
    `prefpipe train` trains on -- is kept and listed as in use.  Certification records of deleted versions are kept aside
    as VERSION.json.deleted-<time>, their folders (Great Expectations results, part facts) as VERSION.deleted-<time>."""
    from pipeline.parts import collect_garbage, plan_gc

    st = _open_store(store)
    doomed = list(delete or [])
    for ref in doomed:
        _resolve_or_exit(st, ref)
    doomed = [st.resolve(r).version_id for r in doomed]
    if keep_last is not None:
        ids = st.list_ids()
        keep = set(ids[-keep_last:]) | {v for v in ids if st.get(v).verify_chain(files=False).ok}
        doomed += [v for v in ids if v not in keep]
    plan = plan_gc(st, delete_versions=doomed)
    if apply:  # what was removed: a version a curate or a training took into use since the plan stays, with its parts
        plan = collect_garbage(st, plan)
    summary = {"applied": apply, "versions": plan.versions, "objects": len(plan.objects), "object_bytes": plan.bytes,
               "staging": [d.name for d in plan.staging], "work": [d.name for d in plan.work], "in_use": plan.in_use}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    con = out_console()
    verb = "removed" if apply else "would remove (dry run; --apply to remove)"
    con.print(markup("{verb}: {nv} version(s) {vs}, {no} unreferenced part(s) ({mb} MB), {ns} staging dir(s), "
                     "{nw} work dir(s) of partitioned builds",
                     verb=verb, nv=len(plan.versions), vs=", ".join(plan.versions) or "", no=len(plan.objects),
                     mb=f"{plan.bytes / 1e6:,.1f}", ns=len(plan.staging), nw=len(plan.work)))
    if plan.in_use:
        con.print(markup("kept (in use: a running curate builds on it, a certify, a review export or a training reads "
                         "it; run gc again once it is done): {vs}", vs=", ".join(plan.in_use)))


@command()
def serve(
    inbox: Annotated[Path, typer.Option("--inbox", help="Directory where new batch files arrive (each finished file gets a FILE.done marker).")],
    store: StoreOpt = Path("store"),
    policy: PolicyOpt = None,
    cron: Annotated[str | None, typer.Option("--cron", help='Cron schedule, e.g. "*/15 * * * *".')] = None,
    interval: Annotated[int | None, typer.Option("--interval", help="Run every N seconds (instead of --cron).")] = None,
    train_model: Annotated[str | None, typer.Option("--train-model", help="Model for training after certification (if the policy enables it).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Process the inbox once now (as a schedule tick would) and exit.")] = False,
    port: Annotated[int, typer.Option("--port", help="Port of the local Prefect server (UI) started when PREFECT_API_URL is not set.")] = 4200,
) -> None:
    """Serve the inbox deployment on a schedule with Prefect (`serve`); see runs in the Prefect UI.

    With PREFECT_API_URL set, the deployment is served against that server.  Without it, a
    local Prefect server with the UI is started on 127.0.0.1:PORT (or one already running there
    is reused), because Prefect's temporary server does not run the scheduler.  `--once`
    processes the inbox a single time on Prefect's temporary server and exits.
    """
    if not once and not cron and not interval:
        _fail_usage("give --cron, --interval or --once")
    if not inbox.is_dir():
        _fail_usage(f"inbox {inbox} is not a directory")
    # the flow loads the file again at the start of every run (an edit takes effect on the next tick);
    # a file that cannot be used is refused here, not found out by every scheduled run failing
    _load_policy_or_exit(policy)
    params = {"inbox": str(inbox.resolve()), "store": str(store.resolve()),
              "policy_path": str(policy.resolve()) if policy else None, "train_model": train_model}
    if once:
        from flows.flows import process_inbox

        try:
            outcomes = process_inbox(**params)
        except Exception as err:  # the flow run failed visibly; say why and exit non-zero
            _fail(str(err), code=1, label="inbox run failed")
        for o in outcomes:
            out_console().print(o)
        return
    import contextlib
    import os

    from flows.server import local_server

    ctx = contextlib.nullcontext(os.environ["PREFECT_API_URL"]) if os.environ.get("PREFECT_API_URL") else \
        local_server(port, log_path=store.resolve() / "logs" / f"prefect-server-{port}.log")
    if not os.environ.get("PREFECT_API_URL"):
        err_console().print(f"starting a local Prefect server on 127.0.0.1:{port} (PREFECT_API_URL is not set)...")
    with ctx as api:  # prefect is imported only now, so that it reads PREFECT_API_URL
        from prefect import serve as prefect_serve

        from flows.flows import process_inbox, train_on_version

        dep = process_inbox.to_deployment(name="prefpipe-inbox", parameters=params, cron=cron, interval=interval)
        # on demand (no schedule): "Run" in the UI, or `prefect deployment run train-on-version/prefpipe-train
        # -p version=V`; refuses a version whose certificate -> manifest -> files chain does not verify
        train_dep = train_on_version.to_deployment(
            name="prefpipe-train", parameters={"store": params["store"], "version": "latest",
                                               "model": train_model or "tiny-llama", "max_steps": 50},
            description="DPO training on a certified dataset version; publishes the run and its evaluation report")
        ui = api.removesuffix("/api")
        err_console().print(plain(f"serving process-inbox/prefpipe-inbox ({'cron ' + cron if cron else f'every {interval}s'}) "
                                  f"and train-on-version/prefpipe-train (on demand) on {api}; runs in the UI at "
                                  f"{ui}/runs; Ctrl-C to stop"))
        prefect_serve(dep, train_dep)


from flows.train_cmd import train as _train  # noqa: E402  (registered here; the command lives in its own module)

app.command(name="train")(guarded(_train))


@policy_app.command("show")
@guarded
def policy_show(
    policy: PolicyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the effective policy (defaults merged with --policy, every reason's action filled in) as TOML or JSON."""
    pol = _load_policy_or_exit(policy)
    data = pol.model_dump(mode="json")
    if as_json:
        print(json.dumps({"policy_hash": pol.policy_hash(), "policy": data}, indent=2))
        return
    print(f"# effective prefpipe policy (hash {pol.policy_hash()}; source: {policy or 'built-in defaults'})")
    print(policy_toml(pol))


@policy_app.command("reasons")
@guarded
def policy_reasons(as_json: JsonOpt = False) -> None:
    """List every reason code the checks declare: subject, check, default action, allowed actions, meaning.

    This is the table of docs/policy.md ("Reasons"); set an action with select.flag_actions.REASON."""
    from pipeline.checks import CHECKS, REASONS, reasons_table

    if as_json:
        owner = {r.code: c.name for c in CHECKS for r in c.reasons}
        print(json.dumps([{"reason": code, "subject": r.subject, "check": owner[code], "default_action": r.default_action,
                           "actions": list(r.actions), "precedence": r.precedence if r.subject == "pair" else None,
                           "meaning": r.doc} for code, r in sorted(REASONS.items())], indent=2))
        return
    print(reasons_table())


def policy_toml(model, prefix: str = "") -> str:
    """A policy as TOML with each key's description as a comment (scalars first, then sections)."""
    from pydantic import BaseModel

    lines: list[str] = []
    doc = (type(model).__doc__ or "").strip().splitlines()
    if prefix and doc:
        lines.append(f"# {doc[0]}")
    fields = type(model).model_fields
    nested, tables = [], []
    for name, info in fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            nested.append((name, value))
            continue
        if isinstance(value, tuple) and value and all(isinstance(v, BaseModel) for v in value):
            tables.append((name, value))  # an array of tables (the annotator registry's entries)
            continue
        if info.description:
            lines.append(f"# {info.description}")
        if value is None:  # TOML has no null: an unset optional key stays a comment
            lines.append(f"# {name} = (not set)")
            continue
        dumped = value if not isinstance(value, tuple) else list(value)
        if isinstance(dumped, dict):
            body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in dumped.items())
            lines.append(f"{name} = {{ {body} }}")
        else:
            lines.append(f"{name} = {json.dumps(dumped, ensure_ascii=False)}")
    for name, value in nested:
        section = f"{prefix}.{name}" if prefix else name
        lines.append(f"\n[{section}]")
        lines.append(policy_toml(value, section))
    for name, items in tables:
        for item in items:
            lines.append(f"\n[[{prefix}.{name}]]" if prefix else f"\n[[{name}]]")
            lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in item.model_dump(mode="json").items() if v is not None]
    return "\n".join(lines)


review_app = typer.Typer(help="Send routed pairs to human review and take the answers back (JSONL, Label Studio, Argilla).",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")
ReviewFormatOpt = Annotated[str, typer.Option("--format", "-f", help="jsonl, label-studio or argilla.", show_default=False)]


@review_app.command("export")
@guarded
def review_export(
    version: Annotated[str, typer.Argument(help="Version id, unique prefix, or 'latest'.")],
    fmt: ReviewFormatOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="jsonl: the tasks file; label-studio: the tasks JSON (the labeling "
                                      "config goes beside it as .xml); argilla: a new directory (Dataset.to_disk layout).",
                                      show_default=False)],
    store: StoreOpt = Path("store"),
    reasons: Annotated[str | None, typer.Option("--reasons", help="Routing reasons to export, comma-separated "
                                                "(tie, both_bad, escalate, low_agreement, ambiguous); default: all.")] = None,
    dimensions: Annotated[str | None, typer.Option("--dimensions", help="Rubric dimensions to ask about, comma-separated, "
                                                   "e.g. helpfulness,harmlessness (label-studio, argilla).")] = None,
    dataset_name: Annotated[str | None, typer.Option("--dataset-name", help="argilla: the dataset to create "
                                                     "(default prefpipe-review-VERSION).")] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", help="argilla: the workspace (default: ARGILLA_WORKSPACE "
                                                  "or the server's default).")] = None,
    no_push: Annotated[bool, typer.Option("--no-push", help="argilla: write to disk only, even with ARGILLA_API_URL "
                                          "and ARGILLA_API_KEY set.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a version's routed pairs as review tasks, each shown in a randomized (recorded) order.

    Prints the written path(s) last on stdout.  Exit 0 written; 2 unknown version, format, reason or
    dimension, or an Argilla push that failed (nothing written)."""
    from pipeline.review import PushError, check_format, export_review, parse_dimensions
    from pipeline.review.tasks import parse_reasons

    try:
        check_format(fmt)
        asked, dims = parse_reasons(reasons), parse_dimensions(dimensions)
    except ValueError as err:
        _fail_usage(str(err))
    st = _open_store(store)
    h = _resolve_or_exit(st, version)
    try:
        res = export_review(st, h.version_id, fmt=fmt, out=out, reasons=asked, dimensions=dims,
                            dataset_name=dataset_name, workspace=workspace, push=not no_push)
    except PushError as err:
        _fail_usage(f"{err} (nothing written)")
    if as_json:
        print(json_text({"version_id": res.version_id, "format": res.fmt, "tasks": res.tasks, "by_reason": res.by_reason,
                         "reasons": list(asked), "dimensions": list(dims), "files": [str(p) for p in res.files],
                         "pushed": res.pushed}, indent=2))
        return
    by = ", ".join(f"{k} {v}" for k, v in res.by_reason.items()) or "none routed for " + ", ".join(asked)
    err_console().print(markup("exported {n} review tasks of {vid} ({by}) as {fmt}", n=res.tasks, vid=res.version_id, by=by, fmt=fmt))
    if res.pushed:
        err_console().print(markup("pushed to Argilla as dataset {name}", name=dataset_name or f"prefpipe-review-{res.version_id}"))
    for p in res.files:
        out_console().print(plain(p))


@review_app.command("import")
@guarded
def review_import(
    file: Annotated[Path, typer.Argument(help="The review tool's export (argilla: a JSON/JSONL file or a to_disk directory).",
                                         show_default=False)],
    fmt: ReviewFormatOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="The batch of judgments to write (JSON Lines).", show_default=False)],
    store: Annotated[Path | None, typer.Option("--store", "-s", help="Check every task against the routed pairs of this "
                                               "store (on when given).", envvar="PREFPIPE_STORE")] = None,
    version: Annotated[str | None, typer.Option("--version", help="With --store: every task must belong to this version "
                                                "(default: the version each task names).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn a review tool's export into canonical judgments with review_of set.

    Prints the ledger (items in = judgments out + skipped by reason) and the batch path last.
    Exit 0 written; 2 unreadable, not an export of that tool, or a task that does not match what
    was exported or routed (the message names the file, the task and the field; nothing written)."""
    from pipeline.review import check_format, import_review

    try:
        check_format(fmt)
    except ValueError as err:
        _fail_usage(str(err))
    if version and store is None:
        _fail_usage("--version needs --store (the store whose routed pairs the reviews are checked against)")
    st = _open_store(store) if store is not None else None
    if st is not None and version:
        _resolve_or_exit(st, version)
    res = import_review(file, fmt=fmt, out=out, store=st, version=version)
    led = res.ledger
    if as_json:
        print(json_text({"file": str(file), "format": fmt, "out": str(out), "ledger": led.model_dump(),
                         "checked_against": res.checked_against}, indent=2))
        return
    con = out_console()
    con.print(markup("review import {file} ({fmt}): {tasks} tasks", file=file, fmt=fmt, tasks=led.tasks_in))
    skipped = ", ".join(f"{k} {v}" for k, v in led.skipped.items())
    con.print(markup("items in {n} = judgments out {j} + skipped {s}{detail}", n=led.items_in, j=led.judgments_out,
                     s=sum(led.skipped.values()), detail=f" ({skipped})" if skipped else ""))
    con.print(markup("checked against {where}", where=res.checked_against) if res.checked_against else
              markup("[yellow]not checked against a store[/] (texts checked against the hashes recorded at export; "
                     "give --store to check the routed pairs)"))
    con.print(plain(out))


def _reflowed(doc: str) -> str:
    """A command's docstring as its ``--help`` shows it: each paragraph's lines joined into one (Typer's
    rich mode keeps a docstring's line breaks, so prose wrapped at the source's width came out ragged at
    any other), "Exit ..." sentences a paragraph of their own, and list items ("- ") kept on their lines."""
    out: list[str] = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines: list[str] = []
        for line in para.splitlines():
            line = line.strip()
            if line.startswith("Exit ") and lines:
                out.append(" ".join(lines))
                lines = []
            if line.startswith("- ") and lines:
                lines[-1] += "\n"
            lines.append(line)
        out.append(" ".join(lines).replace("\n ", "\n"))
    return "\n\n".join(out)


class _JsonUsageErrors(typer.core.TyperCommand):
    """A command taking --json whose usage errors (an unknown option, a bad or missing value: exit 2,
    found by click before the command runs) print the JSON failure document on stdout too when
    the command was given the --json flag, as its other failures do (:func:`_fail`); click still
    shows the message on stderr."""

    def make_context(self, info_name, args, parent=None, **extra):
        given = list(args)  # (click's parser consumes the list it is handed)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.TyperException as err:  # (click's UsageError, BadParameter, ... as Typer ships them)
            if self._json_flag_given(info_name, given, parent):
                param = getattr(err, "param", None)
                _print_failure({"ok": False, "exit_code": err.exit_code, "error": err.format_message(), "file": None,
                                "line": None, "field": (param.opts or [param.name])[0] if param is not None else None})
            raise

    def _json_flag_given(self, info_name, args: list[str], parent) -> bool:
        """Whether click's own parser takes the --json flag from ``args`` -- not ``--json`` as another
        option's value (``--batch-id --json``) nor after ``--``.  The arguments are parsed again leniently
        (unknown options passed over, the parse ending without an error where it fails), so a --json
        beside an unknown option still counts."""
        ctx = self.context_class(self, info_name=info_name, parent=parent, resilient_parsing=True,
                                 ignore_unknown_options=True)
        opts, _, _ = self.make_parser(ctx).parse_args(args=args)
        return opts.get("as_json") is True


def _commands(typer_app: typer.Typer) -> Iterator[Any]:
    """Every command registered on ``typer_app`` and its groups (Typer's ``CommandInfo``)."""
    yield from typer_app.registered_commands
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            yield from _commands(group.typer_instance)


for _info in _commands(app):
    if _info.callback is not None:
        if _info.callback.__doc__ and _info.help is None:
            _info.help = _reflowed(_info.callback.__doc__)
        if "as_json" in inspect.signature(_info.callback).parameters:
            _info.cls = _JsonUsageErrors


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
