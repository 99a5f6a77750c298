"""flowsteer: distill a flow-matching teacher into a few-step student, one resumable stage at a time."""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

# Before pyarrow loads: Arrow's default jemalloc pool keeps the extents of every table the driver builds
# (~450 bytes a planned prompt at 20k prompts, bench/generate_scale.py); the system allocator returns them.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from pipeline.errors import UserError
from pipeline.files import StageBusy, StageLock
from pipeline.runner import JobFailed, drop_record, job_status, run_job
from schemas.config import ConfigError, RunConfig, load_config

STAGES = ["teacher", "generate", "encode", "train", "evaluate", "report"]
EXAMPLE = Path(__file__).resolve().parent.parent / "schemas" / "example.yaml"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__ + "\n\nStages run in order: teacher -> generate -> encode -> train -> evaluate -> report. "
                  "Every stage skips finished units on rerun; `flowsteer status` shows where a run stands.")


@app.callback()
def _global_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' own loading "
                                                 "bars, info logs and warnings (diffusers, transformers, hub).")):
    from pipeline.quiet import set_verbose

    set_verbose(verbose)


class MethodsInHelp(TyperCommand):
    """A command whose option help may say `{methods}`: filled with the registered methods (pipeline/methods/)
    when --help is shown, so a new method file is listed without an edit here, and a plain command line does
    not pay the seconds that importing the methods (torch) takes."""

    def format_help(self, ctx, formatter):
        from pipeline.methods import method_names

        for param in self.params:
            template = param.__dict__.setdefault("help_template", getattr(param, "help", None))
            if template and "{methods}" in template:
                param.help = template.replace("{methods}", " | ".join(method_names()))
        return super().format_help(ctx, formatter)


ConfigOpt = typer.Option(None, "--config", "-c", help="Run config YAML (see `flowsteer init`); "
                         "omitted = the embedded default (tiny SD3 teacher on MNIST).")
EXECUTORS = ("local", "ray")


def _check_executor(value: Optional[str]) -> Optional[str]:
    """--executor is checked when the command line is parsed, before any config is read or work done."""
    if value is not None and value not in EXECUTORS:
        fail(f"--executor: '{value}' is not one of {', '.join(EXECUTORS)}")
    return value


ExecutorOpt = typer.Option(None, "--executor", "-e", callback=_check_executor,
                           help="local (in-process) or ray (actors); default from config.")
WaitOpt = typer.Option(False, "--wait", help="If another run writes the same stage directory, wait for it "
                       "instead of exiting (default: exit 2 naming its host and pid).")
ShareOpt = typer.Option(False, "--share", help="Run beside other flowsteer processes on the same config (this "
                        "host, or other hosts on a shared filesystem): take the jobs (e.g. training runs) that no "
                        "other process holds, then wait for the rest to finish (docs/scaling.md).")
def methods_option(help: str):
    """`--method/-m`, repeatable: the run names a command works on."""
    return typer.Option(None, "--method", "-m", help=help)


