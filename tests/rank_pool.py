"""A persistent pool of gloo ranks for multi-rank CPU tests.

Starting a rank means importing torch + Megatron-Core (seconds), so `RankPool` starts its
workers once, joins them into one gloo group, and runs many tasks on them:

    with RankPool(2) as pool:
        results = pool.run(my_task, x, scale=2.0)  # my_task(x, scale=2.0) on each rank; results[rank]

Tasks are module-level functions (pickled by reference) with picklable arguments and results;
they set up Megatron's parallel state and seeds themselves, and the worker resets both after.
Worker output is forwarded to stdout as "[rank r] ..." lines. On an exception, a dead worker
or a timeout the pool raises (RankTaskError, WorkerDiedError, RankTaskTimeout) and restarts.
"""
import atexit
import faulthandler
import io
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (its atexit hook joins our workers: it must run after ours)
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported once by the forkserver, so a (re)started worker is a fork with them already loaded:
# ~0.1-0.5 s per restart instead of ~8 s of imports per rank with "spawn".
PRELOAD_MODULES = [__name__, "torch.distributed", "megatron.core.models.gpt", "megatron.core.distributed",
                   "megatron.core.pipeline_parallel", "megatron_kha"]
_ERROR_GRACE_S = 0.5  # after a first failure, how long to wait for the other ranks' reports
_TAIL_CHARS = 6000
_INF = float("inf")


class RankTaskError(RuntimeError):
    """A task raised: `rank` (lowest failing), `exc_type` (name), `original` (None if unpicklable)."""
    def __init__(self, message, rank, exc_type, original):
        super().__init__(message)
        self.rank, self.exc_type, self.original = rank, exc_type, original


class WorkerDiedError(RuntimeError):
    """A worker exited during a task or at startup. exitcodes: {rank: exit code}."""
    def __init__(self, message, exitcodes):
        super().__init__(message)
        self.exitcodes = exitcodes


class RankTaskTimeout(TimeoutError):
    """A task (or the startup) did not finish on every rank within its timeout."""


# ---- worker side ---------------------------------------------------------------------------


def _dumps(obj):
    """Plain pickle, not multiprocessing's: that one moves tensors into shared memory, one fd
    each, and fds must stay flat over thousands of tasks. Detaches autograd outputs (they refuse
    to pickle) and copies views (pickle would send their whole storage)."""
    import torch

    class Pickler(pickle.Pickler):
        def reducer_override(self, t):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                return NotImplemented
            is_view = t.untyped_storage().nbytes() > t.numel() * t.element_size()
            if t.grad_fn is None and not is_view:
                return NotImplemented
            return (t.detach().clone() if is_view else t.detach()).__reduce_ex__(pickle.HIGHEST_PROTOCOL)

    Pickler(buf := io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _error_reply(exc, stage=""):
    cls = type(exc)
    exc_type = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    reply = ("err", exc_type, str(exc)[:2000], stage + traceback.format_exc())
    try:
        pickle.loads(pickle.dumps(exc))  # some exceptions pickle but do not unpickle
        return reply + (exc,)
    except Exception:  # noqa: BLE001
        return reply + (None,)


def _reset_after_task():
    import torch
    import torch.distributed as dist
    from megatron.core import num_microbatches_calculator, parallel_state

    parallel_state.destroy_model_parallel()  # also drops the global memory buffer
    num_microbatches_calculator.destroy_num_microbatches_calculator()
    # Every group a task creates (Megatron's, new_group) holds sockets and threads: without
    # destroying them, 100 tasks leaked ~7,500 fds and the pool hung.
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    dist.barrier()


def _run_task(payload):
    """The reply to one task, pickled."""
    try:
        fn, args, kwargs = pickle.loads(payload)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - pytest.fail and SystemExit too
        return _dumps(_error_reply(exc))  # no reset: the others may be stuck in a collective
    try:
        _reset_after_task()
        return _dumps(("ok", result))
    except BaseException as exc:  # noqa: BLE001
        return _dumps(_error_reply(exc, "(after the task: resetting state or pickling the result)\n"))


def _worker_main(rank, world_size, port, conn, log_path, pg_timeout_s, parent_pid):
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: output survives os._exit
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    faulthandler.enable(all_threads=True)  # tracebacks on segfaults
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stack dump when a task times out
    threading.Thread(target=_exit_when_test_process_dies, args=(parent_pid,), daemon=True).start()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the hostname may not resolve in containers
    try:
        import torch
        import torch.distributed as dist
        from megatron_kha import enable_cpu_backend

        torch.set_num_threads(1)
        enable_cpu_backend()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
        dist.barrier()
    except BaseException as exc:  # noqa: BLE001
        conn.send_bytes(_dumps(_error_reply(exc)))
        os._exit(1)
    conn.send_bytes(_dumps(("ok", None)))
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):  # the pool was closed
            os._exit(0)
        conn.send_bytes(_run_task(payload))


