"""CLI: help texts, validate output and exit codes (in-process and as a real process)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, canonical, write_jsonl
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["validate"], ["policy"], ["policy", "show"]])
def test_help_everywhere(cmd):
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output and len(res.output) > 200


def test_validate_clean_exit_0(tmp_path):
    p = write_jsonl(tmp_path / "ok.jsonl", [canonical(i) for i in range(3)])
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 0, res.output
    assert "rows in 3 = valid 3 + quarantined 0" in res.output


def test_validate_quarantine_exit_1_with_line_numbers(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [canonical(0), canonical(1, label="maybe")], raw_lines={2: "{oops"})
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 1
    assert f"{p}:2" in res.output and "invalid_value" in res.output and "'label'" in res.output
    assert f"{p}:3" in res.output and "invalid_json" in res.output


def test_validate_json_output(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [canonical(0), canonical(1, strength=3)])
    res = runner.invoke(app, ["validate", str(p), "--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["ok"] is False and data["ledger"]["rows_in"] == 2 and data["ledger"]["quarantined"] == 1
    assert data["errors"][0] | {"error": None} == {"source_file": str(p), "line": 2, "reason": "invalid_value", "field": "strength", "error": None}


def test_unreadable_file_exit_2_real_process(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes("".join(f'{{"comparison_id": "caf\xe9 {i}"}}\n' for i in range(5)).encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(p)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "not UTF-8" in proc.stderr and str(p) in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(tmp_path / "nope.jsonl"), "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and json.loads(proc.stdout)["ok"] is False


def test_a_directory_as_input_is_exit_2_saying_so(tmp_path):
    """A directory exists: "no such file" would send the user looking for a typo."""
    for args in (["validate", str(tmp_path)], ["curate", str(tmp_path), "--store", str(tmp_path / "s")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "is a directory" in res.output and "no such file" not in res.output
    assert not (tmp_path / "s").exists()

def test_validate_max_errors_below_zero_is_bad_usage(tmp_path):
    """A negative count would be a polars ``head(-1)``: every row but the last, under "First -1 of 2"."""
    p = write_jsonl(tmp_path / "bad.jsonl", [canonical(0, label="x"), canonical(1, label="y")])
    res = runner.invoke(app, ["validate", str(p), "--max-errors", "-1"])
    assert res.exit_code == 2 and "max-errors" in res.output and "First -1" not in res.output

def test_an_annotator_kind_option_outside_human_ai_unknown_is_bad_usage(tmp_path):
    """Not one quarantined row per judgment (exit 1) for a typo in one option: exit 2 before anything is read."""
    p = tmp_path / "trl.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    for cmd in (["validate", str(p)], ["curate", str(p), "--store", str(tmp_path / "s")]):
        res = runner.invoke(app, [*cmd, "--annotator-kind", "robot"])
        assert res.exit_code == 2, res.output
        assert "annotator-kind" in res.output and "robot" in res.output and "quarantined" not in res.output
    assert not (tmp_path / "s").exists()
    assert runner.invoke(app, ["validate", str(p), "--annotator-kind", "ai"]).exit_code == 0

def test_bad_usage_exit_2():
    res = runner.invoke(app, ["validate", "--no-such-flag"])
    assert res.exit_code == 2


def test_policy_show_and_bad_policy(tmp_path):
    res = runner.invoke(app, ["policy", "show"])
    assert res.exit_code == 0 and "[checks.agreement]" in res.output and "low_agreement_threshold" in res.output
    bad = tmp_path / "p.toml"
    bad.write_text("[split]\ntrain = 0.9\nvalidation = 0.3\nwat = 1\n")
    res = runner.invoke(app, ["policy", "show", "--policy", str(bad)])
    assert res.exit_code == 2
    assert "split.wat: unknown key" in res.output
    good = tmp_path / "g.yaml"
    good.write_text("checks:\n  agreement:\n    low_agreement_threshold: 0.75\n")
    res = runner.invoke(app, ["policy", "show", "--policy", str(good), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["policy"]["checks"]["agreement"]["low_agreement_threshold"] == 0.75


def test_bad_flag_reason_names_the_policy_file(tmp_path):
    bad = tmp_path / "reasons.yaml"
    bad.write_text("select:\n  flag_actions: {near_dupe: drop}\n")
    res = runner.invoke(app, ["policy", "show", "--policy", str(bad)])
    assert res.exit_code == 2
    assert f"invalid policy {bad}" in res.output and "unknown reason(s) ['near_dupe']" in res.output


def test_serve_refuses_a_bad_policy_before_any_run(tmp_path):
    """Otherwise every scheduled tick would fail on it (and `--once` print a Prefect traceback)."""
    bad = tmp_path / "typo.toml"
    bad.write_text("[certify]\nmin_pair_per_split = { train = 5 }\n")
    (tmp_path / "inbox").mkdir()
    for mode in (["--once"], ["--interval", "60"]):
        res = runner.invoke(app, ["serve", "--inbox", str(tmp_path / "inbox"), "--store", str(tmp_path / "store"),
                                  "--policy", str(bad), *mode])
        assert res.exit_code == 2, res.output
        assert f"invalid policy {bad}" in res.output and "certify.min_pair_per_split: unknown key" in res.output
        assert "Traceback" not in res.output
    assert not (tmp_path / "store").exists()


def test_policy_show_round_trips(tmp_path):
    from pipeline.checks import resolve_policy
    from schemas.policy import Policy, load_policy

    effective = resolve_policy(Policy())
    res = runner.invoke(app, ["policy", "show"])
    p = tmp_path / "effective.toml"
    p.write_text(res.stdout)
    assert load_policy(p).policy_hash() == effective.policy_hash()  # the printed policy is a valid, complete file
    assert resolve_policy(load_policy(p)) == effective
    assert (ROOT / "policies" / "default.toml").exists()
    assert load_policy(ROOT / "policies" / "default.toml").policy_hash() == effective.policy_hash()
    import tomllib

    # complete: every key of the effective policy is written out (regenerate with `prefpipe policy show`)
    file_data = tomllib.loads((ROOT / "policies" / "default.toml").read_text(encoding="utf-8"))
    assert file_data == effective.model_dump(mode="json", exclude_none=True)


def test_policy_files_merge_into_defaults_and_bad_yaml_is_exit_2(tmp_path):
    part = tmp_path / "part.yaml"
    part.write_text("select:\n  flag_actions:\n    near_duplicate: drop\n")
    res = runner.invoke(app, ["policy", "show", "--policy", str(part), "--json"])
    actions = json.loads(res.stdout)["policy"]["select"]["flag_actions"]
    assert actions["near_duplicate"] == "drop" and actions["exact_duplicate"] == "drop"  # other defaults kept
    bad = tmp_path / "bad.yaml"
    bad.write_text("select: [a\n  b: {\n")
    res = runner.invoke(app, ["policy", "show", "--policy", str(bad)])
    assert res.exit_code == 2 and "not valid YAML" in res.output


def _on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run `prefpipe ARGS` with stderr on a pseudo-terminal: (exit code, stdout, what the terminal got)."""
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    got = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        got.append(chunk)
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(got).decode(errors="replace")


