"""Child processes end with the process that started them.

- **Notebook kernels** (``ichd run``): :func:`execute_notebook` is ``papermill.execute_notebook`` with
  :class:`GroupKernelManager`, which starts each kernel in its own process group (jupyter_client already
  gives it a new session) and a small watchdog process next to it. When the runner exits normally or is
  interrupted, the whole group (the kernel and whatever it started: DataLoader workers, pools) is
  terminated at kernel shutdown; when the runner is killed (``kill -9``, out of memory) the watchdog sees
  its parent gone and terminates the group within about a second (SIGTERM, then SIGKILL after
  :data:`GRACE_S`).
- **Worker pools** (ingest, cache): :func:`exit_with_parent` (a pool initializer) ends a worker process as
  soon as the process that created the pool is gone, instead of leaving it alive for minutes.

The kernels' environment (:func:`kernel_environment`), transport (:func:`quiet_kernel_config`, local IPC
sockets) and log file (:func:`file_logged_kernel_manager`) are set here too.

The watchdog is ``python -m ichdlib.procs watch PARENT_PID PGID``; it only ever signals the process group it
was given, and only after its own parent (the runner) has died or the group has already ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Seconds between SIGTERM and SIGKILL for a kernel's process group.
GRACE_S = 3.0
#: How often the watchdogs look at their parent (seconds).
POLL_S = 0.25


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: not ours to judge
        return True


def kill_group(pgid: int, grace: float = GRACE_S) -> None:
    """SIGTERM the process group ``pgid``, SIGKILL what is left after ``grace`` seconds."""
    if pgid <= 1 or pgid == os.getpgid(0):  # never our own group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive_group(pgid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def watch(parent: int, pgid: int) -> int:
    """Watchdog loop: terminate group ``pgid`` once ``parent`` is gone; return when the group has ended."""
    while _alive_group(pgid):
        if os.getppid() != parent:  # reparented: the runner died (robust against pid reuse)
            kill_group(pgid)
            return 0
        time.sleep(POLL_S)
    return 0


def start_watchdog(pgid: int) -> subprocess.Popen:
    """Start the watchdog of process group ``pgid`` as a child of this process (in a session of its own, so
    a Ctrl-C to the terminal does not kill it before it has done its job)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen(
        [sys.executable, "-m", "ichdlib.procs", "watch", str(os.getpid()), str(pgid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env, close_fds=True,
    )


def _kernel_manager_class() -> type:
    from jupyter_client import AsyncKernelManager  # noqa: PLC0415  (notebook machinery loads only to run notebooks)

    class GroupKernelManager(AsyncKernelManager):
        """A kernel in its own process group, ended with the runner (see the module docstring)."""

        _pgid: int | None = None
        _watchdog: subprocess.Popen | None = None

        async def _async_post_start_kernel(self, **kw: Any) -> None:
            await super()._async_post_start_kernel(**kw)
            proc = getattr(self.provisioner, "process", None)
            pid = getattr(proc, "pid", None)
            if pid is not None:
                try:
                    self._pgid = os.getpgid(pid)
                except ProcessLookupError:
                    self._pgid = None
                if self._pgid is not None and self._pgid != os.getpgid(0):
                    self._watchdog = start_watchdog(self._pgid)

        async def _async_shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
            try:
                await super()._async_shutdown_kernel(now=now, restart=restart)
            finally:
                self._end_group()

        shutdown_kernel = _async_shutdown_kernel

        def _end_group(self) -> None:
            if self._pgid is not None:
                kill_group(self._pgid, grace=1.0)  # the kernel's own children (workers) too
                self._pgid = None
            if self._watchdog is not None:
                with contextlib.suppress(OSError):
                    self._watchdog.wait(timeout=2 * GRACE_S)
                if self._watchdog.poll() is None:
                    self._watchdog.kill()
                    self._watchdog.wait()
                self._watchdog = None

        def __del__(self) -> None:  # an interrupted run that never reached shutdown
            with contextlib.suppress(Exception):
                self._end_group()

    return GroupKernelManager


_KM: type | None = None


def kernel_manager_class() -> type:
    """:class:`GroupKernelManager` (built on first use: jupyter_client is imported only by ``ichd run``)."""
    global _KM
    if _KM is None:
        _KM = _kernel_manager_class()
    return _KM


def execute_notebook(*args: Any, **kwargs: Any) -> Any:
    """``papermill.execute_notebook`` with each kernel in its own process group, ended with the runner."""
    import papermill as pm  # noqa: PLC0415  (notebook machinery loads only to run notebooks)

    kwargs.setdefault("kernel_manager_class", kernel_manager_class())
    return pm.execute_notebook(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# The kernel's environment, transport and log (what `ichd run` starts kernels with)
# --------------------------------------------------------------------------------------------------
#: Environment of a headless notebook kernel: static figures instead of widgets, no progress bars
#: (the training loops print one line per epoch), no library chatter.
KERNEL_ENV = {"ICHD_HEADLESS": "1", "TQDM_DISABLE": "1"}


@contextlib.contextmanager
def kernel_environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Set :data:`KERNEL_ENV` (the kernel inherits it at start) and restore the caller's environment after.

    ``MPLBACKEND`` is removed: the notebooks pick the inline backend themselves, so figures land in the
    executed notebook (``ichdlib.nb.setup``).
    """
    env = {**KERNEL_ENV, **(extra or {})}
    saved = {k: os.environ.get(k) for k in [*env, "MPLBACKEND"]}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_kernel_config(ipc_dir: Path) -> Any:
    """nbclient config: talk to the kernel over local IPC sockets in ``ipc_dir`` instead of TCP.

    Nothing listens on a network port, and ipykernel has no reason to print its "running over TCP without
    encryption" warning once per notebook.
    """
    from traitlets.config import Config  # noqa: PLC0415  (notebook machinery loads only to run notebooks)

    cfg = Config()
    cfg.KernelManager.transport = "ipc"
    cfg.KernelManager.ip = str(ipc_dir / "k")
    return cfg


def file_logged_kernel_manager(log_path: Path) -> type:
    """A kernel manager whose kernel writes its own stdout/stderr (start-up and shutdown chatter such as
    "KeyboardInterrupt caught in kernel" or asyncio's "Task was destroyed") to ``log_path``, not the console.

    Cell outputs are unaffected: they travel as messages into the executed notebook.
    """

    class FileLoggedKernelManager(kernel_manager_class()):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")  # noqa: SIM115 - the kernel process owns it; closed when we exit
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            try:
                await super()._async_launch_kernel(kernel_cmd, **kw)
            finally:
                log.close()  # the child holds its own copy of the descriptor

    return FileLoggedKernelManager


# --------------------------------------------------------------------------------------------------
# Worker pools
# --------------------------------------------------------------------------------------------------
def _exit_when_orphaned(parent: int) -> None:
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass
        time.sleep(POLL_S * 2)


def exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker as soon as process ``parent`` (the pool's owner) is gone."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="exit-with-parent").start()


def main(argv: list[str] | None = None) -> int:
    """``python -m ichdlib.procs watch PARENT_PID PGID``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "watch":
        print("usage: python -m ichdlib.procs watch PARENT_PID PGID", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return watch(int(argv[1]), int(argv[2]))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
