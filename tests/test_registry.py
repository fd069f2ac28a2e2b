"""The annotator registry: file formats and their errors, the registry check's three reasons, the
version id and manifest binding, and the certify gate on qualified human overlap per locale."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, canonical, write_jsonl
from typer.testing import CliRunner

from flows.cli import app
from pipeline.certify import certify_version
from pipeline.checks import registry as check
from pipeline.curate import curate
from pipeline.ingest import ingest_files
from pipeline.store import Store
from schemas.policy import Policy, PolicyError, load_policy
from schemas.registry import AnnotatorRegistry, RegistryError, load_registry

SAMPLES = ROOT / "data" / "samples"
PLANTED = json.loads((SAMPLES / "answer_key" / "planted.json").read_text(encoding="utf-8"))["registry"]
runner = CliRunner()

HEADER = "annotator_id,annotator_kind,locales,rubrics,qualified_from,qualified_until\n"
REGISTRY_CSV = HEADER + (
    "rev-01,human,en,helpful-v3,,\n"
    "rev-02,human,en;ja,,,\n"
    "rev-ja,human,ja,,,\n"
    "rev-jajp,human,ja-JP,,,\n"
    "rev-old,human,,,2026-11-10,2026-11-19\n"
    "judge-x,ai,,,,\n"
)
REGISTRY_TOML = """# the same registry as REGISTRY_CSV, in another order and spelling
[[annotator]]
annotator_id = "judge-x"
annotator_kind = "ai"

[[annotator]]
annotator_id = "rev-old"
annotator_kind = "human"
qualified_from = 2026-11-10
qualified_until = "2026-11-19"

[[annotator]]
annotator_id = "rev-jajp"
annotator_kind = "human"
locales = ["ja_jp"]

[[annotator]]
annotator_id = "rev-ja"
annotator_kind = "human"
locales = "ja"

[[annotator]]
annotator_id = "rev-02"
annotator_kind = "human"
locales = ["ja", "en"]

