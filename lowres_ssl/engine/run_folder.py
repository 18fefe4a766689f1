"""The run folder: which checkpoint to resume, what may change on resume, what a run writes,
and that every process of a launch sees the same folder (several machines).

A new folder gets ``config.yaml`` when setup has succeeded (a failed start leaves none); a
folder holding a run is never overwritten without ``--resume``, and ``--resume`` refuses a
config that differs in anything but the keys below. The finished run writes the backbone
(:mod:`lowres_ssl.weights`), ``skipped_files.txt`` and ``summary.json``, each atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from lowres_ssl import run_layout
from lowres_ssl.config import (
    TASK_KEYS,
    Config,
    dump_yaml,
    flatten,
    from_dict,
    load_yaml,
    to_dict,
    upgrade,
)
from lowres_ssl.errors import UserError
from lowres_ssl.files import held, write_text_atomic
from lowres_ssl.plan import resolve_views
from lowres_ssl.run_layout import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

log = logging.getLogger("lowres_ssl")

#: Keys that may change between a run and its resumption (they do not change what is learnt,
#: or only extend it).
RESUMABLE_KEYS = {
    "preset",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "data.num_workers",
    "data.cache_dir",
    "train.micro_batch_size",  # the card it runs on; the objective stays the batch's
    "train.time_budget",  # a resumed run keeps the total its budget chose
}
#: Sections that may change on resume as a whole (the kNN monitor only observes training).
RESUMABLE_SECTIONS = ("eval.",)


def _as_run(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config as its run trained it: read into today's keys, with its ``photos``
    overlay applied where its views were photos (a config saved before the overlay kept
    photo values in keys of their own)."""
    values = upgrade(saved)
    if not values.get("photos") or not isinstance(values.get("data", {}).get("load_size"), int):
        return values
    cfg, _ = resolve_views(from_dict(values))
    return to_dict(cfg)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved → current`` for each key that differs and matters for resuming."""
    a, b = flatten(_as_run(saved)), flatten(current)
    # A key the saved config lacks (written before the key existed) had its default then.
    defaults = flatten(to_dict(Config()))
    a = {**{k: v for k, v in defaults.items() if k not in a and k in b}, **a}
    keys = sorted((set(a) | set(b)) - RESUMABLE_KEYS)
    # The photos overlay is compared as what it resolved to (the keys it set).
    keys = [k for k in keys if not k.startswith((*RESUMABLE_SECTIONS, "photos."))]
    # "auto" stands for what it resolved to: in the current config, what the run started
    # with; in a config saved before plans were resolved whole, what this one resolved to.
    keys = [k for k in keys if "auto" not in (a.get(k), b.get(k))]
    keys = [k for k in keys if not (k in TASK_KEYS and a.get(k) is None)]  # the task's
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run started with (its ``config.yaml``), as nested dicts."""
    return load_yaml(run_dir / CONFIG_FILE)


def check_run_folder(run_dir: Path, cfg: Config, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh). Raises :class:`UserError` for a
    folder that holds another run, or ``resume`` with nothing to resume."""
    saved = run_dir / CONFIG_FILE
    last = run_layout.latest(run_dir)
    if saved.is_file() and last is None:
        # A start that failed before its first checkpoint: nothing to keep or to continue.
        return None
    if resume:
        if not saved.is_file():
            raise UserError(f"--resume: {run_dir} holds no run (no config.yaml); drop --resume")
        diffs = config_differences(load_yaml(saved), to_dict(cfg))
        if diffs:
            raise UserError(
                f"--resume: the run in {run_dir} was made with another config ({'; '.join(diffs)}"
                "); resume with the same settings or start a new --out"
            )
        intact, damaged = run_layout.latest_intact(run_dir)
        if intact is None:
            raise UserError(
                f"--resume: no intact checkpoint in {run_dir} ({'; '.join(damaged)}); start a "
                "new --out"
            )
        if damaged:
            log.warning(
                "--resume: passing over damaged checkpoint%s (%s); resuming from %s",
                "s" if len(damaged) > 1 else "",
                "; ".join(damaged),
                intact.name,
            )
        return intact
    if saved.is_file():
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it, or a new --out"
        )
    if run_dir.exists() and any(run_dir.iterdir()):
        if not only_leftovers(run_dir):
            raise UserError(f"{run_dir} is not empty and holds no run; choose a new --out")
        log.info("%s holds what a start killed before its config left; starting afresh", run_dir)
    return None


#: What a run writes into its folder besides ``config.yaml``: a folder holding nothing else and
#: no complete checkpoint is what a start stopped early left (an older version of the kit
#: made the folder before its config), not another run.
LEFTOVERS = {CHECKPOINTS_DIR, METRICS_FILE, run_layout.TENSORBOARD_DIR, run_layout.SKIPPED_FILE}


def only_leftovers(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but :data:`LEFTOVERS` and no complete checkpoint."""
    names = {p.name for p in run_dir.iterdir()}
    return names <= LEFTOVERS and not run_layout.checkpoints(run_dir)


