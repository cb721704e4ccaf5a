"""Server subprocesses for the benchmarks, and the resident memory of a process tree (Linux ``/proc``).

Every server is started in a process group of its own, so that stopping it also stops whatever it
started, and a Ctrl-C in the terminal reaches only the benchmark, whose ``finally`` then stops them all.
On Linux each server is also told to die with the benchmark (``PR_SET_PDEATHSIG``), for the one case no
``finally`` runs: the benchmark itself killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

MiB = 2**20


def write_results(out: str | os.PathLike, res: dict, text: str) -> None:
    """A benchmark's record: ``<out>.json`` (``res``, indented) and ``<out>.md`` (``text``), folder created."""
    import json

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    path.with_suffix(".md").write_text(text)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows: for every benchmark's record."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tree_pids(pid: int, limit: int = 10_000) -> list[int]:
    """``pid`` and all its live descendants (``/proc/<pid>/task/<tid>/children``), at most ``limit``."""
    seen, order = {pid}, [pid]
    i = 0
    while i < len(order) and len(order) < limit:
        p = order[i]
        i += 1
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:  # exited meanwhile
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in map(int, children):
                if c not in seen:
                    seen.add(c)
                    order.append(c)
    return order


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of one process (bytes); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (sum of their ``VmRSS``; pages shared between them
    count once per process)."""
    return sum(rss_bytes(p) for p in tree_pids(pid))


def _own_group_and_die_with_parent() -> None:  # runs in the child, between fork and exec
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the finally clauses still stop every server
        pass


class ServerProcesses:
    """Starts servers and stops them; :meth:`stop_all` (also on exceptions and Ctrl-C) leaves none running."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict[str, str], cwd: str | Path, log_path: str | Path) -> subprocess.Popen:
        """Run ``cmd`` in a new session (its own process group), stdout and stderr to ``log_path``."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_own_group_and_die_with_parent)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s`` seconds."""
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=grace_s)
        # the group may outlive its leader (a child it started): make sure nothing of it is left
        self._signal(proc, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            try:
                self.stop(proc, grace_s=10.0)
            except Exception:  # noqa: BLE001  (best effort: go on with the others)
                pass

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group id is the leader's pid (setsid)
        except (ProcessLookupError, PermissionError):
            pass


def machine_busy_cpu_s() -> float:
    """CPU seconds all CPUs of the machine have spent busy since boot (``/proc/stat``: user, nice, system,
    irq, softirq, steal); 0 where there is no ``/proc/stat``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in fields[1:9]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children it has waited for (a stopped server, once reaped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_with_servers(prefix: str, body) -> int:
    """``body(procs, work)`` with a :class:`ServerProcesses` and a fresh temporary folder ``work`` (``work/logs``
    made): a SIGTERM is handled as Ctrl-C (in the main thread), every server is stopped and ``work`` removed
    however it ends. Returns ``body``'s exit status, or 130 when interrupted."""
    import shutil
    import tempfile
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # kill: clean-up as on Ctrl-C
    procs = ServerProcesses()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "logs").mkdir()
    try:
        return body(procs, work)
    except KeyboardInterrupt:
        print("interrupted: stopping every server", flush=True)
        return 130
    finally:
        procs.stop_all()
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(work, ignore_errors=True)


def log_tail(folder: str | os.PathLike, pattern: str, lines: int = 8) -> list[str]:
    """The last ``lines`` lines of the first log in ``folder`` matching ``pattern`` ([] when there is none): what a
    benchmark keeps of a server that failed."""
    logs = sorted(Path(folder).glob(pattern))
    return logs[0].read_text(errors="replace").strip().splitlines()[-lines:] if logs else []
