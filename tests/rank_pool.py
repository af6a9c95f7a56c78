"""A persistent pool of gloo ranks for multi-rank tests on CPU.

Starting a gloo rank means importing torch + Megatron-Core (several seconds per process), so
a test that spawns its own ranks costs 6-12 s. `RankPool` starts `world_size` workers once,
joins them into one gloo process group, and then runs any number of tasks on them:

    pool = RankPool(2)
    results = pool.run(my_task, x, scale=2.0)   # my_task(x, scale=2.0) on every rank
    results[0], results[1]                      # one return value per rank, index = rank
    pool.close()

Task functions
  * must be module-level functions (they are pickled by reference and imported by name in
    the workers: put them in a test module or a helper such as tests/parallel_tasks.py; no
    lambdas or nested functions). Arguments and return values are pickled with the stdlib
    pickle: plain Python data, CPU tensors and containers of them.
  * run on every rank; get the rank with torch.distributed.get_rank(). The default process
    group (gloo, world_size ranks) is initialised; initialise Megatron's parallel state
    yourself (parallel_state.initialize_model_parallel(...)) and seed yourself.
  * after each task the worker resets Megatron's global state (parallel groups, global
    memory buffer, microbatch calculator), destroys leftover process subgroups, restores grad
    mode / default dtype / thread count, and runs a barrier.
  * stdout/stderr of the workers is forwarded to the test's stdout after the task as
    "[rank r] ..." lines (so pytest shows it for failing tests).

Failures: if a rank raises, `RankTaskError` (message: rank, exception, full remote traceback,
output) is raised in the test; if a worker dies (segfault, os._exit) `WorkerDiedError`; if the
task overruns its timeout `RankTaskTimeout` (a TimeoutError) with a stack dump of the stuck
ranks. In all three cases the workers are killed and a new set is started on a new port, so
the next task runs on a clean pool.

Workers are forked from a forkserver that has torch + Megatron-Core preloaded (restarts take
~1 s instead of a full import per rank); start_method="spawn" (or the environment variable
RANK_POOL_START_METHOD=spawn) gives fully fresh interpreters.
Workers exit on their own when the parent process dies.
"""
import atexit
import faulthandler
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (its atexit hook must be registered before ours)
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
import weakref

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules imported once by the forkserver, so forked workers start with them loaded.
PRELOAD_MODULES = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.parallel_state",
    "megatron.core.num_microbatches_calculator",
    "megatron.core.transformer",
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron_kha",
)

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_ERROR_GRACE_S = 0.5  # after the first failure, how long to wait for the other ranks' reports
_OUTPUT_TAIL_CHARS = 6000


class RankPoolError(RuntimeError):
    """Base class of the pool's errors (except RankTaskTimeout, which is a TimeoutError)."""


class RankPoolStartupError(RankPoolError):
    """The workers could not be started or could not form the process group."""


class RankTaskError(RankPoolError):
    """A task raised on at least one rank.

    Attributes: rank (lowest failing rank), exc_type ("module.Class" of its exception),
    original (that exception unpickled, or None), tracebacks ({rank: traceback text}).
    """

    def __init__(self, message, rank=None, exc_type=None, original=None, tracebacks=None):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.original = original
        self.tracebacks = tracebacks or {}


class WorkerDiedError(RankPoolError):
    """A worker process exited during a task. Attributes: exitcodes ({rank: exitcode})."""

    def __init__(self, message, exitcodes=None):
        super().__init__(message)
        self.exitcodes = exitcodes or {}


class RankTaskTimeout(TimeoutError):
    """A task did not finish on every rank within its timeout."""


# --------------------------------------------------------------------------------------
# Forkserver preload: the forkserver imports this module (set_forkserver_preload); when it
# does, it also imports the heavy modules. Import errors are swallowed (the workers then
# import, and report, them themselves).


def _preload():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a broken module is reported by the workers
                pass


def _imported_by_forkserver():
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        frame = frame.f_back
    return False


if _imported_by_forkserver():
    _preload()


# --------------------------------------------------------------------------------------
# Worker side


def _watch_parent(parent_pid, initial_ppid):
    """Exit the worker as soon as the test process (or the forkserver between) is gone."""
    while True:
        time.sleep(0.5)
        gone = os.getppid() != initial_ppid
        if not gone:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                gone = True
            except PermissionError:
                pass
        if gone:
            os._exit(70)


def _send(conn, obj):
    conn.send_bytes(pickle.dumps(obj, protocol=_PROTOCOL))


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