def test_curate_shows_its_stages_on_a_terminal_only(tmp_path):
    """A terminal sees rows read and each stage as it finishes; --json and pipes get no progress."""
    rows = [canonical(i % 40, comparison_id=f"c-{i}", annotator_id=f"ann-{i % 3}") for i in range(120)]
    batch = write_jsonl(tmp_path / "b.jsonl", rows)
    code, out, tty = _on_a_terminal(["curate", str(batch), "--store", str(tmp_path / "s")])
    assert code == 0 and out.strip().splitlines()[-1].startswith("v-")
    assert "curating" in tty and "reading input: 120 rows" in tty
    # a first version is built over partitions: each partitioned step's partitions as they finish
    assert "partitions" in tty and "checks done" in tty and "report done" in tty and "stages]" in tty
    # the one-process reference build: its stages
    code, out, tty = _on_a_terminal(["curate", str(batch), "--store", str(tmp_path / "s3"), "--one-process"])
    assert code == 0 and "union inputs done" in tty and "report done" in tty
    code, out, tty = _on_a_terminal(["curate", str(batch), "--store", str(tmp_path / "s2"), "--json"])
    doc = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert code == 0 and doc["created"] is True
    # the run's laps: the version's (its manifest's, the work directory's removal last), then the version's publish
    laps = list(doc["timings_s"])
    manifest = json.loads((tmp_path / "s2" / "versions" / doc["version_id"] / "manifest.json").read_text())
    assert laps[:-1] == list(manifest["lineage"]["timings_s"]) and laps[-2:] == ["work_cleanup", "publish"]
    assert not (tmp_path / "s2" / ".work" / doc["version_id"]).exists()
    assert "curating" not in tty and "stages]" not in tty
    piped = subprocess.run([sys.executable, "-m", "flows.cli", "curate", str(batch), "--store", str(tmp_path / "s3")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "curating" not in piped.stderr and "stages]" not in piped.stderr
    # --json's stdout is one JSON document (``| jq`` reads it), the version id in it
    as_json = subprocess.run([sys.executable, "-m", "flows.cli", "curate", str(batch), "--store", str(tmp_path / "s3"),
                              "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["version_id"] == piped.stdout.strip().splitlines()[-1]


def _commands(group=None, prefix=()):
    import typer.main

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield [*prefix, name]


@pytest.mark.parametrize("cmd", list(_commands()), ids=" ".join)
def test_help_prose_is_not_wrapped_at_the_sources_width(cmd):
    """On a wide terminal every paragraph of a command's description is one line: Typer's rich mode keeps a
    docstring's line breaks, which broke sentences mid-way ("... one JSON document that" / "holds it as ...")."""
    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "1000"})
    assert res.exit_code == 0, res.output
    head = res.output.split("╭")[0].splitlines()
    prose = [line.strip() for line in head[2:] if line.strip()]  # (after "Usage: ..." and its blank line)
    assert prose, res.output
    for line in prose:
        assert line.endswith((".", ")", ":", "`", "?")), f"{' '.join(cmd)} --help: a sentence broken at {line!r}"


def test_command_list_gives_each_command_one_line_on_a_wide_terminal():
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "400"})
    rows = [line for line in res.output.split("Commands")[1].splitlines()[1:] if line.startswith("│")]
    assert len(rows) >= 10, res.output
    assert all(line[1:].strip().split()[0].isalpha() and not line[2:4].isspace() for line in rows), res.output


