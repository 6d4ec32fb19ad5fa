"""W&B tracking: one run per training run (sweep trial, final run, ``msam train``), offline
by default.

:class:`WandbCallback` plugs into the trainer's callbacks (``msam`` itself never imports wandb).
A run holds the resolved train config, per-epoch history (``train/loss``, ``val/acc``, ...) and the
outcome in its summary. Mode ``auto`` is online only where credentials exist, so sweeps run
anywhere and ``msam sync`` (:func:`sync_run`) uploads later. W&B trouble never fails a trial: it is
a warning, and training goes on untracked.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import secrets
import string
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msam.callbacks import Callback
from msam.errors import UserError
from sweeps.layout import RunFolder

__all__ = [
    "HISTORY_KEYS",
    "WandbCallback",
    "find_offline_runs",
    "has_credentials",
    "own_service",
    "resolve_mode",
    "start_service",
    "sync_run",
]

#: Trainer metric -> W&B history key.
HISTORY_KEYS = {
    "epoch": "epoch",
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "lr": "lr",
    "images_per_s": "images_per_s",
}
#: Seconds a process waits for W&B's background service: many workers start it at once.
SERVICE_WAIT_S = 300
_OK_STATUSES = ("complete", "pruned")


def has_credentials() -> bool:
    """True when W&B can log in without asking: WANDB_API_KEY, or a netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """online | offline | disabled: ``WANDB_MODE`` wins; ``auto`` = online with credentials."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return mode


def new_run_id() -> str:
    """A W&B-style run id (8 lowercase letters and digits), known before the run starts."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _warn(message: str, exc: BaseException | None = None) -> None:
    detail = f" ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})" if exc else ""
    warnings.warn(f"W&B: {message}{detail}; training continues untracked", RuntimeWarning, 2)