AddressOpt = typer.Option(None, "--address", help="Ray cluster address, e.g. 'auto' on a `ray up` cluster.")
WorkersOpt = typer.Option(None, "--workers", help="Number of Ray actors (default: as many as resources allow).")


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def get_config(path: Optional[Path], checks: bool = True, **overrides) -> RunConfig:
    """The config, checked on load: its schema, then every stage's own checks (pipeline/preflight.py), so a
    setting of a late stage is refused before an early one runs."""
    try:
        cfg = load_config(path or EXAMPLE, {k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        fail(str(exc))
    if checks:
        check_config(cfg)
    return cfg


def config_problems(cfg: RunConfig, first_only: bool = False) -> list[tuple[str, str]]:
    """(stage, one-line problem) for each stage whose own `check(cfg)` refuses the config (pipeline/preflight.py)."""
    out = []
    for name in STAGES:
        check = getattr(stage_module(name), "check", None)
        try:
            if check is not None:
                check(cfg)
        except (UserError, ConfigError) as exc:
            out.append((name, str(exc)))
            if first_only:
                break
    return out


def check_config(cfg: RunConfig) -> None:
    for _, problem in config_problems(cfg, first_only=True):
        fail(problem)


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}")


def _echo_done(job, st: dict) -> None:
    typer.echo(f"{job.stage}: {st['done']} units done ({st['skipped']} skipped as already done) -> {job.out_dir}")


def run_stage(name: str, cfg: RunConfig, executor: str | None = None, address: str | None = None,
              workers: int | None = None, wait: bool = False, share: bool = False, **opts) -> None:
    """Plan a stage's jobs and run their pending units; user errors and failed units exit non-zero.

    share: where the stage's jobs are independent (`INDEPENDENT_JOBS`, e.g. training runs), a job whose
    directory another process holds is put aside (its lock says who), the free ones run, then each put-aside
    job is waited for and run for whatever its holder left (usually nothing): N processes on one config split
    its jobs (datatrove-style workers on one task queue). Where a job needs the ones before it (evaluate's
    students need the teacher's outputs), a held job is waited for instead."""
    from pipeline.preflight import before_run
    from pipeline.shard_check import forget

    forget()                                  # each command checks the shards it reads anew
    mod = stage_module(name)
    t0 = time.time()
    try:
        if opts.get("methods"):
            cfg.train_runs(list(opts["methods"]))        # an unknown -m name: one line, before anything
        before_run(cfg, name)
        held: list = []
        for job in mod.jobs(cfg, **opts):
            try:
                st = run_job(job, executor or cfg.executor, address, workers, wait=wait and not share)
            except StageBusy as exc:
                if not share:
                    raise
                if getattr(mod, "INDEPENDENT_JOBS", False):
                    typer.echo(f"{job.stage}: {exc.args[0].split(' (')[0]}; taking the next job")
                    held.append(job)
                    continue
                st = run_job(job, executor or cfg.executor, address, workers, wait=True)  # later jobs need it
            _echo_done(job, st)
        for job in held:
            st = run_job(job, executor or cfg.executor, address, workers, wait=True)
            _echo_done(job, st)
        if hasattr(mod, "after"):
            msg = mod.after(cfg, **opts)
            if msg:
                typer.echo(msg)
    except (UserError, ConfigError) as exc:
        fail(str(exc))
    except JobFailed as exc:
        fail(str(exc), 1)
    except OSError as exc:      # e.g. a full disk while writing a plan or store: the path and errno text
        fail(str(exc), 1)
    typer.echo(f"{name}: finished in {time.time() - t0:.1f}s")


@app.command()
def init(path: Path = typer.Argument(Path("flowsteer.yaml"), help="Where to write the example config."),
         force: bool = typer.Option(False, help="Overwrite an existing file."),
         preset: Optional[str] = typer.Option(None, help="study: the whole ablation ladder, 3 training seeds, "
                                              "400 steps; exact-study: the same ladder on the exact benchmark "
                                              "teacher, 600 steps (docs/ablation.md).")):
    """Write a commented example config (the embedded default) to edit."""
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)")
    if preset is None:
        shutil.copyfile(EXAMPLE, path)
    else:
        from pipeline.files import atomic_write_bytes
        from pipeline.ladder import preset_yaml

        try:
            text = preset_yaml(preset, EXAMPLE.read_text())
        except KeyError as exc:
            fail(exc.args[0])
        atomic_write_bytes(path, text.encode())
    typer.echo(f"wrote {path}")


@app.command()
def teacher(config: Optional[Path] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
            address: Optional[str] = AddressOpt, wait: bool = WaitOpt):
    """Train the embedded teacher (and its digit classifier); other teachers load as they are."""
    run_stage("teacher", get_config(config), executor, address, wait=wait)


@app.command()
def generate(config: Optional[Path] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
             address: Optional[str] = AddressOpt, workers: Optional[int] = WorkersOpt, wait: bool = WaitOpt,
             rebuild: bool = typer.Option(False, "--rebuild", help="Delete this config's trajectory store and "
                                          "its records, then generate it anew (the only way generate deletes).")):
    """Run the teacher ODE from noise and cache trajectory segments in a Zarr store."""
    run_stage("generate", get_config(config), executor, address, workers, wait=wait, rebuild=rebuild)


@app.command()
def encode(config: Optional[Path] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
           address: Optional[str] = AddressOpt, workers: Optional[int] = WorkersOpt):
    """Encode real images (data.images; the MNIST digits for the embedded teacher) into a latent store."""
    run_stage("encode", get_config(config), executor, address, workers)


@app.command(cls=MethodsInHelp)
def train(config: Optional[Path] = ConfigOpt,
          method: Optional[list[str]] = methods_option("Run names: a method ({methods}) or a train.variants key "
                                                       "(repeatable; default: train.methods); each trains once "
                                                       "per train.seeds"),
          executor: Optional[str] = ExecutorOpt, address: Optional[str] = AddressOpt, wait: bool = WaitOpt,
          share: bool = ShareOpt):
    """Distill students from cached trajectories (plus online rollouts); resumes from the last checkpoint."""
    run_stage("train", get_config(config), executor, address, methods=method or None, wait=wait, share=share)


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt,
             method: Optional[list[str]] = methods_option("Run names to score (default: train.methods)."),
             executor: Optional[str] = ExecutorOpt, address: Optional[str] = AddressOpt, wait: bool = WaitOpt,
             share: bool = ShareOpt,
             follow: bool = typer.Option(False, "--follow", help="Score each training checkpoint as training "
                                         "commits it (alongside `flowsteer train`), until every run has exported; "
                                         "curves go to TensorBoard and the report."),
             poll: float = typer.Option(30.0, min=0.1, help="--follow: seconds between looks for new checkpoints.")):
    """Score the teacher and every exported student: FID, prompt alignment (CLIP, PickScore, HPSv2,
    ImageReward where their weights are set), trajectory fidelity."""
    cfg, methods = get_config(config), method or None
    if not follow:
        run_stage("evaluate", cfg, executor, address, methods=methods, wait=wait, share=share)
        return
    from pipeline.follow import training_finished, watch

    watch(lambda: run_stage("evaluate", cfg, executor, address, methods=methods, wait=wait, follow=True),
          lambda: training_finished(cfg, methods), poll)