# ---------------------------------------------------------------- --json on failures: one JSON document on stdout
def _json_failure(res, code: int, *said: str) -> dict:
    """A failing command run with --json: exit ``code``; stdout is one JSON document and nothing else,
    with ok false, the exit code and the message (which says each of ``said``); the message on stderr too."""
    assert res.exit_code == code, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == code, doc
    for part in said:
        assert part in doc["error"], doc
    assert doc["error"].split(":")[0] in res.stderr, res.stderr
    return doc


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A store holding one version of three clean judgments (too few to certify)."""
    root = tmp_path_factory.mktemp("tiny")
    batch = write_jsonl(root / "b.jsonl", [canonical(i) for i in range(3)])
    res = runner.invoke(app, ["curate", str(batch), "--store", str(root / "s")])
    assert res.exit_code == 0, res.output
    return root / "s", res.stdout.strip().splitlines()[-1], res.stdout


def test_curate_json_on_an_unusable_input_prints_the_failure_as_json(tmp_path):
    """validate --json said why on stdout; curate --json printed nothing there (a script read an empty string)."""
    missing = tmp_path / "nope.jsonl"
    res = runner.invoke(app, ["curate", str(missing), "--store", str(tmp_path / "s"), "--json"])
    doc = _json_failure(res, 2, "no such file", str(missing))
    assert doc["file"] == str(missing) and doc["line"] is None and doc["field"] is None
    damaged = tmp_path / "b.jsonl.gz"
    damaged.write_bytes(b"not gzip at all\n")
    res = runner.invoke(app, ["curate", str(damaged), "--store", str(tmp_path / "s"), "--json"])
    doc = _json_failure(res, 2, "damaged gzip data")
    assert doc["file"] == str(damaged) and doc["line"] == 1
    assert not (tmp_path / "s" / "versions").exists() or not any((tmp_path / "s" / "versions").iterdir())
    # validate and curate say it the same way
    same = runner.invoke(app, ["validate", str(damaged), "--json"])
    assert {k: v for k, v in json.loads(same.stdout).items() if k != "error"} == \
           {k: v for k, v in doc.items() if k != "error"}
    # as a real process: stdout holds the JSON document only
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "curate", str(damaged), "--store", str(tmp_path / "s"),
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and json.loads(proc.stdout)["exit_code"] == 2 and "damaged gzip data" in proc.stderr


def test_curate_json_on_a_bad_registry_names_its_problems(tmp_path):
    reg = tmp_path / "r.csv"
    reg.write_text("annotator_id,annotator_kind\nrev-01,robot\n")
    batch = write_jsonl(tmp_path / "b.jsonl", [canonical(0)])
    res = runner.invoke(app, ["curate", str(batch), "--store", str(tmp_path / "s"), "--annotators", str(reg), "--json"])
    doc = _json_failure(res, 2, "annotator registry")
    assert doc["file"] == str(reg) and doc["problems"][0]["line"] == 2 and doc["problems"][0]["field"] == "annotator_kind"


@pytest.mark.parametrize("cmd", [["certify", "latest"], ["show", "latest"], ["diff", "latest", "latest"],
                                 ["versions"], ["protect", "latest"], ["gc"],
                                 ["review", "export", "latest", "--format", "jsonl", "--out", "x.jsonl"]], ids=" ".join)
def test_store_commands_json_on_a_missing_store(tmp_path, cmd):
    res = runner.invoke(app, [*cmd, "--store", str(tmp_path / "no-store"), "--json"])
    _json_failure(res, 2, "is not a prefpipe store", str(tmp_path / "no-store"))


@pytest.mark.parametrize("cmd", [["certify", "v-nope"], ["show", "v-nope"], ["diff", "latest", "v-nope"]], ids=" ".join)
def test_version_commands_json_on_an_unknown_version(tiny_store, cmd):
    store, _, _ = tiny_store
    res = runner.invoke(app, [*cmd, "--store", str(store), "--json"])
    _json_failure(res, 2, "v-nope")


def test_policy_and_review_import_json_failures(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("[split]\nwat = 1\n")
    _json_failure(runner.invoke(app, ["policy", "show", "--policy", str(bad), "--json"]), 2, "split.wat")
    missing = tmp_path / "export.json"
    res = runner.invoke(app, ["review", "import", str(missing), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl"),
                              "--json"])
    assert _json_failure(res, 2, str(missing))["file"] == str(missing)


def test_review_import_json_failure_gives_the_line_it_names(tmp_path):
    """A JSON Lines review file refused at a line: `line` holds it (the message and `where` name it)."""
    answers = tmp_path / "answers.jsonl"
    answers.write_text('\n{"x": 1}\n')
    res = runner.invoke(app, ["review", "import", str(answers), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl"),
                              "--json"])
    doc = _json_failure(res, 2, "line 2")
    assert (doc["file"], doc["line"], doc["where"]) == (str(answers), 2, "line 2"), doc


def test_certify_json_rejected_is_the_record_with_ok_false_and_exit_3(tiny_store):
    store, vid, _ = tiny_store
    res = runner.invoke(app, ["certify", vid, "--store", str(store), "--no-expectations", "--json"])
    doc = _json_failure(res, 3, vid, "failing gates", "expectations")
    assert doc["verdict"] == "rejected" and doc["version_id"] == vid and doc["record"].endswith(f"{vid}.json")
    assert any(g["name"] == "expectations" and not g["passed"] for g in doc["gates"])
    assert "REJECTED" in res.stderr


def test_validate_json_quarantine_carries_the_exit_code(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [canonical(0), canonical(1, strength=3)])
    doc = _json_failure(runner.invoke(app, ["validate", str(p), "--json"]), 1, "1 of 2 rows quarantined")
    assert doc["ledger"]["quarantined"] == 1 and doc["errors"][0]["field"] == "strength"


def test_usage_errors_with_json_are_json_too(tmp_path):
    """Caught by the option parser before the command runs (exit 2): with --json, the same document."""
    p = write_jsonl(tmp_path / "ok.jsonl", [canonical(0)])
    res = runner.invoke(app, ["curate", str(p), "--store", str(tmp_path / "s"), "--annotator-kind", "robot", "--json"])
    assert _json_failure(res, 2, "robot")["field"] == "--annotator-kind"
    res = runner.invoke(app, ["validate", str(p), "--json", "--max-errors", "-1"])
    assert _json_failure(res, 2, "--max-errors")["field"] == "--max-errors"
    res = runner.invoke(app, ["validate", str(p), "--max-errors", "-1"])  # without --json: nothing on stdout
    assert res.exit_code == 2 and res.stdout == ""


@pytest.mark.parametrize("args", [["--batch-id", "--json"], ["x.jsonl", "--batch-id", "--json", "--bogus"],
                                  ["x.jsonl", "--batch-id=--json", "--bogus"], ["x.jsonl", "--bogus", "--", "--json"]])
def test_json_as_an_option_value_is_not_the_json_flag(args):
    """A usage error prints the JSON document only for the command's real --json flag, as click parses it:
    not for the string --json taken as another option's value, nor for an argument after --."""
    res = runner.invoke(app, ["curate", *args])
    assert res.exit_code == 2 and res.stdout == "", res.stdout


