"""`prefpipe train`: DPO training on a certified version (wiring only; the loop is trainer/train.py).

Registered in flows/cli.py as ``app.command()(train)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.console import err_console, markup, plain

EXIT_USAGE, EXIT_NOT_CERTIFIED, EXIT_DIVERGED = 2, 4, 5  # and 128 + the signal: interrupted (130 Ctrl-C, 143 SIGTERM)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a scheduler or container stopping the command) raises a KeyboardInterrupt, as
    Ctrl-C does, so the run records itself as interrupted (run.json ``failed``, reason ``interrupted``) instead of
    dying with run.json saying ``running``.  Only in the main thread (where Python runs signal handlers); the
    previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        err = KeyboardInterrupt(f"terminated by {signal.Signals(signum).name}")
        err.signum = signum  # type: ignore[attr-defined]  # (the exit code: 128 + signal)
        raise err

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _with_notes(err: BaseException) -> str:
    """The error's message and its notes (the trainer notes where a run that stopped is recorded), one text; an
    OSError as its file and reason."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err)
    return "; ".join([t for t in (text,) if t] + list(getattr(err, "__notes__", ())))


def train(
    version: Annotated[str, typer.Argument(help="Version id, unique prefix, or 'latest'.")],
    store: Annotated[Path, typer.Option("--store", "-s", help="Version store directory.", envvar="PREFPIPE_STORE")] = Path("store"),
    model: Annotated[str, typer.Option("--model", "-m", help="Local HF causal-LM directory, or a tiny random-init spec such as "
                                       "'tiny-llama:layers=4,hidden=256,heads=4'. Nothing is downloaded.")] = "tiny-llama",
    tokenizer: Annotated[str | None, typer.Option(help="Local tokenizer directory (default: the model's, else the repo's tiny chat tokenizer).")] = None,
    reference_model: Annotated[str | None, typer.Option("--reference-model", help="Reference model (default: the policy's initial weights).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.", min=1)] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Pairs per micro-batch.", min=1)] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 5e-5,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps before the cosine decay.")] = 10,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm to this.")] = 1.0,
    max_length: Annotated[int, typer.Option("--max-length", help="Token budget for prompt + completion.")] = 512,
    max_prompt_length: Annotated[int | None, typer.Option("--max-prompt-length", help="Prompts are left-truncated, never below this (default max_length // 2).")] = None,
    beta: Annotated[float, typer.Option("--beta", help="DPO beta (IPO tau).")] = 0.1,
    loss_type: Annotated[str, typer.Option("--loss-type", help="sigmoid | robust | hinge | ipo")] = "sigmoid",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Assumed label-flip rate (sigmoid = cDPO, robust).")] = 0.0,
    rpo_alpha: Annotated[float, typer.Option("--rpo-alpha", help="Weight of the chosen NLL term (0 = off).")] = 0.0,
    no_pair_weights: Annotated[bool, typer.Option("--no-pair-weights", help="Ignore the rows' weight column.")] = False,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate on the validation split every N steps (0: at the end).")] = 50,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0: at the end).")] = 100,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Name of the run directory under STORE/runs/.")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Resume this run id from its latest checkpoint (same settings).")] = None,
    test_eval: Annotated[bool, typer.Option("--test-eval/--no-test-eval", help="After training, evaluate policy vs "
                         "reference on the test split per slice (eval.json, eval.parquet, report.html).")] = True,
    test_eval_every: Annotated[int, typer.Option("--test-eval-every", help="Also log test-split metrics every N steps "
                               "(0: off).", min=0)] = 0,
    export: Annotated[bool, typer.Option("--export", help="Write the final policy to RUN/export/ (save_pretrained "
                      "layout: config.json, model.safetensors, tokenizer).")] = False,
    eval_cmd: Annotated[str | None, typer.Option("--eval-cmd", help="After training, run this command on the exported "
                        "checkpoint ('{checkpoint}' = its directory; split like a shell, run without one) and record "
                        "its JSON output in the run and the lineage.")] = None,
    on_template_mismatch: Annotated[str, typer.Option("--on-template-mismatch", help="A pair whose chat template renders the "
                                    "prompt differently alone than before a reply: 'skip' it (counted in the ledger) or "
                                    "'fail' the run (exit 2) naming it.")] = "skip",
) -> None:
    """Train a policy with DPO on a certified dataset version.

    Refuses (exit 4) a version without a "certified" record or whose files differ from the
    sha256s in its manifest.

    Stops (exit 5) at the first optimizer step whose training loss or gradient norm is NaN/inf,
    or when a validation or test loss is: the message names the step and the value; run.json says
    status "failed" with the failure, checkpoints written before stay and none is written for that
    step.

    Writes STORE/runs/RUN_ID/ (config, lineage run.json,
    metrics.jsonl, metrics.svg, checkpoints, eval.json + eval.parquet + report.html/.md of the
    test-split evaluation) and appends to STORE/lineage/VERSION.jsonl;
    prints the run directory as the last line of stdout (on success only).

    Any other error once the run started (a full disk, Ctrl-C, SIGTERM) is recorded too: run.json says status
    "failed" with the error, and --resume RUN_ID continues from the last checkpoint.

    Exit 0 trained; 2 bad usage or input, or an I/O error (a full disk: the file and the reason); 4 version
    not certified; 5 the loss became NaN/inf; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    """
    # Idle OpenMP threads spin by default; on a shared CPU that steals cycles from everyone
    # (measured: 2-thread steps 3-10x slower next to other jobs).  Only effective before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pydantic import ValidationError

    from pipeline.store import VersionNotFound
    from schemas.ids import UnsafeId, safe_id
    from trainer.model import ModelSpecError
    from trainer.reference import ReferenceNotFinite
    from trainer.runs import CheckpointError
    from trainer.evaluate import summary_lines
    from trainer.tokenize import PrefixMismatchError, TokenizerError, ledger_summary
    from trainer.train import NoTrainingPairs, ResumeMismatch, TrainingDiverged, VersionRefused, make_config
    from trainer.train import train as run_training

    con = err_console()
    try:  # before any path is built from them
        for value in (run_id, resume):
            if value is not None:
                safe_id(value, what="run id")
    except UnsafeId as err:
        con.print(markup("[bold red]error:[/] {err}", err=err))
        raise typer.Exit(EXIT_USAGE) from None
    if run_id is not None and resume is not None and run_id != resume:  # which run would it be?
        con.print(markup("[bold red]error:[/] --run-id {a} and --resume {b} name two runs; --resume RUN_ID alone "
                         "continues that run", a=run_id, b=resume))
        raise typer.Exit(EXIT_USAGE)
    if not (store / "versions").is_dir():
        con.print(markup("[bold red]error:[/] {store} is not a prefpipe store (no versions/ directory)", store=store))
        raise typer.Exit(EXIT_USAGE)
    try:
        cfg = make_config(
            store, version, model=model, tokenizer=tokenizer, reference_model=reference_model, max_steps=steps,
            batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
            grad_clip=grad_clip, max_length=max_length, max_prompt_length=max_prompt_length, beta=beta,
            loss_type=loss_type, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha,
            use_pair_weights=not no_pair_weights, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed,
            threads=threads, run_id=resume or run_id, resume=resume is not None,
            on_template_mismatch=on_template_mismatch, test_eval=test_eval, test_eval_every=test_eval_every,
            export=export, eval_cmd=eval_cmd)
    except ValidationError as err:
        con.print(markup("[bold red]error:[/] bad training options:\n  {err}", err=plain(err, multiline=True)))
        raise typer.Exit(EXIT_USAGE) from None

    with _Progress(cfg.max_steps, enabled=sys.stderr.isatty()) as progress, _sigterm_interrupts():
        try:
            result = run_training(cfg, on_event=progress.on_event)
        except VersionRefused as err:
            con.print(markup("[bold red]refused:[/] {err}", err=err))
            raise typer.Exit(EXIT_NOT_CERTIFIED) from None
        except TrainingDiverged as err:
            con.print(markup("[bold red]failed:[/] {err}", err=err))
            raise typer.Exit(EXIT_DIVERGED) from None
        except (VersionNotFound, ModelSpecError, ResumeMismatch, FileExistsError, CheckpointError,
                PrefixMismatchError, TokenizerError, NoTrainingPairs, ReferenceNotFinite) as err:
            con.print(markup("[bold red]error:[/] {err}", err=_with_notes(err)))
            raise typer.Exit(EXIT_USAGE) from None
        except OSError as err:  # a full disk, a read-only or vanished run directory: the file, the reason, the record
            con.print(markup("[bold red]error:[/] {err}", err=_with_notes(err)))
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: where the run stopped and how to go on, not a traceback
            con.print(markup("[bold red]interrupted:[/] {err}", err=_with_notes(err)))
            raise typer.Exit(128 + getattr(err, "signum", signal.SIGINT)) from None
    f = result.final
    if result.already_finished:
        con.print(markup("run {r} had finished: nothing trained or written again; its recorded results follow",
                         r=result.run_id))
    con.print("data (tokenize ledger):", highlight=False)
    for split, led in (result.ledger or {}).items():
        con.print(plain("  " + ledger_summary(led, split)))
    if result.evaluation is not None:
        for line in summary_lines(result.evaluation):
            con.print(plain(line))
        con.print(plain(f"report: {result.run_dir / 'report.html'}"))
    if "external_eval" in f:
        con.print(plain(f"external eval ({f['external_eval']['status']}): {json.dumps(f['external_eval']['result'])[:500]}"))
    con.print(f"trained {f['step']} steps, {f['tokens_seen']:,} tokens at {f['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {f['peak_rss_mib']:.0f} MiB; validation loss {f.get('eval/loss', float('nan')):.4f}, "
              f"reward accuracy {f.get('eval/rewards/accuracies', float('nan')):.3f}")
    print(result.run_dir)


