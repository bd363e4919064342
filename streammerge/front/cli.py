"""The command line: parses, calls the library, prints. No merge logic here.

Exit codes: 0 success, 1 a merge/input/config error (one line on stderr), 2 bad usage,
3 an unexpected internal error, 130 interrupted. `--debug` (or STREAMMERGE_DEBUG=1) shows tracebacks.
With `--json`, a failure also prints an error object on stdout (`error_object`).

Start-up stays light (click and the standard library): torch and the merge machinery are imported
inside the commands, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import re
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from streammerge import constants
from streammerge.errors import (
    CheckpointError,
    ConfigError,
    MismatchError,
    StreammergeError,
)
from streammerge.front import mergekit_flags

if TYPE_CHECKING:
    from streammerge.front.api import MergeResult
    from streammerge.front.config import MergeConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '1GiB' -> 2**30, '123' -> 123."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        return value if isinstance(value, int) else parse_size(value)


def _one_line(message: str) -> str:
    """Keeps an error on one line even when a file or tensor name holds a line break."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class _EchoHandler(logging.Handler):
    """The library's log records as the CLI's own stderr lines: `streammerge: warning: ...`.
    Echoed at emit time, so the line goes to whatever stderr is then."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"streammerge: {record.levelname.lower()}: {_one_line(record.getMessage())}", err=True)


def _show_logs(level: int) -> None:
    logger = logging.getLogger("streammerge")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    logger.setLevel(level)


def _quiet() -> None:
    """--quiet: no progress bars (huggingface_hub's download and upload bars too), warnings only."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    logging.getLogger("streammerge").setLevel(logging.WARNING)


def error_object(message: str, code: int, error: BaseException | None = None) -> dict:
    """What `--json` prints on stdout when a command fails (docs/mergekit.md, "--json errors"):
    {"ok": false, "status": "error", "error": {"code": exit code, "type": the error's class,
    "message": the one line of stderr, "what": the file, key or tensor it is about (or null),
    "problems": every problem, one per item}}."""
    what = None
    problems = [message]
    if isinstance(error, CheckpointError):
        what = error.path
    elif isinstance(error, MismatchError):
        problems = error.details
    elif isinstance(error, ConfigError):
        problems = error.problems
        what = _key_of(problems[0]) if len(problems) == 1 else None
    elif isinstance(error, click.UsageError) and error.ctx is not None and error.ctx.command is not None:
        what = error.ctx.command_path
    kind = "UsageError" if code == 2 else type(error).__name__ if error is not None else "Error"
    return {"ok": False, "status": "error",
            "error": {"code": code, "type": kind, "message": message, "what": what, "problems": problems}}


def _key_of(problem: str) -> str | None:
    """The config key or file a one-line problem starts with ('models[1].parameters.weight: ...')."""
    head, sep, _ = problem.partition(": ")
    return head if sep and " " not in head else None


def _wants_json() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def _fail(message: str, code: int = 1, error: BaseException | None = None) -> None:
    click.echo(f"streammerge: error: {_one_line(message)}", err=True)
    if _wants_json():
        click.echo(json.dumps(error_object(_one_line(message), code, error), indent=2))
    sys.exit(code)


def _collect_again() -> None:
    """Ends `run`'s pause of the garbage collector, once: what the start-up imported is frozen out of
    later collections."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def _run(debug: bool, fn, *args, **kwargs):
    """Calls the library, turning its errors into one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except StreammergeError as e:
        if debug or constants.DEBUG:
            raise
        _fail(str(e), 1, e)
    except click.ClickException:  # bad usage found while building the config: click prints it, exit 2
        raise
    except OSError as e:  # a full disk met where no library code expected it: still the clean error, not a bug
        if debug or constants.DEBUG or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            if debug or constants.DEBUG:
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)", 3)
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e} (disk full?); free some space and rerun "
              "the same command (finished shards are kept)")
    except KeyboardInterrupt as e:
        message = "interrupted; partial shards were removed, rerun the same command to merge again"
        click.echo(f"streammerge: {message}", err=True)
        if _wants_json():
            click.echo(json.dumps(error_object(message, 130, e), indent=2))
        sys.exit(130)
    except Exception as e:  # a bug of ours: say so, briefly
        if debug or constants.DEBUG:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)", 3, e)
    finally:  # the command's first call has imported what it needs (torch and the config, for a merge)
        _collect_again()


def _push_target(result: MergeResult, push_to_hub: str | None, what: str) -> str | None:
    """--push-to-hub's repo, or None (said on stderr) when this worker's share is not a finished model yet."""
    if push_to_hub and not result.finalized:
        click.echo(f"streammerge: --push-to-hub skipped: this worker's share is not a finished {what}; run "
                   f"streammerge push {result.output_dir} {push_to_hub} after streammerge finalize", err=True)
        return None
    return push_to_hub


def _worker_done(result: MergeResult, rank: int, world_size: int) -> str:
    return (f"worker {rank} of {world_size}: {len(result.shards)} shard(s) done in {result.seconds:.1f} s; when every "
            f"worker is done, run: streammerge finalize {result.output_dir}")


