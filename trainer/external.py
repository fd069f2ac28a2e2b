"""Exported checkpoints and external benchmarks (``--eval-cmd``).

``export_checkpoint(model, tok, dst)`` writes the trained policy in Hugging Face's
``save_pretrained`` layout: ``config.json`` + ``model.safetensors`` (never a pickle) + the
tokenizer files, so ``AutoModelForCausalLM.from_pretrained(dst)`` and
``AutoTokenizer.from_pretrained(dst)`` load it (tiny specs are exported as the equivalent
transformers ``LlamaForCausalLM``, ``trainer.tiny_llama.to_hf``).

``run_eval_cmd(template, checkpoint, cwd, timeout)`` runs the user's command once, after
training: the template is split like a shell would split it (``shlex``), ``{checkpoint}`` in
any word is replaced by the export directory, and the program runs **without a shell**
(write ``sh -c '...'`` yourself for pipes or redirections).  Its standard output is parsed as
JSON (the whole output, else its last line that is a JSON object) and recorded with the exit
code, the time and the tails of both streams in ``external_eval.json``, ``run.json`` and the
lineage.  A command that fails or prints no JSON is recorded as such; the run still finishes.

lm-evaluation-harness, for example (it writes its results to a file, so print that file)::

    prefpipe train VERSION --eval-cmd "sh -c 'lm_eval --model hf --model_args pretrained={checkpoint} \\
        --tasks arc_easy --limit 100 --output_path /tmp/lm-eval >&2 && cat /tmp/lm-eval/*/results_*.json'"
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

TAIL = 2000


def export_checkpoint(model, tok, dst: Path) -> Path:
    """The policy + tokenizer in ``save_pretrained`` layout (safetensors), written to a temp dir then renamed."""
    from safetensors import SafetensorError

    from trainer.runs import safetensors_os_error
    from trainer.tiny_llama import TinyLlamaForCausalLM, to_hf
    from trainer.tokenize import ChatTokenizer

    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf = to_hf(model) if isinstance(model, TinyLlamaForCausalLM) else model
    try:
        try:
            hf.save_pretrained(str(tmp), safe_serialization=True)
        except SafetensorError as err:  # (a full disk, said by safetensors: the OSError it is, naming the file)
            raise safetensors_os_error(err, tmp / "model.safetensors") from err
        if isinstance(tok, ChatTokenizer):  # the repo's tokenizer: copy its files as they are
            for f in tok.source_dir.iterdir():
                if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                    shutil.copy2(f, tmp / f.name)
        else:
            tok.save_pretrained(str(tmp))
    except BaseException:  # nothing half-written stays (nor holds the space of a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def _json_of(stdout: str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def split_eval_cmd(template: str) -> list[str]:
    """The command's words, split like a shell would (``shlex``); ValueError for unbalanced quotes or no word."""
    try:
        words = shlex.split(template)
    except ValueError as err:
        raise ValueError(f"eval command {template!r} cannot be split into words like a shell would: {err}") from None
    if not words:
        raise ValueError(f"eval command {template!r} has no program to run")
    return words


def run_eval_cmd(template: str, checkpoint: Path, *, cwd: Path, timeout: float) -> dict[str, Any]:
    """Run the external benchmark once on ``checkpoint``; returns the record (never raises for the command's failure)."""
    rec: dict[str, Any] = {"template": template, "checkpoint": str(checkpoint)}
    try:
        argv = [word.replace("{checkpoint}", str(checkpoint)) for word in split_eval_cmd(template)]
    except ValueError as err:  # TrainConfig checks it first; a record, not a traceback after training
        return {**rec, "argv": None, "status": "not started", "error": str(err), "seconds": 0.0, "result": None}
    rec["argv"] = argv
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except OSError as err:  # not found, not executable (a directory, no x bit), bad interpreter line
        return {**rec, "status": "not started", "error": str(err), "seconds": 0.0, "result": None}
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {**rec, "status": f"timed out after {timeout:g} s", "seconds": round(time.perf_counter() - t0, 3),
                "stdout_tail": out[-TAIL:], "result": None}
    result = _json_of(proc.stdout)
    status = "ok" if proc.returncode == 0 and result is not None else (
        f"exit {proc.returncode}" if proc.returncode else "no JSON on stdout")
    return {**rec, "status": status, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 3),
            "result": result, "stdout_tail": proc.stdout[-TAIL:], "stderr_tail": proc.stderr[-TAIL:]}
