"""The `prefpipe` command line (Typer).  Wiring only: the logic lives in `pipeline/`.

Exit codes (every command):
  0  success (validate: every row valid; certify: certified)
  1  validate: some rows were quarantined (the report says which)
  2  bad usage, or an input file / policy that cannot be used as a whole (nothing written)
  3  certify: the version was rejected
  4  train: the version is not certified or its files do not match the manifest
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.console import err_console, out_console, progress_for

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

FilesArg = Annotated[list[Path], typer.Argument(help="Raw batch files: .jsonl, .jsonl.gz, .parquet or .csv.", show_default=False)]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="Force the record format: canonical, trl, hh or rated (default: auto-detect per file)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
PolicyOpt = Annotated[Path | None, typer.Option("--policy", "-p", help="Policy file (.toml/.yaml); default: built-in defaults.")]


def _fail_usage(message: str) -> None:
    err_console().print(f"[bold red]error:[/] {message}")
    raise typer.Exit(EXIT_USAGE)


@app.command()
def validate(
    files: FilesArg,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    max_errors: Annotated[int, typer.Option("--max-errors", help="How many quarantined rows to print.")] = 20,
    annotator_id: Annotated[str | None, typer.Option(help="annotator_id for formats without one (trl, hh, rated).")] = None,
    annotator_kind: Annotated[str | None, typer.Option(help="annotator_kind (human|ai) for formats without one.")] = None,
) -> None:
    """Read and validate raw batch files; print the ledger and the first errors with line numbers.

    Nothing is written.  Exit 0 when every row is valid, 1 when rows were quarantined,
    2 when a file cannot be read at all.
    """
    from pipeline.ingest import UnreadableFile, ingest_files

    total_bytes = sum(p.stat().st_size for p in files if p.exists())
    try:
        with progress_for("validating", total_bytes, unit="bytes", enabled=not as_json) as advance:
            sizes = {}

            def on_rows(n: int) -> None:  # approximate byte progress from rows
                sizes["rows"] = sizes.get("rows", 0) + n
                advance(n)

            result = ingest_files(files, fmt=fmt, keep_judgments=False, on_progress=on_rows,
                                  annotator_id=annotator_id, annotator_kind=annotator_kind)
    except UnreadableFile as err:
        if as_json:
            print(json.dumps({"ok": False, "error": str(err), "file": err.path}))
            raise typer.Exit(EXIT_USAGE) from None
        _fail_usage(f"cannot read {err.path}: {err.why}")
    q = result.quarantine
    if as_json:
        payload = {
            "ok": result.ledger.quarantined == 0,
            "ledger": result.ledger.model_dump(),
            "sources": [s.model_dump() for s in result.sources],
            "errors": q.select("source_file", "line", "reason", "field", "error").head(max_errors).to_dicts(),
        }
        print(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        _print_ledger(result)
        if q.height:
            con = out_console()
            con.print(f"\n[bold]First {min(max_errors, q.height)} of {q.height} quarantined rows:[/]")
            for r in q.head(max_errors).iter_rows(named=True):
                con.print(f"  {r['source_file']}:{r['line']}  [yellow]{r['reason']}[/]  {r['error']}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_QUARANTINE if result.ledger.quarantined else EXIT_OK)


def _print_ledger(result) -> None:
    from rich.table import Table

    con = out_console()
    t = Table(title="Ingest ledger", show_lines=False)
    for col in ("file", "format", "rows in", "valid", "quarantined", "judgments"):
        t.add_column(col, justify="left" if col in ("file", "format") else "right")
    for s in result.sources:
        t.add_row(s.path, s.format, f"{s.rows_in:,}", f"{s.rows_valid:,}", f"{s.quarantined:,}", f"{s.judgments:,}")
    led = result.ledger
    t.add_row("[bold]total[/]", "", f"{led.rows_in:,}", f"{led.rows_valid:,}", f"{led.quarantined:,}", f"{led.judgments:,}")
    con.print(t)
    con.print(f"rows in {led.rows_in:,} = valid {led.rows_valid:,} + quarantined {led.quarantined:,}"
              + (f"  (quarantined by reason: {led.quarantined_by_reason})" if led.quarantined else ""), highlight=False)
    if led.skipped:
        con.print(f"candidate pairs not formed: {led.skipped}", highlight=False)


@policy_app.command("show")
def policy_show(
    policy: PolicyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the effective policy (defaults merged with --policy) as TOML-like text or JSON."""
    from schemas.policy import PolicyError, load_policy

    try:
        pol = load_policy(policy)
    except PolicyError as err:
        _fail_usage(str(err))
    data = pol.model_dump(mode="json")
    if as_json:
        print(json.dumps({"policy_hash": pol.policy_hash(), "policy": data}, indent=2))
        return
    print(f"# effective policy  (hash {pol.policy_hash()}; source: {policy or 'built-in defaults'})")
    _print_toml(data)


def _print_toml(data: dict, prefix: str = "") -> None:
    """Print a nested dict as TOML: scalars first, then one [section] per nested dict."""
    for k, v in data.items():
        if not isinstance(v, dict):
            print(f"{k} = {json.dumps(v, ensure_ascii=False)}")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            print(f"\n[{name}]")
            _print_toml(v, name)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