@contextlib.contextmanager
def exclusive(run_dir: Path, accelerator=None) -> Iterator[None]:
    """One training per run folder: the main process holds an advisory lock
    (:func:`lowres_ssl.files.held`: a killed run leaves nothing stuck) while the block runs. A
    second training into the folder gets a one-line error naming the process that holds it;
    the other processes of the same launch share the main process's lock, once each has shown
    that it sees the main process's folder (:func:`check_seen_by_every_process`)."""
    main = accelerator is None or accelerator.is_main_process
    several = accelerator is not None and accelerator.num_processes > 1
    with contextlib.ExitStack() as stack:
        problem = token = None
        if main:
            try:
                stack.enter_context(held(run_layout.lock_path(run_dir), partial(_busy, run_dir)))
            except UserError as err:
                problem = str(err)
            if several and problem is None:
                token = _write_token(run_dir)
        if several:
            from accelerate.utils import broadcast_object_list

            problem, token = broadcast_object_list([problem, token])
        if problem:
            raise UserError(problem)
        if several:
            check_seen_by_every_process(run_dir, token, accelerator)
        yield


def _busy(run_dir: Path, holder: str) -> str:
    return (
        f"{run_dir} is in use by {holder}; wait for it to finish (or stop it), or choose "
        "another --out"
    )


def _token_path(run_dir: Path, token: str) -> Path:
    """The file that shows a process sees ``run_dir``: beside it, with its lock, since a new
    run's folder appears only once setup has succeeded; a random name, so no copy elsewhere
    and no cached lookup of an earlier check can stand in for it."""
    return run_dir.parent / f".{run_dir.name}.seen-{token}"


def _write_token(run_dir: Path) -> str:
    """On the main process: a new token file beside ``run_dir``; returns its token."""
    token = secrets.token_hex(8)
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # held() makes it, where there is flock
    _token_path(run_dir, token).touch(exist_ok=False)
    return token


def check_seen_by_every_process(run_dir: Path, token: str, accelerator) -> None:
    """Every process looks for the main process's token file at its own ``run_dir`` (which
    each resolves in its own working directory, on its own machine); the outcomes meet in one
    collective, and every process raises the same one-line :class:`UserError` when one does
    not see it. Unchecked, such a machine writes its part of each checkpoint (its random
    states) into a folder of its own, and fails a ``--resume`` with a misleading line while
    the others stop on a lost connection."""
    from accelerate.utils import gather_object

    here = (_token_path(run_dir, token).is_file(), socket.gethostname(), str(run_dir.absolute()))
    views = gather_object([here])
    if accelerator.is_main_process:
        _token_path(run_dir, token).unlink(missing_ok=True)
    blind: dict[tuple[str, str], list[int]] = {}
    for rank, (seen, host, path) in enumerate(views):
        if not seen:
            blind.setdefault((host, path), []).append(rank)
    if blind:
        _, main_host, main_path = views[0]
        raise UserError(_unseen_message(main_host, main_path, blind))


def _unseen_message(main_host: str, main_path: str, blind: dict[tuple[str, str], list[int]]) -> str:
    """One line: which processes, on which host and where, do not see the main's folder."""
    who = " and ".join(
        f"process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on {host} (at "
        f"{path})"
        for (host, path), ranks in blind.items()
    )
    return (
        f"{who} cannot see the run folder of the main process ({main_path} on {main_host}); put "
        "--out on a folder every machine mounts at the same path"
    )


def create(run_dir: Path, cfg: Config, resuming: bool) -> None:
    """Make the folder. A new run's folder appears whole: built beside it under a temporary
    name with its ``config.yaml`` and renamed (onto an empty folder too), so a run killed at
    any moment leaves no folder or one that ``--resume`` continues. A folder that a start
    stopped early left (:func:`check_run_folder` let it through) gets a new ``config.yaml``
    and no stale metrics."""
    if resuming:
        (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        (run_dir / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        write_text_atomic(run_dir / CONFIG_FILE, dump_yaml(cfg))
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(run_dir)
    tmp = run_dir.parent / f".{run_dir.name}.new-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / CHECKPOINTS_DIR).mkdir(parents=True)
    write_text_atomic(tmp / CONFIG_FILE, dump_yaml(cfg))
    os.rename(tmp, run_dir)  # onto an empty folder too (POSIX rename)


def _remove_stale_builds(run_dir: Path) -> None:
    """The temporary folders of starts whose process has died."""
    for p in run_dir.parent.glob(f".{run_dir.name}.new-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, OSError):
            continue


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))


__all__ = [
    "RESUMABLE_KEYS",
    "RESUMABLE_SECTIONS",
    "check_run_folder",
    "check_seen_by_every_process",
    "config_differences",
    "create",
    "exclusive",
    "only_leftovers",
    "read_summary",
    "write_summary",
]