@pytest.mark.parametrize("args", [["--json"], ["x.jsonl", "--json", "--batch-id"], ["x.jsonl", "--bogus", "--json"],
                                  ["x.jsonl", "--batch-id", "b1", "--json", "--bogus"]])
def test_the_json_flag_beside_a_usage_error_is_json(args):
    _json_failure(runner.invoke(app, ["curate", *args]), 2)


def test_curate_summary_without_a_breakdown_has_no_stray_space(tiny_store):
    _, _, out = tiny_store
    assert "(dropped 0)" in out and "(dropped 0 )" not in out, out
    pairs = next(line for line in out.splitlines() if line.lstrip().startswith("pairs "))
    assert pairs.endswith("+ dropped 0"), repr(pairs)


def test_json_failure_for_a_bad_policy_names_its_file_and_key(tmp_path):
    pol = tmp_path / "pol.toml"
    pol.write_text("[certify]\nmin_pair_per_split = 3\n", encoding="utf-8")
    data = write_jsonl(tmp_path / "ok.jsonl", [canonical(i) for i in range(3)])
    res = runner.invoke(app, ["curate", str(data), "--store", str(tmp_path / "s"), "--policy", str(pol), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 2 and doc["ok"] is False, res.output
    assert doc["file"] == str(pol) and doc["field"] == "certify.min_pair_per_split", doc
    pol.write_text("[select.flag_actions]\nnear_dupe = 'drop'\n", encoding="utf-8")  # (a key only the checks know)
    doc = json.loads(runner.invoke(app, ["curate", str(data), "--store", str(tmp_path / "s"), "--policy", str(pol),
                                         "--json"]).stdout)
    assert doc["file"] == str(pol) and "near_dupe" in doc["error"], doc