def _error_reply(tid, exc, stage):
    tb = _tail(traceback.format_exc(), 50_000)
    if stage != "task":
        tb = f"(while {stage})\n{tb}"
    try:
        exc_bytes = pickle.dumps(exc, protocol=_PROTOCOL)
        pickle.loads(exc_bytes)
    except Exception:  # noqa: BLE001
        exc_bytes = None
    exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}".replace("builtins.", "")
    try:
        text = _tail(str(exc), 2000)
    except Exception:  # noqa: BLE001
        text = "<str() of the exception failed>"
    return ("err", tid, exc_type, text, tb, exc_bytes)


def _sanitize(obj):
    """Detach autograd outputs and compact views, so results pickle small and cleanly."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            return obj
        if obj.grad_fn is not None:
            obj = obj.detach()
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            obj = obj.clone()
        return obj
    if isinstance(obj, dict):
        try:
            return type(obj)((k, _sanitize(v)) for k, v in obj.items())
        except Exception:  # noqa: BLE001 - exotic mapping: leave it alone
            return obj
    if isinstance(obj, list):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, tuple):
        items = [_sanitize(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def _teardown(num_threads):
    """Reset Megatron's globals and torch's per-process settings; then a barrier."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # idempotent; also drops _GLOBAL_MEMORY_BUFFER
    if hasattr(parallel_state, "destroy_global_memory_buffer"):
        parallel_state.destroy_global_memory_buffer()
    try:
        from megatron.core import num_microbatches_calculator as nmc
    except ImportError:
        nmc = None
    if nmc is not None and hasattr(nmc, "destroy_num_microbatches_calculator"):
        nmc.destroy_num_microbatches_calculator()
    # Subgroups created by the task (Megatron's groups, new_group calls) hold sockets and
    # threads; without this every task leaks them.
    world = dist.group.WORLD
    for pg in list(dist.distributed_c10d._world.pg_map.keys()):
        if pg is not world:
            try:
                dist.destroy_process_group(pg)
            except Exception:  # noqa: BLE001
                pass
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    dist.barrier()


def _run_task(tid, payload, num_threads):
    try:
        fn, args, kwargs = pickle.loads(payload)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - includes pytest.fail / SystemExit
        # No teardown: the parent restarts the pool (the other ranks may be in a collective).
        return _error_reply(tid, exc, "task")
    try:
        _teardown(num_threads)
    except BaseException as exc:  # noqa: BLE001
        return _error_reply(tid, exc, "tearing down Megatron state after the task")
    try:
        return ("ok", tid, pickle.dumps(_sanitize(result), protocol=_PROTOCOL))
    except BaseException as exc:  # noqa: BLE001
        return _error_reply(tid, exc, "pickling the task's return value")


def _worker_main(rank, world_size, port, conn, repo_root, log_path, parent_pid, pg_timeout_s):
    try:
        os.setpgid(0, 0)  # own process group: the parent kills it as a whole
    except OSError:
        pass
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _flush_std()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for name, fdno in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None or getattr(stream, "fileno", lambda: -1)() != fdno:
            setattr(sys, name, open(fdno, "w", buffering=1, closefd=False))
        else:
            try:
                stream.reconfigure(line_buffering=True)
            except Exception:  # noqa: BLE001
                pass
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    threading.Thread(target=_watch_parent, args=(parent_pid, os.getppid()), daemon=True).start()

    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    pythonpath = os.environ.get("PYTHONPATH", "")
    if repo_root not in pythonpath.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, pythonpath) if p)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # hostname may not resolve in containers

    try:
        from datetime import timedelta

        import torch

        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        from megatron_kha import enable_cpu_backend

        enable_cpu_backend()
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        dist.barrier()
        num_threads = torch.get_num_threads()
    except BaseException:  # noqa: BLE001
        _flush_std()
        _send(conn, ("startup_error", traceback.format_exc()))
        os._exit(1)

    _flush_std()
    _send(conn, ("ready", os.getpid()))
    while True:
        try:
            kind, tid, payload = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)
        if kind == "exit":
            _flush_std()
            os._exit(0)
        reply = _run_task(tid, payload, num_threads)
        _flush_std()
        try:
            conn.send_bytes(pickle.dumps(reply, protocol=_PROTOCOL))
        except (EOFError, OSError):
            os._exit(0)


# --------------------------------------------------------------------------------------
# Parent side


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fn_name(fn):
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _describe_exit(code):
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _kill_procs(procs):
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the worker's own group (worker + its children)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        try:
            p.kill()
        except Exception:  # noqa: BLE001
            pass
    for p in procs:
        try:
            p.join(5)
        except Exception:  # noqa: BLE001
            pass