@app.command()
def report(config: Optional[Path] = ConfigOpt,
           method: Optional[list[str]] = methods_option("Run names to include (default: train.methods)."),
           wait: bool = WaitOpt):
    """Write report.md / report.html with the ablation table, plots and image grids."""
    run_stage("report", get_config(config), methods=method or None, wait=wait)


@app.command()
def ablate(config: Optional[Path] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
           address: Optional[str] = AddressOpt, wait: bool = WaitOpt, share: bool = ShareOpt,
           rows: Optional[str] = typer.Option(None, "--rows", help="Comma-separated ladder rows to run (default: "
                                              "all), e.g. ota,flowsteer-adv,flowsteer."),
           seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated training seeds (default: "
                                               "train.seeds), e.g. 0,1.")):
    """The ablation ladder from ONE store: teacher, generate once, train every ladder row (the rows each method
    declares) x train.seeds, evaluate and report them (docs/ablation.md). --rows / --seeds run part of it (other
    rows and seeds already trained keep their directories). With --share, several processes (or hosts) on the
    same config split the training runs: e.g. two `flowsteer ablate --share` with OMP_NUM_THREADS=1 on two cores."""
    from pipeline.ladder import LadderError, with_ladder

    try:
        cfg = with_ladder(get_config(config), _csv(rows, str, "--rows"), _csv(seeds, int, "--seeds"))
    except LadderError as exc:
        fail(str(exc))
    check_config(cfg)                     # the ladder's own runs (options, disc_blocks), before the teacher trains
    t0 = time.time()
    for name in STAGES:
        run_stage(name, cfg, executor, address, wait=wait or share, share=share)
    typer.echo(f"ablate: finished in {time.time() - t0:.1f}s")


def _csv(text: Optional[str], kind, flag: str) -> Optional[list]:
    """'a,b' -> [a, b] of `kind`; a bad item is one error line naming the flag."""
    if text is None:
        return None
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag}: '{text}' is not a comma-separated list of {kind.__name__} values")
    if not items:
        fail(f"{flag}: empty list")
    return items


@app.command()
def status(config: Optional[Path] = ConfigOpt,
           verify: bool = typer.Option(False, "--verify", help="Re-read finished outputs; corrupt units are "
                                       "marked for redo on the next run."),
           repair: bool = typer.Option(False, "--repair", help="With --verify: also delete an output whose "
                                       "metadata cannot be read (e.g. the trajectory store) so the next run rebuilds "
                                       "it (a damaged shard is marked for redo by --verify alone)."),
           wait: bool = WaitOpt):
    """Per stage: done / pending / failed unit counts read from the completion records. Exits 2 when any
    stage's config checks refuse the config (each is listed on its stage's row)."""
    cfg = get_config(config, checks=False)
    invalid = dict(config_problems(cfg))
    typer.echo(f"{'stage':10s} {'done':>6s} {'pending':>8s} {'failed':>7s}  dir")
    for name in STAGES:
        if name in invalid:
            typer.echo(f"{name:10s} {'-':>6s} {'-':>8s} {'-':>7s}  (config error: {invalid[name]})")
            continue
        mod = stage_module(name)
        try:
            jobs = mod.jobs(cfg)
        except (UserError, ConfigError) as exc:
            typer.echo(f"{name:10s} {'-':>6s} {'-':>8s} {'-':>7s}  ({exc})")
            continue
        for job in jobs:
            if verify and Path(job.out_dir).is_dir():
                try:
                    with StageLock(job.out_dir, wait=wait):     # verify drops records: one writer at a time
                        verify_job(mod, job, repair)
                except UserError as exc:
                    fail(str(exc))
            st = job_status(job)
            typer.echo(f"{name:10s} {st['done']:6d} {st['pending']:8d} {st['failed']:7d}  {st['dir']}")
            for err in st["errors"][:5]:
                typer.echo(f"    failed {err}")
    if invalid:
        problem = next(iter(invalid.values()))
        fail(f"{problem} ({len(invalid)} stage(s) refuse this config: {', '.join(invalid)})")