class WandbCallback(Callback):
    """One W&B run per training run, started when the trainer starts.

    ``job_type``: tune (sweep trials), final, train (``msam train``), leaderboard, bench.
    ``extra_config`` is merged into the logged config next to the resolved train config (a sweep
    adds the trial's parameters and ids). With ``finish_on_end`` the run ends with the trainer;
    otherwise the owner calls :meth:`finish` with the outcome it decided (pruned, failed, ...).
    ``seconds`` is the time spent in W&B calls, so the sweep can report its own overhead.
    """

    def __init__(
        self,
        *,
        project: str = "msam",
        group: str | None = None,
        job_type: str = "train",
        name: str | None = None,
        tags: Sequence[str] = (),
        extra_config: Mapping[str, Any] | None = None,
        mode: str = "auto",
        entity: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        resume: str | None = None,
        finish_on_end: bool = True,
    ) -> None:
        self.project = project
        self.group = group
        self.job_type = job_type
        self.name = name
        self.tags = list(dict.fromkeys(str(t) for t in tags if t))
        self.extra_config = dict(extra_config or {})
        self.mode = resolve_mode(mode)
        self.entity = entity
        self.dir = Path(dir) if dir is not None else None
        self.finish_on_end = finish_on_end
        self._run_id = run_id or new_run_id()
        #: ``"allow"``: continue the run of ``run_id`` if W&B has it (a rerun finishing it).
        self.resume = resume
        self.run: Any = None
        self.seconds = 0.0
        self._summary: dict[str, Any] = {}
        self._finished = False
        #: True once a started run was finished without error: W&B holds what the files hold.
        #: Stays False when ``wandb.init`` or ``finish`` failed (a warning said so), so an owner
        #: that records the run's state does not claim a run that W&B never got.
        self.closed = False

    @classmethod
    def from_train_config(cls, config: Any, **kwargs: Any) -> WandbCallback:
        """Project, mode, entity and tags from a TrainConfig's ``tracking.wandb`` section."""
        wb = config.tracking.wandb
        tags = [config.optim.name, config.model.name, config.data.dataset, *wb.tags]
        kwargs.setdefault("name", config.name)
        kwargs.setdefault("tags", tags)
        return cls(project=wb.project, mode=wb.mode, entity=wb.entity, **kwargs)

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    @property
    def run_id(self) -> str | None:
        """The run's id (chosen up front, so it can be recorded before training starts)."""
        return self._run_id if self.enabled else None

    # ------------------------------------------------------------------ trainer hooks

    def on_train_start(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        if not self.enabled or self.run is not None or self._finished:
            return
        t0 = time.perf_counter()
        try:
            self.run = self._init({**dict(config), "info": dict(info), **self.extra_config})
        except Exception as exc:  # W&B must never fail a training run
            _warn("could not start a run", exc)
            self.run = None
        self.seconds += time.perf_counter() - t0

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        row = {
            key: metrics[name]
            for name, key in HISTORY_KEYS.items()
            if metrics.get(name) is not None
        }
        self.log(row)
        return None

    def on_resume(self, history: Sequence[Mapping[str, Any]]) -> None:
        """A run continued from a checkpoint logs the epochs done before: its history is whole."""
        for metrics in history:
            self.on_epoch_end(int(metrics.get("epoch", 0)), metrics)

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self._summary.update(summary)
        if self.finish_on_end:
            self.finish(status=summary.get("status"), reason=summary.get("reason"))

    # ------------------------------------------------------------------ direct use

    def log(self, row: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        t0 = time.perf_counter()
        try:
            self.run.log(dict(row))
        except Exception as exc:
            _warn("could not log", exc)
        self.seconds += time.perf_counter() - t0

    def finish(
        self,
        status: str | None = None,
        reason: str | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """End the run with its outcome in the summary: status (complete, pruned, failed,
        diverged, ...) and reason. Safe to call twice and when no run started."""
        if self._finished:
            return
        self._finished = True
        if self.run is None:
            return
        t0 = time.perf_counter()
        final = {**self._summary, **dict(summary or {})}
        if status is not None:
            final["status"] = status
        final["reason"] = reason if reason is not None else final.get("reason")
        try:
            self.run.summary.update({k: v for k, v in final.items() if v is not None})
        except Exception as exc:
            _warn("could not write the summary", exc)
        try:
            self.run.finish(exit_code=0 if final.get("status") in (*_OK_STATUSES, None) else 1)
            self.closed = True
        except Exception as exc:
            _warn("could not finish the run", exc)
        self.seconds += time.perf_counter() - t0

    def _init(self, config: dict[str, Any]) -> Any:
        import wandb

        os.environ.setdefault("WANDB__SERVICE_WAIT", str(SERVICE_WAIT_S))
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off",
            silent=True,
            x_disable_stats=True,
            x_disable_machine_info=True,
            disable_git=True,
            disable_code=True,
            save_code=False,
            x_save_requirements=False,
            x_service_wait=float(SERVICE_WAIT_S),
        )
        return wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            job_type=self.job_type,
            name=self.name,
            tags=self.tags,
            config=config,
            dir=str(self.dir) if self.dir is not None else None,
            mode=self.mode,
            id=self._run_id,
            resume=self.resume,
            reinit="create_new",
            settings=settings,
        )


def own_service() -> None:
    """Forget a W&B service inherited from the parent process, so that this command starts its
    own (which ends with it).

    W&B hands its service to child processes through ``WANDB_SERVICE``. A top-level command
    (``msam sweep``, ``msam train``) started from a process that runs W&B (a notebook, a test
    runner, a script) would otherwise log into that process's service: a run of an msam process
    killed with ``kill -9`` then stays open there ("run ID ... is in use"), and the rerun that
    should continue it cannot; a service that has ended leaves nothing to connect to at all.
    ``msam worker``s keep their launcher's service on purpose: it ends with the launcher.
    """
    os.environ.pop("WANDB_SERVICE", None)


def start_service(mode: str = "auto") -> None:
    """Start W&B's background service now (about a second), not inside the first trial."""
    if resolve_mode(mode) == "disabled":
        return
    os.environ.setdefault("WANDB__SERVICE_WAIT", str(SERVICE_WAIT_S))
    try:
        import wandb

        wandb.setup()
    except Exception as exc:
        _warn("could not start the service", exc)


# ----------------------------------------------------------------------------- offline runs


def find_offline_runs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The offline run folders under a sweep's folder (or its ``wandb`` folder), oldest first."""
    root = Path(run_dir)
    if root.name.startswith("offline-run-"):
        return [root]
    wandb_dir = RunFolder(root).wandb if RunFolder(root).wandb.is_dir() else root
    return sorted(p for p in wandb_dir.glob("offline-run-*") if p.is_dir())


#: Seconds to wait for W&B's server to accept a connection before ``msam sync`` gives up.
SYNC_CONNECT_TIMEOUT_S = 5.0
#: Seconds ``wandb sync`` may take in all (``MSAM_SYNC_TIMEOUT`` overrides it).
SYNC_TIMEOUT_S = 600.0


def _server() -> tuple[str, str, int]:
    """W&B's server as ``(url, host, port)``, from ``WANDB_BASE_URL`` (default api.wandb.ai)."""
    from urllib.parse import urlsplit

    url = os.environ.get("WANDB_BASE_URL", "").strip() or "https://api.wandb.ai"
    parts = urlsplit(url if "://" in url else f"https://{url}")
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        raise UserError(f"WANDB_BASE_URL {url}: not a URL with a valid port") from None
    if not parts.hostname:
        raise UserError(f"WANDB_BASE_URL {url}: not a URL with a host")
    return url, parts.hostname, port


def _check_reachable() -> None:
    """One TCP connection to W&B's server within seconds, or a one-line UserError: without it
    ``wandb sync`` retries for minutes on a refused or unroutable address."""
    import socket

    url, host, port = _server()
    try:
        socket.create_connection((host, port), timeout=SYNC_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError) or "timed out" in str(exc):
            reason = f"no answer in {SYNC_CONNECT_TIMEOUT_S:g} s"
        raise UserError(
            f"cannot reach W&B at {url} ({reason}); nothing was uploaded and the offline runs "
            "are kept: rerun msam sync when the server can be reached"
        ) from None


def _sync_timeout() -> float:
    raw = os.environ.get("MSAM_SYNC_TIMEOUT", "").strip()
    if not raw:
        return SYNC_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"MSAM_SYNC_TIMEOUT={raw}: must be a number of seconds above 0")
    return value