class _Progress:
    """A rich progress bar over optimizer steps on stderr (a terminal only), fed by trainer events."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.prog, self.task = total, enabled, None, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.prog = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=err_console(), transient=False)
            self.prog.__enter__()
            self.task = self.prog.add_task("preparing", total=self.total, info="")
        return self

    def on_event(self, kind: str, payload: dict) -> None:
        if self.prog is None:
            return
        if kind == "reference":
            self.prog.update(self.task, description="reference log-probs", info=f"+{payload['pairs']} pairs")
        elif kind == "start":
            self.prog.update(self.task, description="training", completed=payload["step"],
                             info="reference cache hit" if payload["reference_cache_hit"] else "")
        elif kind == "step":
            self.prog.update(self.task, completed=payload["step"],
                             info=f"loss {payload['loss']:.4f} acc {payload['rewards/accuracies']:.2f} "
                                  f"{payload['tokens/s']:.0f} tok/s")
        elif kind == "eval" and not payload.get("eval/pairs"):
            self.prog.console.print(f"  step {payload['step']}: no validation pairs", highlight=False)
        elif kind == "eval":
            self.prog.console.print(f"  step {payload['step']}: validation loss {payload['eval/loss']:.4f}, "
                                    f"reward accuracy {payload['eval/rewards/accuracies']:.3f}", highlight=False)

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.__exit__(*exc)
        return False