class _Workers:
    """One generation of workers: processes, pipes, log files."""

    def __init__(self, ctx, world_size, port, logdir, gen, pg_timeout_s):
        self.world_size = world_size
        self.port = port
        self.procs, self.conns, self.logs = [], [], []
        self.offsets = [0] * world_size
        self.ready = False
        self.started_at = time.monotonic()
        try:
            for r in range(world_size):
                log = os.path.join(logdir, f"gen{gen}_rank{r}.log")
                open(log, "wb").close()
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                p = ctx.Process(
                    target=_worker_main,
                    args=(r, world_size, port, child_conn, REPO_ROOT, log, os.getpid(), pg_timeout_s),
                    name=f"rank_pool{world_size}-gen{gen}-rank{r}",
                    daemon=False,  # daemonic processes may not have children
                )
                p.start()
                child_conn.close()
                self.procs.append(p)
                self.conns.append(parent_conn)
                self.logs.append(log)
        except BaseException:
            self.kill()
            raise

    def kill(self):
        _kill_procs(self.procs)
        for c in self.conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self.ready = False

    def read_new_output(self, rank, advance=True):
        try:
            with open(self.logs[rank], "rb") as f:
                f.seek(self.offsets[rank])
                data = f.read()
        except OSError:
            return ""
        if advance:
            self.offsets[rank] += len(data)
        return data.decode("utf-8", "replace")

    def skip_output(self):
        for r in range(self.world_size):
            try:
                self.offsets[r] = os.path.getsize(self.logs[r])
            except OSError:
                pass


def _tail(text, limit=_OUTPUT_TAIL_CHARS):
    return text if len(text) <= limit else "...\n" + text[-limit:]


_LIVE_POOLS = weakref.WeakSet()


@atexit.register
def _close_all_pools():
    for pool in list(_LIVE_POOLS):
        pool.close()