def _worker(debug: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's (rank, world size): torchrun's (initialising its process group), else the flags,
    else a Slurm job array's, else (0, 1)."""
    from streammerge.pipeline import distributed

    torchrun = distributed.torchrun_env()
    if torchrun is not None and (rank, world_size) != (None, None) and (rank, world_size) != torchrun:
        raise click.UsageError("--rank/--world-size are set by torchrun here; leave them out")
    if torchrun is not None:
        return _run(debug, distributed.init_torchrun)
    slurm = distributed.slurm_array_env() or (0, 1)
    return (slurm[0] if rank is None else rank), (slurm[1] if world_size is None else world_size)


def _supervise(output: str) -> None:
    """Runs the rest of this command in a forked child and waits for it, so that a merge killed by
    SIGBUS still ends with one line and exit 1. Inputs are read as mapped files: a file truncated
    while a block of it is being read kills the process on the spot (no Python code runs then), so
    this parent says which input changed, from the state folder's record of them. Signals sent to
    this process go to the child; the child dies with its parent; any other end of the child is
    passed on as it is (exit code, or the same signal). Not under torchrun, nor in process (tests)."""
    from streammerge.pipeline import distributed

    if distributed.torchrun_env() is not None or os.environ.get("STREAMMERGE_NO_SUPERVISOR", "") not in ("", "0"):
        return
    try:
        sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real process's streams (click's CliRunner)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    passed = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, passed | {signal.SIGCHLD})  # none lost between fork and wait
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        try:  # Linux: the child dies with the parent (a SIGKILL of the parent must stop the merge)
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        global _supervised_child
        _supervised_child = True
        return
    while True:
        info = signal.sigtimedwait(passed | {signal.SIGCHLD}, 1.0)
        # a terminal's Ctrl-C (si_code SI_KERNEL) reached the child too: sent once, not twice
        if info is not None and info.si_signo != signal.SIGCHLD and not (info.si_signo == signal.SIGINT and info.si_code == 0x80):
            os.kill(child, info.si_signo)
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            break
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS:
        from streammerge.constants import STATE_DIR
        from streammerge.front import api

        changed = api.changed_inputs(api._state_inputs(Path(output) / STATE_DIR))
        what = (f"{changed[0]}: changed while the merge read it" if changed else
                "an input file changed while the merge read it (the process got SIGBUS reading a mapped file)")
        _fail(f"{what}; the merge stopped and completed nothing more (no index): restore the file and rerun the same "
              "command (finished shards are kept)")
    if os.WIFSIGNALED(status):  # the same end as the child's (SIGKILL by the OOM killer, ...)
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _per_model(values: tuple[float, ...], n: int, name: str) -> list[float | None]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise ConfigError(f"--{name} given {len(values)} times for {n} models: give it once (all models) or once per --model")
    return list(values)


def _config_from_flags(o: dict) -> MergeConfig:
    from streammerge.front.config import MergeConfig, ModelSpec, load_yaml

    if not o["model"]:
        raise ConfigError("no models: pass a CONFIG.yaml, or --model (repeated) with --base and --method")
    if not o["method"]:
        raise ConfigError("no method: pass --method (e.g. ties, dare_ties, task_arithmetic, linear)")
    n = len(o["model"])
    weights, densities = _per_model(o["weight"], n, "weight"), _per_model(o["density"], n, "density")
    models = tuple(
        ModelSpec(m, {k: v for k, v in (("weight", w), ("density", d)) if v is not None})
        for m, w, d in zip(o["model"], weights, densities)
    )
    params: dict[str, Any] = {}
    if o["lambda_"] is not None:
        params["lambda"] = o["lambda_"]
    for item in o["param"]:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. --param normalize=false")
        params[key.strip()] = load_yaml(raw, f"--param {key.strip()}")
    return MergeConfig(
        method=o["method"], base=o["base"], models=models, parameters=params,
        include=tuple(o["include"]), exclude=tuple(o["exclude"]),
    )


def _build_config(config_path: str | None, o: dict) -> MergeConfig:
    from streammerge.front.config import MergeConfig

    if config_path is not None:
        flags = [f for f in ("base", "method", "lambda_") if o[f] is not None] + [f for f in ("model", "weight", "density", "param") if o[f]]
        if flags:
            raise click.UsageError(f"--{flags[0].rstrip('_').replace('_', '-')} cannot be combined with a CONFIG file; put it in the YAML")
        cfg = MergeConfig.from_yaml(config_path)
    else:
        cfg = _config_from_flags(o)

    def override(c: MergeConfig) -> MergeConfig:
        extra: dict[str, Any] = {}
        if config_path is not None and o["include"]:
            extra["include"] = c.include + tuple(o["include"])
        if config_path is not None and o["exclude"]:
            extra["exclude"] = c.exclude + tuple(o["exclude"])
        for key in ("semantics", "seed", "dtype", "out_dtype", "vocab"):
            if o[key] is not None:
                extra[key] = o[key]
        return replace(c, **extra) if extra else c

    cfg = override(cfg)
    if cfg.recipe is not None:  # a recipe's stages: as if each ran with this command line (docs/recipes.md)
        cfg = replace(cfg, recipe=cfg.recipe.map(override))
    return cfg