def sync_run(run_dir: str | os.PathLike[str]) -> int:
    """``msam sync RUN_DIR``: upload the offline runs of a sweep with ``wandb sync``.

    The server is tried first (a few seconds); ``wandb sync`` then runs in its own process group
    under a time limit. When it fails or runs out of time, the ``.syncstate`` files it left are
    removed, so the run folder is as it was and a later ``msam sync`` starts afresh.
    """
    runs = find_offline_runs(run_dir)
    if not runs:
        print(f"no offline W&B runs under {run_dir}", file=sys.stderr)
        return 0
    if not has_credentials():
        raise UserError(
            "W&B has no credentials here: run `wandb login` or set WANDB_API_KEY, then rerun "
            "msam sync"
        )
    timeout = _sync_timeout()
    _check_reachable()
    before = {p for run in runs for p in run.parent.rglob("*.syncstate")}
    command = [sys.executable, "-m", "wandb", "sync", *map(str, runs)]
    # In the run folder: W&B writes its CLI log under ./wandb, which belongs there.
    proc = subprocess.Popen(command, start_new_session=True, cwd=runs[0].parent.parent)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if code == 0:
        return 0
    for left in {p for run in runs for p in run.parent.rglob("*.syncstate")} - before:
        left.unlink(missing_ok=True)
    if code is None:
        raise UserError(
            f"wandb sync did not finish in {timeout:g} s (MSAM_SYNC_TIMEOUT); stopped it, the "
            "offline runs are kept: rerun msam sync"
        )
    raise UserError(f"wandb sync failed (exit status {code}); the offline runs are kept")