class RankPool:
    """`world_size` persistent gloo ranks; see the module docstring.

    task_timeout_s: default limit of one `run` (None: no limit); pg_timeout_s: timeout of the gloo process
    group (a collective waiting on a missing peer fails after it); startup_timeout_s: limit
    for the workers to import and form the group. Workers start in the background at
    construction; `wait_ready()` (or the first `run`) waits for them.
    """

    def __init__(self, world_size, task_timeout_s=120, *, pg_timeout_s=60, startup_timeout_s=300,
                 start_method=None):
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.world_size = world_size
        self.task_timeout_s = task_timeout_s
        self.pg_timeout_s = pg_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # number of times the workers were killed and replaced
        self.last_startup_s = None  # seconds from spawning the workers to all ranks ready
        # The forkserver (and any subprocess) must import tests.* and megatron_kha.
        pythonpath = os.environ.get("PYTHONPATH", "")
        if REPO_ROOT not in pythonpath.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, pythonpath) if p)
        start_method = start_method or os.environ.get("RANK_POOL_START_METHOD", "forkserver")
        if start_method not in ("forkserver", "spawn"):  # "fork" would copy the test process's threads
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', not {start_method!r}")
        if start_method == "forkserver":
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload([__name__])
        else:
            self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.RLock()
        self._logdir = tempfile.mkdtemp(prefix=f"rank_pool{world_size}_")
        self._gen = 0
        self._task_id = 0
        self._workers = None
        self._closed = False
        self._live = []  # the current _Workers, for the finalizer
        self._finalizer = weakref.finalize(self, RankPool._finalize, self._live, self._logdir)
        _LIVE_POOLS.add(self)
        self._spawn()

    # ---- lifecycle -------------------------------------------------------------------

    @staticmethod
    def _finalize(live, logdir):
        for w in live:
            w.kill()
        live.clear()
        shutil.rmtree(logdir, ignore_errors=True)

    def _spawn(self):
        self._gen += 1
        self._workers = _Workers(self._ctx, self.world_size, _free_port(), self._logdir, self._gen, self.pg_timeout_s)
        self._live[:] = [self._workers]

    def _discard_workers(self):
        if self._workers is not None:
            self._workers.kill()
            for log in self._workers.logs:
                try:
                    os.unlink(log)
                except OSError:
                    pass
        self._workers = None
        self._live.clear()

    def _restart(self):
        """Kill the current workers and start new ones (in the background) on a new port."""
        self._discard_workers()
        self.restarts += 1
        self._spawn()

    def close(self):
        """Stop the workers; the pool cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            w = self._workers
            if w is not None and w.ready:
                for c in w.conns:
                    try:
                        c.send_bytes(pickle.dumps(("exit", 0, b""), protocol=_PROTOCOL))
                    except Exception:  # noqa: BLE001
                        pass
                deadline = time.monotonic() + 2.0
                for p in w.procs:
                    p.join(max(0.0, deadline - time.monotonic()))
            self._discard_workers()
            self._finalizer()
            _LIVE_POOLS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def port(self):
        return self._workers.port if self._workers else None

    @property
    def pids(self):
        return [p.pid for p in self._workers.procs] if self._workers else []

    def wait_ready(self):
        """Block until all ranks have joined the process group (restarting dead workers)."""
        __tracebackhide__ = True
        with self._lock:
            if self._closed:
                raise RankPoolError("the pool is closed")
            attempts = 0
            while True:
                w = self._workers
                if w is None:
                    self._spawn()
                    w = self._workers
                if w.ready:
                    if all(p.is_alive() for p in w.procs):
                        return
                    dead = {r: p.exitcode for r, p in enumerate(w.procs) if not p.is_alive()}
                    warnings.warn(f"RankPool({self.world_size}): idle workers died ({dead}); restarting")
                    self._restart()
                    continue
                try:
                    self._wait_startup(w)
                    return
                except RankPoolStartupError as exc:
                    self._discard_workers()
                    attempts += 1
                    if getattr(exc, "address_in_use", False) and attempts < 5:
                        continue  # the port was taken between picking and binding it
                    raise

    def _wait_startup(self, w):
        deadline = w.started_at + self.startup_timeout_s
        pending = set(range(w.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankPoolStartupError(self._startup_report(w, pending, "did not start within "
                                                                f"{self.startup_timeout_s} s"))
            waitables = {w.conns[r]: r for r in pending}
            waitables.update({w.procs[r].sentinel: r for r in pending})
            for obj in multiprocessing.connection.wait(list(waitables), timeout=remaining):
                r = waitables[obj]
                if r not in pending:
                    continue
                conn = w.conns[r]
                if obj is not conn and conn.poll():
                    obj = conn  # it wrote something before exiting: read that first
                if obj is conn:
                    try:
                        msg = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        w.procs[r].join(1)
                        raise RankPoolStartupError(self._startup_report(
                            w, [r], f"rank {r} exited during startup ({_describe_exit(w.procs[r].exitcode)})"))
                    if msg[0] == "ready":
                        pending.discard(r)
                        continue
                    err = RankPoolStartupError(self._startup_report(
                        w, [r], f"rank {r} failed during startup:\n{msg[1]}"))
                    err.address_in_use = any(s in msg[1] for s in ("EADDRINUSE", "ddress already in use"))
                    raise err
                w.procs[r].join(1)
                raise RankPoolStartupError(self._startup_report(
                    w, [r], f"rank {r} exited during startup ({_describe_exit(w.procs[r].exitcode)})"))
        w.ready = True
        w.skip_output()  # import warnings etc. are not the first task's output
        self.last_startup_s = time.monotonic() - w.started_at

    def _startup_report(self, w, ranks, what):
        lines = [f"RankPool(world_size={w.world_size}, port {w.port}): {what}"]
        for r in sorted(ranks):
            out = w.read_new_output(r, advance=False)
            if out.strip():
                lines.append(f"---- rank {r} output ----\n{_tail(out)}")
        return "\n".join(lines)

    # ---- tasks -------------------------------------------------------------------------

    def run(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on every rank; return [result of rank 0, rank 1, ...]."""
        __tracebackhide__ = True  # pytest: show the test's line and the message, not pool internals
        return self.run_with_timeout(self.task_timeout_s, fn, *args, **kwargs)

    def run_with_timeout(self, timeout_s, fn, *args, **kwargs):
        """`run` with its own time limit in seconds (None: no limit)."""
        __tracebackhide__ = True
        name = _fn_name(fn)
        try:
            payload = pickle.dumps((fn, args, kwargs), protocol=_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"cannot send task {name} to the workers: the function must be defined at module "
                f"level of an importable module, and its arguments picklable ({exc})"
            ) from exc
        with self._lock:
            self.wait_ready()
            w = self._workers
            self._task_id += 1
            tid = self._task_id
            message = pickle.dumps(("task", tid, payload), protocol=_PROTOCOL)
            try:
                for r, conn in enumerate(w.conns):
                    try:
                        conn.send_bytes(message)
                    except (OSError, EOFError):
                        pass  # a dead worker is reported by _collect
                results = self._collect(w, tid, name, timeout_s)
            except BaseException:
                if self._workers is w:  # interrupted (e.g. KeyboardInterrupt): workers are mid-task
                    self._restart()
                raise
            self._forward_output(w)
            return results

    def _collect(self, w, tid, name, timeout_s):
        __tracebackhide__ = True
        n = w.world_size
        results = [None] * n
        pending = set(range(n))
        errors, exitcodes = {}, {}
        deadline = time.monotonic() + (float("inf") if timeout_s is None else timeout_s)
        grace_deadline = None
        while pending:
            now = time.monotonic()
            if grace_deadline is not None and now >= grace_deadline:
                break
            if now >= deadline:
                self._timeout(w, name, timeout_s, pending)  # raises
            until = deadline if grace_deadline is None else min(deadline, grace_deadline)
            waitables = {w.conns[r]: r for r in pending}
            waitables.update({w.procs[r].sentinel: r for r in pending})
            wait_s = None if until == float("inf") else max(0.0, until - now)
            for obj in multiprocessing.connection.wait(list(waitables), timeout=wait_s):
                r = waitables[obj]
                if r not in pending:
                    continue
                conn = w.conns[r]
                if obj is not conn and conn.poll():
                    obj = conn
                if obj is conn:
                    try:
                        reply = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        w.procs[r].join(1)
                        exitcodes[r] = w.procs[r].exitcode
                        pending.discard(r)
                        continue
                    if reply[1] != tid:
                        continue  # stale reply; cannot happen after a restart, but be safe
                    pending.discard(r)
                    if reply[0] == "ok":
                        try:
                            results[r] = pickle.loads(reply[2])
                        except Exception as exc:  # noqa: BLE001
                            errors[r] = ("err", tid, type(exc).__name__, str(exc),
                                         "(while unpickling the result in the test process)\n"
                                         + traceback.format_exc(), None)
                    else:
                        errors[r] = reply
                else:
                    w.procs[r].join(1)
                    exitcodes[r] = w.procs[r].exitcode
                    pending.discard(r)
            if (errors or exitcodes) and grace_deadline is None:
                grace_deadline = time.monotonic() + _ERROR_GRACE_S
        if not errors and not exitcodes:
            return results
        self._fail(w, name, errors, exitcodes, pending)

    def _fail(self, w, name, errors, exitcodes, pending):
        __tracebackhide__ = True
        outputs = {r: w.read_new_output(r) for r in range(w.world_size)}
        self._restart()
        lines = []
        if exitcodes:
            r0 = min(exitcodes)
            what = ", ".join(f"rank {r} ({_describe_exit(c)})" for r, c in sorted(exitcodes.items()))
            lines.append(f"{name}: worker died during the task: {what}")
        else:
            r0 = min(errors)
            _, _, exc_type, exc_msg, _, _ = errors[r0]
            failing = ", ".join(f"rank {r}" for r in sorted(errors))
            lines.append(f"{name} failed on rank {r0}: {exc_type}: {exc_msg}  [failed: {failing}]")
        for r in sorted(errors):
            lines.append(f"---- rank {r} traceback ----\n{errors[r][4].rstrip()}")
        if pending:
            lines.append(f"ranks {sorted(pending)} had not finished (probably blocked in a collective)")
        for r in range(w.world_size):
            if outputs[r].strip():
                lines.append(f"---- rank {r} output ----\n{_tail(outputs[r]).rstrip()}")
        lines.append(f"(the pool's workers were killed and restarted on a new port)")
        message = "\n".join(lines)
        if exitcodes:
            raise WorkerDiedError(message, exitcodes)
        original = None
        if errors[r0][5] is not None:
            try:
                original = pickle.loads(errors[r0][5])
            except Exception:  # noqa: BLE001
                original = None
        raise RankTaskError(message, rank=r0, exc_type=errors[r0][2], original=original,
                            tracebacks={r: e[4] for r, e in errors.items()})

    def _timeout(self, w, name, timeout_s, pending):
        __tracebackhide__ = True
        for r in pending:  # ask the stuck ranks for a stack dump (faulthandler on SIGUSR1)
            try:
                os.kill(w.procs[r].pid, signal.SIGUSR1)
            except OSError:
                pass
        time.sleep(0.3)
        outputs = {r: w.read_new_output(r) for r in range(w.world_size)}
        self._restart()
        lines = [f"{name} did not finish within {timeout_s} s on ranks {sorted(pending)}; "
                 f"the pool's workers were killed and restarted"]
        for r in range(w.world_size):
            if outputs[r].strip():
                lines.append(f"---- rank {r} output (stack dump of stuck ranks at the end) ----\n"
                             f"{_tail(outputs[r]).rstrip()}")
        raise RankTaskTimeout("\n".join(lines))

    def _forward_output(self, w):
        for r in range(w.world_size):
            out = w.read_new_output(r)
            if out:
                sys.stdout.write("".join(f"[rank {r}] {line}\n" for line in out.splitlines()))