def verify_job(mod, job, repair: bool) -> None:
    """`status --verify`: a job-level problem (unreadable metadata) first, then each finished unit."""
    problem = mod.verify_job(job) if hasattr(mod, "verify_job") else None
    if problem:
        if repair:
            typer.echo(f"  corrupt: {job.stage}: {problem}; {mod.repair_job(job)}")
        else:
            typer.echo(f"  corrupt: {job.stage}: {problem}; nothing deleted (`flowsteer status --verify --repair` "
                       f"deletes it for a rebuild)")
        return
    for u in job.units if hasattr(mod, "verify_unit") else []:
        problem = mod.verify_unit(job, u)
        if problem:
            drop_record(job.out_dir, u.key)
            typer.echo(f"  corrupt: {job.stage}/{u.key}: {problem} (will be redone)")


@app.command()
def sample(checkpoint: str = typer.Argument("teacher", help="'teacher', a run name (a method or a "
                                            "train.variants key: its first train seed's student) or an export dir."),
           config: Optional[Path] = ConfigOpt,
           steps: int = typer.Option(4, "--steps", "-n", help="Number of sampler steps (NFE)."),
           schedule: str = typer.Option("fixed", help="Teacher grid: fixed (ends at 0) or diffusers (diffusers' "
                                       "default set_timesteps grid), the names evaluate.schedules uses."),
           guidance: Optional[float] = typer.Option(None, help="CFG scale (teacher only; default evaluate.guidance)."),
           prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="Prompts (default: the run's generate.prompts, first 10; the digits for the embedded teacher)."),
           per_prompt: int = typer.Option(8, help="Images per prompt."),
           seed: int = typer.Option(0),
           out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write.")):
    """Generate a PNG grid from the teacher or a student checkpoint with a chosen schedule and step count."""
    from pipeline.sample_cli import sample_grid

    cfg = get_config(config)
    try:
        path = sample_grid(cfg, checkpoint, steps, schedule, guidance, prompt, per_prompt, seed, out)
    except (UserError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {path}")


@app.command()
def export(target: str = typer.Argument(..., help="An export directory, or a run name of the config (its first "
                                        "train seed's export)."),
           config: Optional[Path] = ConfigOpt,
           merge: bool = typer.Option(False, "--merge", help="LoRA export: write transformer/ with the adapter "
                                      "fused into the teacher's weights (a full SD3Transformer2DModel), beside "
                                      "the adapter file; the model card says so.")):
    """Rewrite a finished export (`train` writes one per run): `--merge` fuses a LoRA student (docs/students.md)."""
    from pipeline.export import merge_cli

    if not merge:
        fail("export: nothing to do without --merge (train writes the export itself)")
    cfg = get_config(config)
    try:
        path = merge_cli(cfg, target)
    except (UserError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"export: merged transformer at {path}")


@app.command()
def plan(config: Optional[Path] = ConfigOpt,
         gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs the full student is sharded over (FSDP)."),
         gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=0.001,
                                                    help="GB per GPU to check against (default train.gpu_memory_gb)."),
         shape: Optional[str] = typer.Option(None, "--shape", help="Plan a public model's shape instead of the "
                                             "config's teacher: sd3-medium, sd3.5-large or flux-dev."),
         resolution: Optional[int] = typer.Option(None, "--resolution", min=8, help="--shape: image pixels (1024)."),
         throughput: Optional[float] = typer.Option(None, "--throughput", min=1e-9, help="Teacher forward rows "
                                                    "per second per GPU, for generate's GPU-hours."),
         batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Rows per step over all GPUs "
                                                  "(default train.batch_size)."),
         method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Runs to plan (default train.methods).")):
    """Memory per GPU (teacher, student, optimizer, EMA, discriminator, activations) for full/DDP, full/FSDP
    and LoRA, and what generate costs; from configs alone, no weights loaded (docs/students.md)."""
    from pipeline.plan import plan_cli

    cfg = get_config(config)
    try:
        typer.echo(plan_cli(cfg, gpus, gpu_memory, shape, resolution, throughput, method, batch_size))
    except (UserError, OSError) as exc:
        fail(str(exc))


@app.command()
def demo(config: Optional[Path] = ConfigOpt, executor: Optional[str] = ExecutorOpt,
         method: Optional[list[str]] = methods_option("Run names to train and score (default: train.methods).")):
    """Run every stage in order on the config (default: the embedded default)."""
    cfg = get_config(config)
    t0 = time.time()
    for name in STAGES:
        opts = {"methods": method} if method and name in ("train", "evaluate", "report") else {}
        run_stage(name, cfg, executor, **opts)
    typer.echo(f"demo: finished in {time.time() - t0:.1f}s")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