[[annotator]]
annotator_id = "rev-01"
annotator_kind = "human"
locales = "en"
rubrics = ["helpful-v3"]
"""


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- the file formats
def test_csv_and_toml_of_the_same_content_are_the_same_registry(tmp_path):
    a = load_registry(_write(tmp_path / "r.csv", REGISTRY_CSV))
    b = load_registry(_write(tmp_path / "r.toml", REGISTRY_TOML))
    assert a == b and a.sha256() == b.sha256()
    assert [e.annotator_id for e in a.annotator] == sorted(e.annotator_id for e in a.annotator)
    assert a.model_dump(mode="json")["annotator"][-1] == {  # canonical: sorted, BCP 47 case, ISO dates
        "annotator_id": "rev-old", "annotator_kind": "human", "locales": [], "rubrics": [],
        "qualified_from": "2026-11-10", "qualified_until": "2026-11-19"}
    assert next(e for e in a.annotator if e.annotator_id == "rev-jajp").locales == ("ja-JP",)
    # the flows pass the policy between tasks as JSON: the registry survives it
    assert Policy.model_validate_json(Policy(annotators=a).model_dump_json()) == Policy(annotators=a)
    # a byte order mark (spreadsheet exports) is fine; so are blank lines and padded cells
    c = load_registry(_write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + REGISTRY_CSV.replace(",en,", ", en ,").encode() + b"\n\n"))
    assert c.sha256() == a.sha256()


BAD = {  # name: (suffix, content, (line, field, words in the message))
    "duplicate id": (".csv", HEADER + "rev-01,human,,,,\nrev-02,ai,,,,\nrev-01,ai,,,,\n",
                     (4, "annotator_id", "duplicate id 'rev-01' (first at line 2)")),
    "unknown kind": (".csv", HEADER + "rev-01,robot,,,,\n", (2, "annotator_kind", "expected 'human' or 'ai', found 'robot'")),
    "kind unknown is no registry kind": (".csv", HEADER + "rev-01,unknown,,,,\n", (2, "annotator_kind", "'unknown'")),
    "bad date": (".csv", HEADER + "rev-01,human,,,2026-02-30,\n", (2, "qualified_from", "ISO date")),
    "date with a time": (".csv", HEADER + "rev-01,human,,,,2026-02-03T10:00:00\n", (2, "qualified_until", "ISO date")),
    "window backwards": (".csv", HEADER + "rev-01,human,,,2026-03-01,2026-02-01\n",
                         (2, "qualified_until", "before qualified_from 2026-03-01")),
    "markup in an id": (".csv", HEADER + "ok-1,human,,,,\n[bold red]boss,human,,,,\n", (3, "annotator_id", "'[bold red]boss'")),
    "path in an id": (".csv", HEADER + "../../etc,human,,,,\n", (2, "annotator_id", "'../../etc'")),
    "markup in a rubric": (".csv", HEADER + "rev-01,human,,[link=x]r,,\n", (2, "rubrics", "'[link=x]r'")),
    "bad locale": (".csv", HEADER + "rev-01,human,en;english!,,,\n", (2, "locales", "'english!'")),
    "unknown column": (".csv", "annotator_id,annotator_kind,locale\nrev-01,human,ja\n", (1, "locale", "unknown column")),
    "missing kind column": (".csv", "annotator_id,locales\nrev-01,ja\n", (1, "annotator_kind", "required column")),
    "missing id": (".csv", HEADER + ",human,,,,\n", (2, "annotator_id", "required")),
    "too many fields": (".csv", HEADER + "rev-01,human,,,,,extra\n", (2, "(row)", "7 fields")),
    "not UTF-8": (".csv", HEADER.encode() + b"rev-01,human,ja,\xff\xfe,,\n", (2, "rubrics", "not UTF-8")),
    "header only": (".csv", HEADER, (None, "", "no annotators")),
    "toml unknown key": (".toml", '[[annotator]]\nannotator_id = "a"\nannotator_kind = "human"\nlocale = "ja"\n',
                         (4, "locale", "unknown field")),
    "toml duplicate": (".toml", '[[annotator]]\nannotator_id = "a"\nannotator_kind = "ai"\n\n[[annotator]]\n'
                       'annotator_id = "a"\nannotator_kind = "ai"\n', (6, "annotator_id", "duplicate id 'a' (first at line 2)")),
    "toml kind": (".toml", '[[annotator]]\nannotator_id = "a"\n\nannotator_kind = "Human"\n', (4, "annotator_kind", "'Human'")),
    "toml datetime": (".toml", '[[annotator]]\nannotator_id = "a"\nannotator_kind = "ai"\nqualified_until = 2026-01-01T00:00:00\n',
                      (4, "qualified_until", "ISO date")),
    "toml number as id": (".toml", '[[annotator]]\nannotator_id = 7\nannotator_kind = "ai"\n', (2, "annotator_id", "expected a string, found 7")),
    "toml syntax": (".toml", '[[annotator]]\nannotator_id = "a\n', (2, "(syntax)", "not valid TOML")),
    "toml top-level key": (".toml", 'version = 2\n[[annotator]]\nannotator_id = "a"\nannotator_kind = "ai"\n',
                           (1, "version", "unknown top-level key")),
    "not UTF-8 toml": (".toml", b'[[annotator]]\nannotator_id = "a\xe9"\nannotator_kind = "ai"\n', (2, "annotator_id", "not UTF-8")),
    "wrong suffix": (".json", "[]", (None, "", "expected a .csv or .toml file")),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_registry_names_the_file_the_line_and_the_field(tmp_path, name):
    suffix, content, (line, field, words) = BAD[name]
    path = _write(tmp_path / f"annotators{suffix}", content)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    err = info.value
    assert err.path == str(path)
    assert any(ln == line and f == field and words in msg for ln, f, msg in err.problems), err.problems
    where = f"line {line}, field {field}: " if line else f"field {field}: " if field else "  "
    assert str(path) in str(err) and where in str(err)


@pytest.mark.parametrize("name", ["duplicate id", "unknown kind", "markup in an id", "path in an id", "not UTF-8", "toml syntax"])
@pytest.mark.parametrize("command", ["validate", "curate"])
def test_the_cli_exits_2_on_a_bad_registry_and_writes_nothing(tmp_path, make_jsonl, name, command):
    suffix, content, (line, field, _words) = BAD[name]
    reg = _write(tmp_path / f"annotators{suffix}", content)
    batch = make_jsonl([canonical(i) for i in range(3)])
    store = tmp_path / "store"
    args = [command, str(batch), "--annotators", str(reg)] + (["--store", str(store)] if command == "curate" else [])
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    out = " ".join(res.output.split())  # the console wraps long lines
    assert "annotator registry" in out and str(reg.name) in out and f"line {line}, field {field}" in out
    assert not (store / "versions").exists() or not any((store / "versions").iterdir())


def test_validate_json_reports_a_bad_registry_as_json(tmp_path, make_jsonl):
    reg = _write(tmp_path / "r.csv", HEADER + "rev-01,robot,,,,\n")
    res = runner.invoke(app, ["validate", str(make_jsonl([canonical(0)])), "--annotators", str(reg), "--json"])
    assert res.exit_code == 2
    payload = json.loads(res.stdout)
    assert payload["ok"] is False and payload["file"] == str(reg)
    assert payload["problems"] == [{"line": 2, "field": "annotator_kind", "error": "expected 'human' or 'ai', found 'robot'"}]


def test_the_policy_key_is_read_relative_to_the_policy_file_and_errors_name_it(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    _write(tmp_path / "conf" / "team.csv", REGISTRY_CSV)
    pol = _write(tmp_path / "conf" / "policy.toml", 'annotators = "team.csv"\n')
    monkeypatch.chdir(tmp_path)  # not the policy's folder
    p = load_policy(pol)
    assert p.annotators == load_registry(tmp_path / "conf" / "team.csv")
    assert p.policy_hash() != Policy().policy_hash()
    _write(tmp_path / "conf" / "team.csv", HEADER + "rev-01,human,,,,\nrev-01,ai,,,,\n")
    with pytest.raises(PolicyError, match=r"(?s)annotators = 'team.csv'.*team.csv.*line 3, field annotator_id: duplicate id"):
        load_policy(pol)
    res = runner.invoke(app, ["policy", "show", "--policy", str(pol)])
    assert res.exit_code == 2 and "duplicate id" in res.output and "Traceback" not in res.output


def test_policy_show_prints_the_registry_as_tables_that_load_back(tmp_path):
    _write(tmp_path / "team.csv", REGISTRY_CSV)
    pol = _write(tmp_path / "policy.toml", 'annotators = "team.csv"\n')
    res = runner.invoke(app, ["policy", "show", "--policy", str(pol)])
    assert res.exit_code == 0 and "[[annotators.annotator]]" in res.stdout
    printed = _write(tmp_path / "printed.toml", res.stdout)
    from pipeline.checks import resolve_policy

    assert resolve_policy(load_policy(printed)).policy_hash() == resolve_policy(load_policy(pol)).policy_hash()


# ----------------------------------------------------------------------------- the check
def _judgments(tmp_path: Path, rows: list[dict]) -> pl.DataFrame:
    return ingest_files([write_jsonl(tmp_path / "j.jsonl", rows)]).judgments


PLANTED_ROWS = {  # comparison id -> (fields, expected reason or None)
    "ok-en": ({"annotator_id": "rev-01", "rubric": "helpful-v3"}, None),
    "ghost": ({"annotator_id": "ghost-9"}, "unknown_annotator"),
    "ai-says-human": ({"annotator_id": "judge-x", "annotator_kind": "human"}, "kind_mismatch"),
    "kind-not-said": ({"annotator_id": "rev-01", "annotator_kind": "unknown"}, "kind_mismatch"),
    "human-says-ai": ({"annotator_id": "rev-02", "annotator_kind": "ai"}, "kind_mismatch"),
    "ja-judges-en": ({"annotator_id": "rev-ja", "locale": "en"}, "unqualified_reviewer"),
    "ja-covers-ja-JP": ({"annotator_id": "rev-ja", "locale": "ja-JP"}, None),
    "ja-covers-ja_jp": ({"annotator_id": "rev-ja", "locale": "ja_jp"}, None),
    "ja-JP-not-ja": ({"annotator_id": "rev-jajp", "locale": "ja"}, "unqualified_reviewer"),
    "ja-JP-not-jav": ({"annotator_id": "rev-ja", "locale": "jav"}, "unqualified_reviewer"),  # ja is no prefix of jav
    "no-locale": ({"annotator_id": "rev-ja", "locale": None}, None),
    "other-rubric": ({"annotator_id": "rev-01", "rubric": "harmless-v2"}, "unqualified_reviewer"),
    "no-rubric": ({"annotator_id": "rev-01"}, None),
    "any-rubric": ({"annotator_id": "rev-02", "rubric": "anything"}, None),
    "expired": ({"annotator_id": "rev-old", "created_at": "2026-11-20T00:00:00Z"}, "unqualified_reviewer"),
    "last-day": ({"annotator_id": "rev-old", "created_at": "2026-11-19T23:59:59Z"}, None),
    "last-day-tokyo": ({"annotator_id": "rev-old", "created_at": "2026-11-20T08:00:00+09:00"}, None),  # 19th in UTC
    "first-day": ({"annotator_id": "rev-old", "created_at": "2026-11-10T00:00:00Z"}, None),
    "too-early": ({"annotator_id": "rev-old", "created_at": "2026-11-09T23:59:59Z"}, "unqualified_reviewer"),
    "no-date": ({"annotator_id": "rev-old", "created_at": None}, None),
    "everything-wrong": ({"annotator_id": "rev-01", "locale": "ja", "rubric": "x", "created_at": "2020-01-01T00:00:00Z"},
                         "unqualified_reviewer"),
}


def _planted_rows() -> list[dict]:
    return [canonical(i, comparison_id=cid, **{k: (v if v is not None else ...) for k, v in f.items()})
            for i, (cid, (f, _)) in enumerate(PLANTED_ROWS.items())]


@pytest.fixture
def registry(tmp_path) -> AnnotatorRegistry:
    return load_registry(_write(tmp_path / "r.csv", REGISTRY_CSV))


def test_each_reason_is_found_exactly_on_the_planted_judgments(tmp_path, registry):
    res = check.run(_judgments(tmp_path, _planted_rows()), None, registry=registry)
    got = dict(res.flags.select("subject_id", "reason").iter_rows())
    assert got == {cid: why for cid, (_, why) in PLANTED_ROWS.items() if why}
    assert set(res.flags["subject_kind"]) == {"judgment"} and set(res.flags["check"]) == {"registry"}
    m = res.metrics
    assert (m["unknown_annotator"], m["kind_mismatch"], m["unqualified_reviewer"]) == (1, 3, 7)
    assert m["unqualified_by_field"] == {"locale": 4, "rubric": 2, "date": 2}
    assert m["unknown_annotator_ids"] == ["ghost-9"] and m["registry"] == registry.sha256()
    assert res.status == "warn"
    detail = dict(res.flags.select("subject_id", "detail").iter_rows())
    assert detail["ja-judges-en"] == "annotator rev-ja: locale en outside the qualified locales (ja)"
    assert detail["ai-says-human"] == "annotator judge-x: the judgment says human, the registry says ai"
    assert detail["expired"] == "annotator rev-old: judged on 2026-11-20, after qualified_until 2026-11-19"
    assert detail["everything-wrong"].count(";") == 1  # locale and rubric (no date window for rev-01)


def test_a_review_is_checked_against_the_locale_and_rubric_of_its_pair_not_its_own(tmp_path, registry):
    """Pair px is ja-JP under rubric harmless-v2 (its judgments say so).  A review of it whose row says en and
    helpful-v3 (edited in the tool, or written by hand) by rev-01 -- qualified for en and helpful-v3 only -- is
    unqualified: the pair decides.  rev-ja's review of it whose row says en is qualified (the pair is ja-JP), and
    so is one with neither field.  An ordinary judgment is checked on its own fields, as before."""
    pair = {"prompt": [{"role": "user", "content": "Explain tides."}], "response_a": "Gravity of the moon.",
            "response_b": "Wind.", "pair_id": "px"}
    rows = [canonical(0, comparison_id="orig-1", annotator_id="rev-02", locale="ja-JP", rubric="harmless-v2", **pair),
            canonical(1, comparison_id="orig-2", annotator_id="rev-02", locale="ja-JP", rubric="harmless-v2", **pair)]
    review = {k: v for k, v in pair.items() if k != "pair_id"} | {"review_of": "px"}
    rows += [canonical(2, comparison_id="rv-en-edited", annotator_id="rev-01", locale="en", rubric="helpful-v3", **review),
             canonical(3, comparison_id="rv-ja-edited", annotator_id="rev-ja", locale="en", **review),
             canonical(4, comparison_id="rv-no-fields", annotator_id="rev-ja", locale=..., **review),
             canonical(5, comparison_id="plain-en", annotator_id="rev-01", locale="en", rubric="helpful-v3")]
    res = check.run(_judgments(tmp_path, rows), None, registry=registry)
    got = dict(res.flags.select("subject_id", "reason").iter_rows())
    assert got == {"rv-en-edited": "unqualified_reviewer"}, got
    assert res.metrics["unqualified_by_field"] == {"locale": 1, "rubric": 1, "date": 0}
    detail = res.flags.row(0, named=True)["detail"]
    assert "locale ja-JP outside the qualified locales (en)" in detail and "rubric harmless-v2" in detail, detail


def test_without_a_registry_the_check_does_nothing(tmp_path):
    res = check.run(_judgments(tmp_path, [canonical(0, annotator_id="anyone")]), None, registry=None)
    assert res.status == "pass" and res.flags.height == 0 and res.metrics["registry"] is None


def test_clean_samples_against_an_open_registry_pass(tmp_path):
    j = ingest_files(sorted(SAMPLES.glob("*.jsonl"))).judgments
    kinds = dict(j.select("annotator_id", "annotator_kind").unique().iter_rows())
    open_reg = AnnotatorRegistry(annotator=tuple({"annotator_id": a, "annotator_kind": k} for a, k in kinds.items()))
    res = check.run(j, None, registry=open_reg)
    assert res.status == "pass" and res.flags.height == 0, res.flags.head()
    assert res.metrics["registered_without_judgments"] == 0


def test_the_sample_registry_finds_exactly_the_planted_judgments():
    j = ingest_files(sorted(SAMPLES.glob("*.jsonl"))).judgments
    res = check.run(j, None, registry=load_registry(SAMPLES / PLANTED["file"]))
    want = {c for k in ("locale", "rubric", "date") for c in PLANTED[k]["comparison_ids"]}
    assert set(res.flags["subject_id"]) == want and set(res.flags["reason"]) == {PLANTED["reason"]}
    assert res.metrics["unqualified_by_field"] == {k: len(PLANTED[k]["comparison_ids"]) for k in ("locale", "rubric", "date")}
    assert res.metrics["unknown_annotator"] == res.metrics["kind_mismatch"] == 0


def test_the_check_scales_with_distinct_annotator_locale_rubric_not_with_rows(tmp_path, registry):
    """Rows are qualified through a few joins; the per-combination work is tiny (1M rows, half of
    them flagged: ~1 s on this machine)."""
    import time

    base = _judgments(tmp_path, _planted_rows())
    big = pl.concat([base] * (200_000 // base.height + 1)).with_columns(
        comparison_id=pl.format("x{}", pl.int_range(pl.len())))
    t0 = time.perf_counter()
    res = check.run(big, None, registry=registry)
    assert res.flags.height == big.height * 11 // base.height  # 11 of every 21 rows
    assert time.perf_counter() - t0 < 20  # generous: 2 shared cores; measured ~0.2 s


# ----------------------------------------------------------------------------- curate, manifest, CLI
def test_curate_the_samples_with_the_registry_drops_and_shows_the_planted_judgments(tmp_path):
    store = tmp_path / "store"
    batches = [str(SAMPLES / "batch-2026-11-02.jsonl"), str(SAMPLES / "batch-2026-11-09.jsonl")]
    res = runner.invoke(app, ["curate", *batches, "--store", str(store), "--annotators", str(SAMPLES / "annotators.csv")])
    assert res.exit_code == 0, res.output
    vid = res.stdout.strip().splitlines()[-1]
    h = Store(store).get(vid)
    flags = h.read("flags.parquet").filter(pl.col("check") == "registry")
    want = {c for k in ("locale", "rubric", "date") for c in PLANTED[k]["comparison_ids"] if "-20261116-" not in c}
    assert set(flags["subject_id"]) == want
    m = h.manifest()
    assert m.ledger.judgments_dropped["unqualified_reviewer"] == len(want)  # the default action: drop
    assert m.registry_sha256 == load_registry(SAMPLES / "annotators.csv").sha256()
    shown = runner.invoke(app, ["show", vid, "--store", str(store), "--json"])
    data = json.loads(shown.stdout)
    entry = next(c for c in data["checks"] if c["name"] == "registry")
    assert entry["flag_counts"] == {"unqualified_reviewer": len(want)}
    assert entry["metrics"]["registry"] == data["registry_sha256"] == m.registry_sha256
    # kept judgments never include a flagged one
    kept = {c for s in ("train", "validation", "test") for ids in h.read_split(s)["source_comparison_ids"].to_list() for c in ids}
    assert not kept & want


def _tiny(tmp_path: Path) -> Path:
    rows = [canonical(i, comparison_id=f"c{i}-{a}", annotator_id=a, created_at="2026-11-15T10:00:00Z")
            for i in range(30) for a in ("rev-01", "rev-02")]
    return write_jsonl(tmp_path / "tiny.jsonl", rows)


def test_the_version_id_binds_the_registry_content_not_its_file(tmp_path, monkeypatch):
    batch = _tiny(tmp_path)
    st = Store(tmp_path / "store")
    csv_reg = load_registry(_write(tmp_path / "r.csv", REGISTRY_CSV))
    toml_reg = load_registry(_write(tmp_path / "r.toml", REGISTRY_TOML))
    changed = load_registry(_write(tmp_path / "r2.csv", REGISTRY_CSV.replace("rev-02,human,en;ja", "rev-02,human,ja")))
    ids = {name: curate([batch], st, Policy(annotators=reg)).version_id
           for name, reg in (("none", None), ("csv", csv_reg), ("toml", toml_reg), ("changed", changed))}
    assert ids["csv"] == ids["toml"]
    assert len({ids["none"], ids["csv"], ids["changed"]}) == 3
    assert st.get(ids["none"]).manifest().registry_sha256 is None
    assert st.get(ids["csv"]).manifest().registry_sha256 == csv_reg.sha256() == toml_reg.sha256()
    assert json.loads(st.get(ids["csv"]).path.joinpath("manifest.json").read_text())["registry_sha256"] == csv_reg.sha256()
    # the CLI option and the policy key give the same version; the option replaces the key
    res = runner.invoke(app, ["curate", str(batch), "--store", str(st.root), "--annotators", str(tmp_path / "r.toml")])
    assert res.stdout.strip().splitlines()[-1] == ids["csv"]
    pol = _write(tmp_path / "p.toml", 'annotators = "r2.csv"\n')
    monkeypatch.chdir(ROOT)
    res = runner.invoke(app, ["curate", str(batch), "--store", str(st.root), "--policy", str(pol)])
    assert res.stdout.strip().splitlines()[-1] == ids["changed"]
    res = runner.invoke(app, ["curate", str(batch), "--store", str(st.root), "--policy", str(pol), "--annotators",
                              str(tmp_path / "r.csv")])
    assert res.stdout.strip().splitlines()[-1] == ids["csv"]
    # the certificate binds the manifest, which carries the registry's hash
    cert = certify_version(st, ids["csv"], Policy(), run_gx=False)
    assert cert.manifest_sha256 == st.get(ids["csv"]).manifest_sha256()


def test_validate_with_a_registry_lists_the_flagged_judgments_with_file_and_line(tmp_path, make_jsonl, registry):
    reg = _write(tmp_path / "r.csv", REGISTRY_CSV)
    rows = [canonical(0, annotator_id="rev-01"), canonical(1, annotator_id="[red]ghost\x1b[2J"),
            canonical(2, annotator_id="rev-ja", locale="en")]
    batch = make_jsonl(rows)
    res = runner.invoke(app, ["validate", str(batch), "--annotators", str(reg)])
    assert res.exit_code == 1, res.output
    assert f"{batch}:2  unknown_annotator" in res.stdout and f"{batch}:3  unqualified_reviewer" in res.stdout
    assert "[red]ghost\\x1b[2J" in res.stdout and "\x1b[2J" not in res.stdout  # shown literally, never interpreted
    res = runner.invoke(app, ["validate", str(batch), "--annotators", str(reg), "--json"])
    payload = json.loads(res.stdout)
    assert res.exit_code == 1 and payload["ok"] is False
    assert payload["registry"]["flag_counts"] == {"unknown_annotator": 1, "unqualified_reviewer": 1}
    assert [(f["line"], f["reason"]) for f in payload["registry"]["flags"]] == [(2, "unknown_annotator"), (3, "unqualified_reviewer")]
    res = runner.invoke(app, ["validate", str(make_jsonl([rows[0]], name="ok.jsonl")), "--annotators", str(reg)])
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- the certify gate
def _two_locales(tmp_path: Path) -> Path:
    """40 en pairs judged by rev-01 and rev-02; 20 ja pairs judged by rev-ja and rev-01 (qualified for en only)."""
    rows = []
    for i in range(40):
        for a in ("rev-01", "rev-02"):
            rows.append(canonical(i, comparison_id=f"en{i}-{a}", annotator_id=a, rubric=..., label="a" if i % 7 else "b"))
    for i in range(40, 60):
        for a in ("rev-ja", "rev-01"):
            rows.append(canonical(i, comparison_id=f"ja{i}-{a}", annotator_id=a, locale="ja-JP", label="a" if i % 5 else "b"))
    return write_jsonl(tmp_path / "two.jsonl", rows)


def _gates(cert, prefix: str) -> dict[str, tuple]:
    return {g.name: (g.value, g.threshold, g.passed) for g in cert.gates if g.name.startswith(prefix)}


def test_the_gate_fails_a_locale_without_qualified_human_overlap(tmp_path, registry):
    st = Store(tmp_path / "store")
    batch = _two_locales(tmp_path)
    warn_all = {"select": {"flag_actions": dict.fromkeys(check.REASONS, "warn")}}
    from schemas.policy import policy_from_dict

    for pol in (Policy(annotators=registry), policy_from_dict({**warn_all, "annotators": registry.model_dump(mode="json")})):
        vid = curate([batch], st, pol).version_id
        cert = certify_version(st, vid, Policy(), run_gx=False)
        # en: 40 pairs, 40 judged by two qualified humans, need min(4, 50); ja: rev-01 is not qualified for ja
        # (whatever the policy did with the flag: warn keeps the vote, but it is still not a qualified one)
        assert _gates(cert, "qualified_overlap") == {"qualified_overlap.locale=en": (40, 4, True),
                                                     "qualified_overlap.locale=ja-JP": (0, 2, False)}
        assert cert.verdict == "rejected"
    # the threshold's cap is a policy key
    cert = certify_version(st, vid, policy_from_dict({"certify": {"min_overlap_share": 1.0,
                                                                  "min_qualified_overlap_pairs_per_locale": 30}}), run_gx=False)
    assert _gates(cert, "qualified_overlap.locale=en") == {"qualified_overlap.locale=en": (40, 30, True)}
    # a registry that qualifies rev-01 for ja too: the gate passes; without a registry there is no such gate
    fixed = load_registry(_write(tmp_path / "fixed.csv", REGISTRY_CSV.replace("rev-01,human,en,helpful-v3", "rev-01,human,en;ja,")))
    cert = certify_version(st, curate([batch], st, Policy(annotators=fixed)).version_id, Policy(), run_gx=False)
    assert all(passed for _, _, passed in _gates(cert, "qualified_overlap").values()) and len(_gates(cert, "qualified_overlap")) == 2
    cert = certify_version(st, curate([batch], st, Policy()).version_id, Policy(), run_gx=False)
    assert _gates(cert, "qualified_overlap") == {}


def test_ai_judgments_never_count_as_qualified_humans(tmp_path, registry):
    """Two registered AI judges on every pair are an overlap of AI judges, not of qualified humans."""
    rows = [canonical(i, comparison_id=f"c{i}-{a}", annotator_id=a, annotator_kind=k)
            for i in range(30) for a, k in (("judge-x", "ai"), ("rev-02", "ai"))]  # rev-02 is human: kind_mismatch
    st = Store(tmp_path / "store")
    vid = curate([write_jsonl(tmp_path / "ai.jsonl", rows)], st, Policy(annotators=registry)).version_id
    assert st.get(vid).manifest().ledger.judgments_dropped == {"kind_mismatch": 30}
    cert = certify_version(st, vid, Policy(), run_gx=False)
    assert _gates(cert, "qualified_overlap") == {"qualified_overlap.locale=en": (0, 3, False)}