def _merge_options(f):
    options = [
        click.option("--base", help="Base model: a folder, a .safetensors file or a Hub repo id org/name[@revision]."),
        click.option("--model", multiple=True, help="A fine-tuned model, local or org/name[@revision] (repeat for each)."),
        click.option("--method", help="ties, dare_ties, task_arithmetic, linear, della, slerp (with --param t=0.5), ..."),
        click.option("--weight", type=float, multiple=True, help="Weight: once for all models, or once per --model."),
        click.option("--density", type=float, multiple=True, help="Density: once for all models, or once per --model."),
        click.option("--lambda", "lambda_", type=float, help="Global scale λ of the merged task vector."),
        click.option("--param", multiple=True, metavar="KEY=VALUE", help="Other parameters, e.g. normalize=false, merge_func=sum."),
        click.option("--semantics", type=click.Choice(["default", "mergekit", "peft", "fusionbench"]), help="Reproduce a reference implementation."),
        click.option("--seed", type=int, help="Seed of the DARE masks (default 0)."),
        click.option("--dtype", help="mergekit's compute dtype; also the output dtype unless --out-dtype."),
        click.option("--out-dtype", "out_dtype", help="Output dtype (default: the base's); float8_e4m3fn writes fine-grained FP8 (docs/quantized.md)."),
        click.option("--include", multiple=True, metavar="GLOB", help="Merge only tensors matching (others copied from the base)."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Copy tensors matching from the base."),
        click.option("--max-shard-size", type=Size(), default=str(constants.DEFAULT_MAX_SHARD_SIZE), show_default="5GB"),
        click.option("--max-memory", type=Size(), default=str(constants.DEFAULT_MAX_MEMORY), show_default="1GiB", help="Working memory for tensor blocks."),
        click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="The compiled CPU kernels (C, built when streammerge is installed): auto uses them when they were built, "
                          "else numpy or torch; on requires them; off uses numpy or torch. Same bytes either way."),
        click.option("--check-finite", is_flag=True, help="Fail if any input or merged tensor holds NaN or Inf."),
        click.option("--verify-inputs", is_flag=True,
                     help="Record digests of the input bytes each shard is built from; a resume checks them "
                          "(default: each input's size, time and header)."),
        click.option("--device", default="auto", show_default=True, help="auto (a GPU when there is one), cpu, cuda, cuda:N."),
        click.option("--gpu-memory", type=Size(), help="GPU memory for a block's working set (default: 80% of the free memory)."),
        click.option("--threads", type=click.IntRange(1), help="CPU threads for the arithmetic (default: all cores)."),
        click.option("--vocab", type=click.Choice(["error", "truncate_to_base", "truncate_to_smallest"]),
                     help="When vocabulary sizes differ (default: error)."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _push_options(f):
    options = [
        click.option("--push-to-hub", metavar="ORG/NAME", help="Upload the merged model to this Hub repo (created if needed)."),
        click.option("--private", is_flag=True, help="Create the Hub repo private."),
        click.option("--hub-branch", metavar="BRANCH", help="Push to this branch of the Hub repo (created if needed; default main)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _worker_options(what: str):
    """--rank and --world-size of a split `what` (merge, build)."""
    def add(f):
        f = click.option("--world-size", type=click.IntRange(1),
                         help=f"Number of workers splitting the {what} (default: $SLURM_ARRAY_TASK_COUNT, or 1).")(f)
        return click.option("--rank", type=click.IntRange(0),
                            help=f"This worker's index in a split {what} (default: in a Slurm job array, "
                                 "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN; else 0).")(f)
    return add


def _push(debug: bool, output_dir: Path, repo_id: str, private: bool, branch: str | None, quiet: bool, upload=None) -> str:
    """Pushes a finished merge; with `upload` (a hub.HubUpload), its shards are already on their way."""
    from streammerge.io.hub import push_to_hub

    if upload is not None:
        url = _run(debug, upload.commit, output_dir)
    else:
        url = _run(debug, push_to_hub, output_dir, repo_id, private=private, branch=branch)
    if not quiet:
        click.echo(f"pushed {output_dir} to {repo_id}" + (f" (branch {branch})" if branch else "") + f": {url}")
    return url


def _positional(args: tuple[str, ...], needs_output: bool) -> tuple[str | None, str | None]:
    if needs_output:
        if len(args) == 2:
            return args[0], args[1]
        if len(args) == 1:
            return None, args[0]
        raise click.UsageError("expected CONFIG.yaml OUTPUT_DIR, or OUTPUT_DIR with --base/--model/--method")
    if len(args) > 1:
        raise click.UsageError("expected at most one CONFIG.yaml")
    return (args[0] if args else None), None


class _Group(click.Group):
    """With --json among a command's arguments, a usage error also prints the JSON error object on stdout."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["all_args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if "--json" in ctx.meta.get("all_args", []):
                click.echo(json.dumps(error_object(_one_line(e.format_message()), e.exit_code, e), indent=2))
            raise


class _RawArgs(click.Command):
    """Keeps the command's own arguments as typed (ctx.meta["raw_args"]): --multi-gpu's torchrun line repeats them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


def _version() -> str:
    from streammerge import __version__

    return __version__


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(_version(), package_name="streammerge")
def main() -> None:
    """Merge LLM checkpoints (DARE, TIES, task arithmetic) tensor by tensor, in bounded memory."""
    _show_logs(logging.INFO)  # warnings, and what a run decided (resuming, a fallback); --quiet keeps warnings only


@main.command(cls=_RawArgs, epilog="Every mergekit-yaml 0.1.5 flag is accepted too (--cuda, --out-shard-size, "
              "--random-seed, --no-copy-tokenizer, --allow-crimes, -v, ...): docs/mergekit.md says what each does here.")
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] OUTPUT_DIR")
@_merge_options
@click.option("--force", is_flag=True, help="Replace a previous merge in OUTPUT_DIR.")
@click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bar or summary.")
@_worker_options("merge")
@click.option("--delete-downloaded", is_flag=True, help="Delete Hub input shards this run downloaded once no tensor needs them.")
@click.option("--download-budget", type=Size(), help="Disk for downloaded Hub input shards at once, e.g. 50GB (implies --delete-downloaded).")
@click.option("--intermediate-dir", "-I", "intermediate_dir", type=click.Path(file_okay=False),
              help="A recipe (several YAML documents): also write each named stage to DIR/NAME (docs/recipes.md).")
@_push_options
@mergekit_flags.options
def merge(args: tuple[str, ...], force: bool, quiet: bool, as_json: bool, debug: bool, rank: int | None,
          world_size: int | None, push_to_hub: str | None, private: bool, hub_branch: str | None, **o: Any) -> None:
    """Merge models into OUTPUT_DIR, from a mergekit-style CONFIG.yaml or from flags.

    Under torchrun every process takes its share of the shards and rank 0 finalizes; with --rank
    and --world-size (or in a Slurm job array) workers run independently and
    `streammerge finalize OUTPUT_DIR` completes the merge once all are done.
    """
    from streammerge.pipeline import distributed

    config_path, output = _positional(args, needs_output=True)
    ctx = click.get_current_context()
    if o.get("out_shard_size") is not None and ctx.get_parameter_source("max_shard_size") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--out-shard-size (mergekit's) and --max-shard-size set the same limit; give one of them")
    mapped, info = mergekit_flags.resolve(o, ctx.meta.get("raw_args", []))
    o.update(mapped)
    _verbosity(quiet, o.get("verbosity", 0))
    for line in info:
        logging.getLogger("streammerge.cli").info("%s", line)
    if o.get("hub_cache"):  # --transformers-cache: where huggingface_hub puts (and finds) downloads
        from huggingface_hub import constants as hf_constants

        hf_constants.HF_HUB_CACHE = str(Path(o["hub_cache"]).expanduser())
    _supervise(output)
    cfg = _run(debug, _build_config, config_path, o)
    if push_to_hub and "@" in push_to_hub:
        raise click.UsageError("--push-to-hub takes ORG/NAME; give the branch with --hub-branch")
    torchrun = distributed.torchrun_env()
    rank, world_size = _worker(debug, rank, world_size)
    upload = None
    if push_to_hub and world_size == 1:  # shards upload as each is final; no write access fails here, before the merge
        from streammerge.io.hub import HubUpload

        upload = _run(debug, HubUpload, push_to_hub, private=private, branch=hub_branch)
    try:
        if o.get("intermediate_dir") is not None:
            cfg = _write_stages(debug, cfg, o, force, quiet or rank != 0, rank, world_size, torchrun is not None, as_json)
        result = _run(debug, _merge_with_progress, cfg, output, o, force, quiet or rank != 0, rank, world_size,
                      upload.add_shard if upload is not None else None)
    finally:
        distributed.shutdown()
    if torchrun is not None and rank != 0:  # rank 0 speaks for the job
        return
    push = _push_target(result, push_to_hub, "merge")
    if as_json:
        pushed = _push(debug, result.output_dir, push, private, hub_branch, True, upload) if push else None
        click.echo(json.dumps({"ok": True, "status": "ok", **result.summary(), **({"pushed": pushed} if pushed else {})}, indent=2))
        return
    if quiet:
        pass
    elif not result.finalized:
        click.echo(_worker_done(result, rank, world_size))
    elif result.already_complete:
        click.echo(f"{result.output_dir} already holds this merge, complete ({len(result.shards)} shard(s)); nothing to do")
    else:
        resumed = f" ({result.reused_shards} shard(s) kept from an interrupted run)" if result.reused_shards else ""
        click.echo(
            f"merged {result.merged_tensors}/{result.tensors} tensors into {len(result.shards)} shard(s){resumed}, "
            f"{result.total_size / 1e9:.3f} GB, in {result.seconds:.1f} s -> {result.output_dir}"
        )
    if push:
        _push(debug, result.output_dir, push, private, hub_branch, quiet, upload)


def _write_stages(debug: bool, cfg: MergeConfig, o: dict, force: bool, quiet: bool, rank: int, world_size: int,
                  torchrun: bool, as_json: bool = False) -> MergeConfig:
    """--intermediate-dir: each named stage of the recipe merged into DIR/NAME, as mergekit-multi does;
    returns the final merge, reading them from there."""
    from streammerge.front import recipe

    if cfg.recipe is None:
        raise click.UsageError("--intermediate-dir: the config is not a recipe (several YAML documents, the stages with name:)")
    if world_size > 1 and not torchrun:  # a stage must be finished before the next reads it: nobody would wait
        raise click.UsageError("--intermediate-dir cannot be combined with independent workers (--world-size > 1): run it as "
                               "one process or under torchrun, or leave it out (the stages are then computed, not written)")

    def run(stage: MergeConfig, folder: Path) -> None:
        result = _run(debug, _merge_with_progress, stage, str(folder), o, force, quiet, rank, world_size)
        if not quiet and not as_json:  # stdout holds only the JSON summary with --json
            done = "already complete" if result.already_complete else f"{len(result.shards)} shard(s) in {result.seconds:.1f} s"
            click.echo(f"stage {folder.name}: {done} -> {folder}")

    return _run(debug, recipe.write_stages, cfg, o["intermediate_dir"], run)


def _verbosity(quiet: bool, verbosity: int) -> None:
    """--quiet: warnings only; -v: debug lines too; else warnings and info (what a run decided)."""
    if quiet:
        _quiet()
    elif verbosity:
        logging.getLogger("streammerge").setLevel(logging.DEBUG)


def _merge_with_progress(cfg: MergeConfig, output: str, o: dict, force: bool, quiet: bool, rank: int = 0,
                         world_size: int = 1, on_shard_file=None) -> MergeResult:
    from tqdm.auto import tqdm

    from streammerge.front import api

    if quiet:
        _quiet()
    with tqdm(unit="B", unit_scale=True, desc="merging", disable=True if quiet else None, file=sys.stderr) as bar:

        def set_total(total: int) -> None:  # known once the merge has planned (inputs are opened once)
            bar.total = total
            bar.refresh()

        return api.merge(cfg, output, max_shard_size=o["max_shard_size"], max_memory=o["max_memory"], force=force,
                         progress=bar.update, compile=o.get("compile_mode", "auto"), check_finite=o.get("check_finite", False),
                         device=o.get("device", "auto"), gpu_memory=o.get("gpu_memory"), threads=o.get("threads"), rank=rank, world_size=world_size,
                         delete_downloaded=o.get("delete_downloaded", False), download_budget=o.get("download_budget"),
                         on_shard_file=on_shard_file, on_total=set_total, copy_tokenizer=o.get("copy_tokenizer", True),
                         write_model_card=o.get("write_model_card", True), shard_order=o.get("shard_order", "file"),
                         allow_crimes=o.get("allow_crimes", False), verify_inputs=o.get("verify_inputs", False))


@main.command()
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml]")
@_merge_options
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor with its parameters.")
@click.option("--world-size", type=click.IntRange(1), default=1, help="Show which shards each of this many workers writes.")
@click.option("--out-shard-size", type=mergekit_flags.KmbSize(), help="mergekit's shard size (5B, 500M): its split, as merge does.")
@click.option("--allow-crimes", is_flag=True, help="Allow models of different architectures (mergekit's flag).")
def plan(args: tuple[str, ...], as_json: bool, debug: bool, show_tensors: bool, world_size: int, out_shard_size: int | None,
         allow_crimes: bool, **o: Any) -> None:
    """Dry run: what will be merged and how, the output shards, peak memory and disk. Reads no weights."""
    from streammerge.front import api

    config_path, _ = _positional(args, needs_output=False)
    cfg = _run(debug, _build_config, config_path, o)
    order = "file"
    if out_shard_size is not None:
        o["max_shard_size"], order = mergekit_flags.shard_limit(out_shard_size), "name"
    p = _run(debug, api.plan, cfg, max_shard_size=o["max_shard_size"], max_memory=o["max_memory"], shard_order=order,
             allow_crimes=allow_crimes)
    labels = [p.reference, *p.sources]
    tensors = [
        {"name": t.name, "shape": list(t.shape), "dtype": t.out_dtype, "merged": t.merged, "dare": t.dare,
         "weights": list(t.weights), "densities": list(t.densities), "lambda": t.lam, **dict(t.params),
         **({"reads": [[labels[i], n] for i, n in t.inputs], "scale": t.scale} if t.inputs else {})}
        for t in p.tensors
    ]
    summary = {
        "method": cfg.method_name,
        "semantics": cfg.semantics,
        "reference": p.reference,
        "models": list(p.sources),
        "tensors": len(p.tensors),
        "merged_tensors": sum(t.merged for t in p.tensors),
        "shards": [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.nbytes} for s in p.shards],
        "input_bytes": p.input_bytes,
        "output_bytes": p.total_size,
        "estimated_peak_memory": p.peak_memory,
        "options": p.options.as_strings(),
    }
    if p.layers is not None:
        summary["layers"] = p.layers
    if cfg.recipe is not None:  # the stages, in the order they are computed, then the final merge
        from streammerge.front.recipe import graph

        summary["recipe"] = graph(cfg)
    summary["quantized_inputs"] = {label: how for label, how in p.quantized_inputs}
    summary["fp8_tensors"] = sum(t.quantized for t in p.tensors)
    if world_size > 1:
        shares = [api.worker_shards(p, r, world_size) for r in range(world_size)]
        summary["workers"] = [{"rank": r, "shards": [s.filename for s in share], "input_bytes": sum(s.input_bytes for s in share)}
                              for r, share in enumerate(shares)]
    if as_json:
        click.echo(json.dumps({"ok": True, **summary, **({"tensor_plan": tensors} if show_tensors else {})}, indent=2))
        return
    for node in summary.get("recipe", []):
        reads = ", ".join(f"stage {r}" if r in node["stage_reads"] else r for r in node["reads"])
        what = f"stage {node['name']}" if node["name"] is not None else "final merge"
        dtype = node["dtype"] or "in the inputs' dtypes"
        click.echo(f"{what}: {node['method']}, output {dtype}, reads {reads}")
    if "recipe" in summary:
        click.echo("the stages are computed tensor by tensor as the final merge reads them: no intermediate checkpoint")
    click.echo(f"method {summary['method']} ({summary['semantics']} semantics), reference {p.reference}")
    for path in p.sources:
        click.echo(f"  model {path}")
    for label, how in p.quantized_inputs:
        click.echo(f"  {label}: {how}")
    if summary["fp8_tensors"] or cfg.out_dtype == "float8_e4m3fn":
        click.echo(f"{summary['fp8_tensors']} tensors written as FP8 (float8_e4m3fn, 128x128 blocks, weight_scale_inv; "
                   "linear weights of whole blocks only)")
    if p.layers is not None:
        click.echo(f"{p.layers} output layers stacked from {len(cfg.output_slices())} slice(s)")
    copied_from = "their slice's model" if p.layers is not None else "the reference"
    click.echo(f"{summary['merged_tensors']} of {summary['tensors']} tensors merged, the rest copied from {copied_from}")
    click.echo(f"reads {p.input_bytes / 1e9:.3f} GB, writes {p.total_size / 1e9:.3f} GB in {len(p.shards)} shard(s)")
    click.echo(f"estimated peak working memory {p.peak_memory / 2**20:.1f} MiB (budget {p.max_memory / 2**20:.0f} MiB)")
    for w in summary.get("workers", []):
        click.echo(f"  worker {w['rank']}: {len(w['shards'])} shard(s), reads {w['input_bytes'] / 1e9:.3f} GB")
    if show_tensors:
        for t in tensors:
            what = ("dare " if t["dare"] else "") + ("merge" if t["merged"] else "copy")
            params = f"t={t['t']}" if "t" in t else f"w={t['weights']} d={t['densities']} λ={t['lambda']}"
            reads = (f" scale={t['scale']:g}" if t.get("scale", 1.0) != 1.0 else "") + "".join(
                f" <- {Path(m).name}:{n}" for m, n in t.get("reads", []))
            click.echo(f"  {t['name']} {t['shape']} {t['dtype']} {what} {params}{reads}")


@main.command("push")
@click.argument("output_dir")
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--hub-branch", metavar="BRANCH", help="Push to this branch (created if needed; default main).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def push(output_dir: str, repo_id: str, private: bool, hub_branch: str | None, quiet: bool, debug: bool) -> None:
    """Upload a finished merge in OUTPUT_DIR to the Hub repo ORG/NAME (shards first, the index in the last commit)."""
    if quiet:
        _quiet()
    _push(debug, Path(output_dir), repo_id, private, hub_branch, quiet)


@main.command()
@click.argument("directory", default="streammerge-demo", required=False)
@click.option("--force", is_flag=True, help="Rebuild the demo models in DIRECTORY (or build them in a folder that holds other files).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--debug", is_flag=True)
def demo(directory: str, force: bool, quiet: bool, debug: bool) -> None:
    """Build a tiny Llama-shaped base and two fine-tunes in DIRECTORY, and merge them (dare_ties).

    Run again, it reuses the models an earlier run built there and merges them again."""
    from streammerge.front.config import MergeConfig
    from streammerge.front.demo import DEMO_CONFIG, build_demo_models, is_demo_folder

    root = Path(directory)
    if root.exists() and not root.is_dir():
        _fail(f"{root}: exists and is not a directory; choose another place for the demo")
    config_path = root / "merge.yaml"
    reuse = not force and is_demo_folder(root)
    if not reuse and root.exists() and any(root.iterdir()) and not force:
        _fail(f"{root}: not empty, and not a streammerge demo folder; choose another place, or pass --force to build the demo there")
    if reuse:
        if not quiet:
            click.echo(f"reusing the demo models an earlier run built in {root}/ (--force rebuilds them); merging again")
    else:
        _run(debug, build_demo_models, root)
        config_path.write_text(DEMO_CONFIG)
        if not quiet:
            click.echo(f"built base and 2 fine-tunes in {root}/, config {config_path}")
    cfg = _run(debug, MergeConfig.from_yaml, config_path)
    opts = {"max_shard_size": 200_000, "max_memory": constants.DEFAULT_MAX_MEMORY}
    result = _run(debug, _merge_with_progress, cfg, str(root / "merged"), opts, True, quiet)
    if not quiet:
        click.echo(
            f"merged {result.merged_tensors}/{result.tensors} tensors into {len(result.shards)} shards in "
            f"{result.seconds:.2f} s -> {result.output_dir}/ (the same as: streammerge merge {config_path} {result.output_dir})"
        )


@main.command("finalize")
@click.argument("output_dir")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def finalize_command(output_dir: str, as_json: bool, debug: bool) -> None:
    """Complete a merge split over workers: check every shard's receipt, write the index.

    Exit code 1 naming the missing shards (and their workers) if some are not done.
    """
    from streammerge.front import api

    result = _run(debug, api.finalize, output_dir)
    if as_json:
        click.echo(json.dumps({"ok": True, "status": "ok", **result.summary()}, indent=2))
    elif result.already_complete:
        click.echo(f"{result.output_dir} is already complete ({len(result.shards)} shard(s))")
    else:
        click.echo(f"finalized {result.output_dir}: {len(result.shards)} shard(s), {result.total_size / 1e9:.3f} GB")


@main.command("inspect")
@click.argument("base")
@click.argument("models", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (keys: docs/inspect.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the numbers per layer into this PNG (needs matplotlib).")
@click.option("--threshold", type=click.FloatRange(min=0, min_open=True), default=0.005, show_default=True,
              help="|delta| counted as large (DARE breaks down above 0.005).")
@click.option("--summary", is_flag=True, help="Only the whole-model rows, no per-layer groups (table output).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_command(base: str, models: tuple[str, ...], as_json: bool, plot_path: str | None, threshold: float, summary: bool,
                    debug: bool) -> None:
    """Before merging: the task vectors of MODELS (checkpoints or LoRA adapters) against BASE, per layer.

    |delta| distribution and the fraction above the threshold per model (DARE is likely to hurt when
    it is large), cosine similarity and sign-conflict rate per pair, tensors whose shapes differ.
    """
    from streammerge.front.inspect import format_report, inspect_deltas, plot_report

    report = _run(debug, inspect_deltas, base, list(models), threshold=threshold)
    if plot_path is not None:
        _run(debug, plot_report, report, plot_path)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(format_report(report, groups=not summary))
        if plot_path is not None:
            click.echo(f"plot: {plot_path}")
    for warning in report.warnings:
        click.echo(f"streammerge: warning: {_one_line(warning)}", err=True)


@main.command("verify")
@click.argument("output_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify_command(output_dir: str, as_json: bool, debug: bool) -> None:
    """Check a merged OUTPUT_DIR: re-read every shard, check the index and each shard's sha256.

    Exit code 0 if intact, 1 with each problem on its own line if not.
    """
    from streammerge.io.verify import verify

    report = _run(debug, verify, output_dir)
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
    elif report.ok:
        how = "" if report.sha256_checked else " (no streammerge manifest: no sha256 compared)"
        click.echo(f"ok: {report.shards} shards, {report.tensors} tensors verified{how}")
    else:
        for problem in report.problems:
            click.echo(f"streammerge: error: {_one_line(problem)}", err=True)
    if not as_json:
        for note in report.notes:
            click.echo(f"streammerge: info: {_one_line(note)}", err=True)
    sys.exit(0 if report.ok else 1)


@main.command("methods")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print every method's declaration as JSON on stdout.")
def methods_command(name: str | None, as_json: bool) -> None:
    """List the merge methods (what `merge_method:` takes): parameters, defaults, paper, where each runs.

    With NAME, that method alone.
    """
    from streammerge.methods.registry import describe

    methods = [m for m in describe() if name is None or m["name"] == name]
    if name is not None and not methods:
        _fail(f"no merge method {name!r}; `streammerge methods` lists them")
    if as_json:
        click.echo(json.dumps(methods, indent=2, ensure_ascii=False))
        return
    for m in methods:
        most = "any number of" if m["models"][1] is None else f"at most {m['models'][1]}"
        click.echo(f"{m['name']}: {m['summary']}")
        click.echo(f"  reference: {m['reference']}")
        click.echo(f"  inputs: base_model {m['base']}; at least {m['models'][0]}, {most} model(s) besides it")
        click.echo(f"  semantics: {', '.join(m['semantics'])}; stats passes: {m['stats']}; runs on: {', '.join(m['paths'])}")
        for p in m["params"]:
            default = p["default"] if p["default"] is not None else "required" if p["per_tensor"] else "by method and preset"
            presets = "".join(f", {k}: {v}" for k, v in p.get("preset_defaults", {}).items())
            where = ("per model" if p["per_model"] else "whole merge") + (", filters/gradients" if p["per_tensor"] else "")
            click.echo(f"    {p['name']} = {default}{presets} ({where}) {p['doc']}")
        click.echo("")


@main.command("extract-lora", epilog="mergekit-extract-lora's flags work too (--model/--base-model/--out-path, "
              "--max-rank, --sv-epsilon, --embed-lora, --save-module, -i/-e, --skip-undecomposable, --cuda, ...): "
              "docs/extract-lora.md.")
@click.argument("args", nargs=-1, metavar="FINETUNE OUTPUT_DIR")
@click.option("--base", "--base-model", "base", help="The base model: a folder, a .safetensors file or a Hub repo id.")
@click.option("--model", "model_opt", hidden=True, help="mergekit's spelling of FINETUNE.")
@click.option("--out-path", "out_path", hidden=True, help="mergekit's spelling of OUTPUT_DIR.")
@click.option("--rank", "--max-rank", "rank", type=click.IntRange(1), default=128, show_default=True,
              help="Largest rank of each factored weight.")
@click.option("--sv-epsilon", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Drop singular values at or below this (mergekit's absolute threshold).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True),
              help="Per tensor, the fewest components keeping this fraction of ||tau||_F^2 (e.g. 0.9), at most --rank.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="sqrt(S) on both factors (else A = S Vh, B = U).")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="Factor embeddings and the output head too (default: store them whole, modules_to_save).")
@click.option("--save-module", multiple=True, metavar="NAME", help="Store this module whole (a leaf name or a full module name).")
@click.option("--include-regex", "-i", multiple=True, metavar="REGEX", help="Factor only modules matching.")
@click.option("--exclude-regex", "-e", multiple=True, metavar="REGEX", help="Leave out modules matching.")
@click.option("--skip-undecomposable", is_flag=True, help="Leave out changed tensors that are not 2-D weights (norms) instead of storing them whole.")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="auto: exact where the tensor's SVD fits --max-memory, else randomized.")
@click.option("--oversample", type=click.IntRange(0), default=10, show_default=True, help="Randomized SVD: extra columns.")
@click.option("--power-iters", type=click.IntRange(0), default=2, show_default=True, help="Randomized SVD: power iterations.")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Factors' dtype (default: the fine-tune's).")
@click.option("--max-memory", type=Size(), default=str(constants.DEFAULT_MAX_MEMORY), show_default="1GiB", help="Working memory.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--cuda", is_flag=True, hidden=True, help="mergekit's: --device cuda.")
@click.option("--threads", "-j", "--num-threads", "threads", type=click.IntRange(1), help="CPU threads (the same bytes with any).")
@click.option("--force", is_flag=True, help="Replace a previous extraction in OUTPUT_DIR.")
@click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bar or table.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@_push_options
@click.option("-v", "verbosity", count=True, hidden=True)
@click.option("--transformers-cache", hidden=True)
@click.option("--lora-merge-cache", hidden=True)
@click.option("--lora-merge-dtype", hidden=True)
@click.option("--out-shard-size", hidden=True)
@click.option("--write-threads", hidden=True)
@click.option("--allow-crimes/--no-allow-crimes", "--trust-remote-code/--no-trust-remote-code", "--lazy-unpickle/--no-lazy-unpickle",
              "--low-cpu-memory/--no-low-cpu-memory", "--read-to-gpu/--no-read-to-gpu", "--multi-gpu/--no-multi-gpu",
              "--async-write/--no-async-write", "--copy-tokenizer/--no-copy-tokenizer", "--clone-tensors/--no-clone-tensors",
              "--write-model-card/--no-write-model-card", "--safe-serialization/--no-safe-serialization",
              "--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", "--gpu-rich", "moot", default=None, hidden=True)
def extract_lora_command(args: tuple[str, ...], base: str | None, model_opt: str | None, out_path: str | None, as_json: bool,
                         debug: bool, quiet: bool, force: bool, push_to_hub: str | None, private: bool, hub_branch: str | None,
                         **o: Any) -> None:
    """Extract a PEFT LoRA adapter: FINETUNE - BASE factored per weight (SVD, rank <= --rank) into OUTPUT_DIR.

    Prints per tensor the rank used and the relative Frobenius error ||tau - B A|| / ||tau||.
    """
    from streammerge.pipeline import extract

    positional = list(args)
    if model_opt is not None:
        positional.insert(0, model_opt)
    if out_path is not None:
        positional.append(out_path)
    if len(positional) != 2:
        raise click.UsageError("expected FINETUNE OUTPUT_DIR (or mergekit's --model FINETUNE --out-path OUTPUT_DIR)")
    if base is None:
        raise click.UsageError("--base BASE is required: the model FINETUNE was fine-tuned from")
    if push_to_hub and "@" in push_to_hub:
        raise click.UsageError("--push-to-hub takes ORG/NAME; give the branch with --hub-branch")
    finetune, output = positional
    _verbosity(quiet, o.pop("verbosity", 0))
    for name in ("transformers_cache", "lora_merge_cache", "lora_merge_dtype", "out_shard_size", "write_threads"):
        if o.get(name) is not None:
            logging.getLogger("streammerge.cli").info("mergekit's --%s: extract-lora does not use it, ignored",
                                                      name.replace("_", "-"))
    if o.pop("moot") is not None:
        logging.getLogger("streammerge.cli").info("mergekit flags about its own engine (--allow-crimes, --lazy-unpickle, "
                                                  "--low-cpu-memory, --multi-gpu, --copy-tokenizer, ...): ignored by extract-lora")
    if o.pop("cuda"):
        o["device"] = "cuda" if o["device"] == "auto" else o["device"]
    options = extract.ExtractOptions(
        max_rank=o["rank"], sv_epsilon=o["sv_epsilon"], energy=o["energy"], distribute_scale=o["distribute_scale"],
        embed_lora=o["embed_lora"], save_modules=tuple(o["save_module"]), include=tuple(o["include_regex"]),
        exclude=tuple(o["exclude_regex"]), skip_undecomposable=o["skip_undecomposable"], svd=o["svd"],
        oversample=o["oversample"], power_iters=o["power_iters"], seed=o["seed"], dtype=o["dtype"])
    from tqdm.auto import tqdm

    with tqdm(unit="B", unit_scale=True, desc="extracting", disable=True if quiet else None, file=sys.stderr) as bar:

        def set_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        result = _run(debug, extract.extract_lora, finetune, output, base=base, options=options, max_memory=o["max_memory"],
                      device=o["device"], threads=o["threads"], force=force, progress=bar.update, on_total=set_total)
    pushed = _run(debug, extract.push_adapter, result.output_dir, push_to_hub, private=private, branch=hub_branch) \
        if push_to_hub else None
    if as_json:
        click.echo(json.dumps({"ok": True, "status": "ok", **result.summary(), **({"pushed": pushed} if pushed else {})},
                              indent=2))
        return
    if quiet:
        return
    if result.already_complete:
        click.echo(f"{result.output_dir} already holds this extraction, complete; nothing to do")
    else:
        click.echo(format_extract_table(result))
        resumed = f" ({result.reused} tensor(s) kept from an interrupted run)" if result.reused else ""
        click.echo(f"wrote {result.output_dir}/ ({result.bytes / 1e6:.1f} MB) in {result.seconds:.1f} s{resumed}")
    if pushed:
        click.echo(f"pushed {result.output_dir} to {push_to_hub}" + (f" (branch {hub_branch})" if hub_branch else "") + f": {pushed}")


def format_extract_table(result) -> str:
    """extract-lora's table: one line per tensor: rank, relative error, how it was factored."""
    rows = [("tensor", "shape", "rank", "rel. error", "how")]
    for t in result.tensors:
        if t.method == "unchanged":
            continue
        error = f"{t.error:.3e}" if t.kind in ("lora", "embedding") else "-"
        rank = str(t.rank) if t.kind in ("lora", "embedding") else "whole"
        rows.append((t.name, "x".join(map(str, t.shape)), rank, error, t.method))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    unchanged = sum(t.method == "unchanged" for t in result.tensors)
    return "\n".join(lines) + (f"\n({unchanged} tensor(s) equal to the base: left out)" if unchanged else "")


@main.command("moe", epilog="mergekit-moe's flags about its own engine (--cuda, --lazy-unpickle, --load-in-4bit, -v, ...) "
              "are accepted and ignored; docs/moe.md.")
@click.argument("config_path", metavar="CONFIG.yaml")
@click.argument("output", metavar="OUTPUT_DIR")
@click.option("--force", is_flag=True, help="Replace a previous output in OUTPUT_DIR.")
@click.option("--quiet/--no-quiet", "-q", default=False, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--max-shard-size", type=Size(), default=str(constants.DEFAULT_MAX_SHARD_SIZE), show_default="5GB")
@click.option("--out-shard-size", type=mergekit_flags.KmbSize(), help="mergekit's shard limit (5B = 5e9 bytes).")
@click.option("--max-memory", type=Size(), default=str(constants.DEFAULT_MAX_MEMORY), show_default="1GiB",
              help="Working memory for tensor blocks.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: all cores).")
@click.option("--random-seed", "--seed", "seed", type=int, default=0, show_default=True,
              help="Seed of random gates and expert noise (mergekit-moe's --random-seed gives its random gates).")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Build it even if every expert is the same model.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, help="Write the base's tokenizer (default: yes).")
@click.option("--write-model-card/--no-write-model-card", default=True, help="Write README.md and mergekit_moe_config.yml.")
@_worker_options("build")
@_push_options
@click.option("--load-in-4bit", "--load-in-8bit", "--cuda/--no-cuda", "--lazy-unpickle/--no-lazy-unpickle",
              "--low-cpu-memory/--no-low-cpu-memory", "--read-to-gpu/--no-read-to-gpu", "--multi-gpu/--no-multi-gpu",
              "--allow-crimes/--no-allow-crimes", "--trust-remote-code/--no-trust-remote-code", "--gpu-rich",
              "--async-write/--no-async-write", "--clone-tensors/--no-clone-tensors", "--safe-serialization/--no-safe-serialization",
              "moot", default=None, hidden=True)
@click.option("-v", "verbosity", count=True, hidden=True)
@click.option("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--device", "--write-threads", "-j",
              "--num-threads", "moot_value", hidden=True)
def moe_command(config_path: str, output: str, force: bool, quiet: bool, as_json: bool, debug: bool, max_shard_size: int,
                out_shard_size: int | None, max_memory: int, threads: int | None, seed: int, allow_all_same: bool,
                copy_tokenizer: bool, write_model_card: bool, rank: int | None, world_size: int | None,
                push_to_hub: str | None, private: bool, hub_branch: str | None,
                moot: Any, verbosity: int, moot_value: Any) -> None:
    """Build a Mixtral (or Qwen2-MoE, Qwen3-MoE) from a base and dense experts, from a mergekit-moe CONFIG.yaml.

    Expert tensors are streamed into the output shards in bounded memory; a rerun resumes. Split over
    workers as `merge` is (torchrun, or --rank/--world-size then `streammerge finalize`) (docs/moe.md).
    """
    from tqdm.auto import tqdm

    from streammerge.front import moe as moe_front
    from streammerge.front.moe_config import MoEConfig
    from streammerge.pipeline import distributed

    _verbosity(quiet, verbosity)
    if moot is not None or moot_value is not None:
        logging.getLogger("streammerge.cli").info("mergekit-moe flags about its own engine are ignored here (docs/moe.md)")
    if push_to_hub and "@" in push_to_hub:
        raise click.UsageError("--push-to-hub takes ORG/NAME; give the branch with --hub-branch")
    if out_shard_size is not None:
        max_shard_size = mergekit_flags.shard_limit(out_shard_size)
    _supervise(output)
    cfg = _run(debug, MoEConfig.from_yaml, config_path)
    torchrun = distributed.torchrun_env()
    rank, world_size = _worker(debug, rank, world_size)
    upload = None
    if push_to_hub and world_size == 1:
        from streammerge.io.hub import HubUpload

        upload = _run(debug, HubUpload, push_to_hub, private=private, branch=hub_branch)
    try:
        with tqdm(unit="B", unit_scale=True, desc="moe", disable=True if quiet or rank != 0 else None, file=sys.stderr) as bar:

            def set_total(total: int) -> None:
                bar.total = total
                bar.refresh()

            result = _run(debug, moe_front.build_moe, cfg, output, max_shard_size=max_shard_size, max_memory=max_memory,
                          force=force, progress=bar.update, on_total=set_total, seed=seed, allow_all_same=allow_all_same,
                          copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, threads=threads,
                          on_shard_file=upload.add_shard if upload is not None else None, rank=rank, world_size=world_size)
    finally:
        distributed.shutdown()
    if torchrun is not None and rank != 0:  # rank 0 speaks for the job
        return
    push_to_hub = _push_target(result, push_to_hub, "MoE")
    pushed = _push(debug, result.output_dir, push_to_hub, private, hub_branch, True if as_json else quiet, upload) \
        if push_to_hub else None
    if as_json:
        click.echo(json.dumps({"ok": True, "status": "ok", **result.summary(), **({"pushed": pushed} if pushed else {})},
                              indent=2))
    elif not result.finalized and not quiet:
        click.echo(_worker_done(result, rank, world_size))
    elif result.already_complete and not quiet:
        click.echo(f"{result.output_dir} already holds this MoE, complete ({len(result.shards)} shard(s)); nothing to do")
    elif not quiet:
        resumed = f" ({result.reused_shards} shard(s) kept from an interrupted run)" if result.reused_shards else ""
        click.echo(f"built a {result.tensors}-tensor MoE into {len(result.shards)} shard(s){resumed}, "
                   f"{result.total_size / 1e9:.3f} GB, in {result.seconds:.1f} s -> {result.output_dir}")


_supervised_child = False  # this process is _supervise's child: `run` ends it with os._exit
_gc_paused = False  # `run` paused the garbage collector for the start-up's imports


def run() -> None:
    """The console script: `main`, and a supervised child ends with os._exit once its output is
    flushed, skipping the interpreter's teardown (~0.4 s with torch loaded, for nothing: the parent
    reports the end, and a forked child must not run the parent's exit handlers anyway)."""
    # Before torch loads OpenMP: its idle threads sleep rather than spin after each parallel torch op
    # of the main thread, which took the cores from the compute and writer threads (an arcee_fusion
    # merge spent 6 % of its samples spinning in libgomp: 12.9 -> 12.0 s). The user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Importing torch creates a million objects, and the collections they trigger find nothing to
    # free: 0.3 of the 2.3 CPU-s the imports take here. Paused until the command's first library call.
    global _gc_paused
    _gc_paused = gc.isenabled()
    gc.disable()
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if not _supervised_child:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run()