def _exit_when_test_process_dies(pid):
    # A rank stuck in a collective never sees its pipe close, and the forkserver outlives the
    # test process while workers hold its "alive" pipe: poll the test process itself.
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except OSError:
            os._exit(70)


# ---- parent side ---------------------------------------------------------------------------


def _describe_exit(code):
    return f"exit code {code}" if code is None or code >= 0 else f"killed: {signal.strsignal(-code)}"


_OPEN_POOLS = set()  # closed at exit, or multiprocessing's exit hook would wait for the workers forever
atexit.register(lambda: [pool.close() for pool in list(_OPEN_POOLS)])


class RankPool:
    """`world_size` persistent gloo ranks, started in the background; `wait_ready()` (or the first
    `run`) waits for them. task_timeout_s: default limit of one `run` (None: none); pg_timeout_s:
    gloo's timeout for a collective missing a peer; startup_timeout_s: limit to join the group."""

    def __init__(self, world_size, task_timeout_s=120, *, pg_timeout_s=60, startup_timeout_s=300):
        self.world_size, self.task_timeout_s = world_size, task_timeout_s
        self.pg_timeout_s, self.startup_timeout_s = pg_timeout_s, startup_timeout_s
        self.restarts = 0  # times the workers were killed and replaced
        # The forkserver and workers import this module by name; Python 3.11 does not pass them sys.path.
        pythonpath = os.environ.get("PYTHONPATH", "")
        if REPO_ROOT not in pythonpath.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, pythonpath) if p)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD_MODULES)
        self._lock = threading.RLock()
        # Each rank's stdout+stderr; we read them on, from where the last read stopped.
        self._logs = [tempfile.NamedTemporaryFile(prefix=f"rank_pool_rank{r}_", suffix=".log")
                      for r in range(world_size)]
        self._procs, self._conns, self._closed = [], [], False
        _OPEN_POOLS.add(self)
        self._start()

    def _start(self):
        with socket.socket() as s:  # a free port, for rank 0's TCP store
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._ready, self._started_at = False, time.monotonic()
        for r, log in enumerate(self._logs):
            log.seek(0)
            log.truncate()
            parent_conn, child_conn = self._ctx.Pipe()
            args = (r, self.world_size, self.port, child_conn, log.name, self.pg_timeout_s, os.getpid())
            self._procs.append(self._ctx.Process(target=_worker_main, args=args, name=f"rank_pool-rank{r}"))
            self._procs[-1].start()
            child_conn.close()
            self._conns.append(parent_conn)

    def _kill(self):
        for proc, conn in zip(self._procs, self._conns):
            proc.kill()
            proc.join(5)
            conn.close()
        self._procs, self._conns = [], []

    def _restart(self):
        self._kill()
        self.restarts += 1
        self._start()

    def close(self):
        """Stop the workers; the pool cannot be used afterwards."""
        with self._lock:  # idempotent
            self._closed = True
            self._kill()
            for log in self._logs:
                log.close()  # and deletes it
            _OPEN_POOLS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def pids(self):
        return [proc.pid for proc in self._procs]

    def _new_output(self):
        """{rank: what the rank wrote since the last call}."""
        return {r: log.read().decode("utf-8", "replace") for r, log in enumerate(self._logs)}

    def _collect(self, deadline, grace_s):
        """Wait for one reply per rank until the deadline (monotonic), or grace_s after the first error
        or death (seen at once, via the sentinels). Returns (replies, {dead rank: exitcode}, pending)."""
        replies, died, pending, grace_until = {}, {}, set(range(self.world_size)), _INF
        while pending:
            left = min(deadline, grace_until) - time.monotonic()
            if left <= 0:
                break
            waitables = [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending]
            ready = multiprocessing.connection.wait(waitables, None if left == _INF else left)
            for r in [r for r in pending if self._conns[r] in ready or self._procs[r].sentinel in ready]:
                pending.discard(r)
                conn = self._conns[r]
                try:
                    if conn in ready or conn.poll():  # a reply sent just before exiting is read first
                        replies[r] = pickle.loads(conn.recv_bytes())
                        continue
                except (EOFError, OSError):
                    pass
                self._procs[r].join(1)
                died[r] = self._procs[r].exitcode
            if grace_until == _INF and (died or any(m[0] == "err" for m in replies.values())):
                grace_until = time.monotonic() + grace_s
        return replies, died, pending

    def _fail(self, name, timeout_s, replies, died, pending):
        """Restart the workers; return the exception to raise, with the ranks' tracebacks and output."""
        errors = {r: m for r, m in sorted(replies.items()) if m[0] == "err"}
        if died:
            what = ", ".join(f"rank {r} ({_describe_exit(c)})" for r, c in sorted(died.items()))
            lines = [f"{name}: worker died: {what}"]
        elif errors:
            r0, (_, exc_type, exc_msg, _, original) = next(iter(errors.items()))
            lines = [f"{name} failed on rank {r0}: {exc_type}: {exc_msg}  [failing ranks: {list(errors)}]"]
        else:
            lines = [f"{name} did not finish within {timeout_s} s on ranks {sorted(pending)}"]
            for r in pending:  # faulthandler writes the stuck (not yet reaped) ranks' stacks to their output
                os.kill(self._procs[r].pid, signal.SIGUSR1)
            time.sleep(0.3)
        lines += [f"---- rank {r} traceback ----\n{m[3][-_TAIL_CHARS:].rstrip()}" for r, m in errors.items()]
        if pending and (died or errors):
            lines.append(f"ranks {sorted(pending)} had not finished (probably blocked in a collective)")
        lines += [f"---- rank {r} output ----\n{text[-_TAIL_CHARS:].rstrip()}"
                  for r, text in self._new_output().items() if text.strip()]
        lines.append("(the pool's workers were killed and restarted on a new port)")
        self._restart()
        message = "\n".join(lines)
        if died:
            return WorkerDiedError(message, died)
        if not errors:
            return RankTaskTimeout(message)
        return RankTaskError(message, r0, exc_type, original)

    def wait_ready(self):
        """Block until all ranks have joined the process group (restarting dead idle workers)."""
        __tracebackhide__ = True
        with self._lock:
            if self._closed:
                raise RuntimeError("the RankPool is closed")
            if self._ready and all(proc.is_alive() for proc in self._procs):
                return
            if self._ready:
                self._restart()
            replies, died, pending = self._collect(self._started_at + self.startup_timeout_s, 0)
            if [m[0] for m in replies.values()].count("ok") < self.world_size:
                raise self._fail(f"RankPool({self.world_size}) startup", self.startup_timeout_s,
                                 replies, died, pending)
            self._ready = True
            self._new_output()  # import warnings are not the first task's output

    def run(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on every rank; return [result of rank 0, rank 1, ...]."""
        __tracebackhide__ = True  # pytest shows the test's line and the message, not pool internals
        return self.run_with_timeout(self.task_timeout_s, fn, *args, **kwargs)

    def run_with_timeout(self, timeout_s, fn, *args, **kwargs):
        """`run` with its own time limit in seconds (None: no limit)."""
        __tracebackhide__ = True
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        try:
            payload = pickle.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"cannot send task {name}: tasks must be defined at module level of an "
                            f"importable module, with picklable arguments ({exc})") from exc
        with self._lock:
            self.wait_ready()
            try:
                for conn in self._conns:
                    conn.send_bytes(payload)
                deadline = time.monotonic() + (_INF if timeout_s is None else timeout_s)
                replies, died, pending = self._collect(deadline, _ERROR_GRACE_S)
            except BaseException:  # e.g. KeyboardInterrupt: the workers are mid-task
                self._restart()
                raise
            if [m[0] for m in replies.values()].count("ok") < self.world_size:
                raise self._fail(name, timeout_s, replies, died, pending)
            for r, text in self._new_output().items():
                sys.stdout.write("".join(f"[rank {r}] {line}\n" for line in text.splitlines()))
            return [replies[r][1] for r in range(self.world_size)]
