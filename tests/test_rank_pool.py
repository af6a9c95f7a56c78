"""The persistent gloo rank pool (tests/rank_pool.py): results, rank order, failures, recovery."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from tests.rank_pool import RankPool, RankTaskError, RankTaskTimeout, WorkerDiedError

# ---- task functions (module level: the workers import them by name) ---------------------


def all_reduce_task(per_rank):
    rank = dist.get_rank()
    t = per_rank[rank].clone()
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": t}


def identity_task(tag):
    rank = dist.get_rank()
    return {"rank": rank, "pid": os.getpid(), "tag": tag, "t": torch.full((3,), float(rank))}


def raise_on_rank1_task():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure 8731")
    dist.all_reduce(torch.ones(1))  # rank 0 is left waiting in a collective
    return "unreachable on rank 0"


def sleep_task(seconds):
    time.sleep(seconds)
    return "slept"


def exit_on_rank1_task():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def rank_sum_task():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def megatron_init_task(tp):
    from megatron.core import num_microbatches_calculator as nmc
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    nmc.init_num_microbatches_calculator(dist.get_rank(), None, 8, 1, dist.get_world_size() // tp)
    ps.get_global_memory_buffer()
    t = torch.ones(2)
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return ps.get_tensor_model_parallel_rank(), t


def megatron_state_task():
    from megatron.core import num_microbatches_calculator as nmc
    from megatron.core import parallel_state as ps

    return (
        ps.model_parallel_is_initialized(),
        ps._GLOBAL_MEMORY_BUFFER is None,
        nmc._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None,
        len(dist.distributed_c10d._world.pg_map),  # only the default group is left
    )


def print_task():
    print(f"hello from rank {dist.get_rank()}")
    return None


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pool():
    """A private 2-rank pool with short timeouts for the failure tests (they restart it)."""
    pool = RankPool(2, task_timeout_s=3, pg_timeout_s=10)
    pool.wait_ready()
    yield pool
    pool.close()


def _assert_pool_works(pool):
    assert pool.run(rank_sum_task) == [(r, pool.world_size, float(sum(range(pool.world_size))))
                                       for r in range(pool.world_size)]


# ---- tests ---------------------------------------------------------------------------------


def test_all_reduce_of_fresh_random_tensors(pool2):
    per_rank = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    results = pool2.run(all_reduce_task, per_rank)
    expected = per_rank[0] + per_rank[1]
    assert len(results) == 2
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world"] == 2
        torch.testing.assert_close(res["sum"], expected, rtol=0, atol=1e-12)


def test_results_come_back_in_rank_order(pool2):
    results = pool2.run(identity_task, tag="x")
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["pid"] for r in results] == pool2.pids
    assert len(set(pool2.pids)) == 2 and os.getpid() not in pool2.pids
    for rank, r in enumerate(results):
        assert r["tag"] == "x"
        torch.testing.assert_close(r["t"], torch.full((3,), float(rank)))


def test_megatron_state_is_reset_between_tasks(pool2):
    for _ in range(2):  # the second initialize_model_parallel would assert without the teardown
        results = pool2.run(megatron_init_task, 2)
        assert [r[0] for r in results] == [0, 1]
        torch.testing.assert_close(results[0][1], torch.full((2,), 2.0))
        assert pool2.run(megatron_state_task) == [(False, True, True, 1)] * 2


def test_many_tasks_do_not_leak_file_descriptors(pool2):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc (Linux)")
    pool2.run(identity_task, tag=0)
    before = fds()
    for i in range(300):
        assert pool2.run(identity_task, tag=i)[1]["tag"] == i
    assert fds() <= before + 2


def test_worker_output_is_forwarded(pool2, capsys):
    pool2.run(print_task)
    out = capsys.readouterr().out
    assert "[rank 0] hello from rank 0" in out and "[rank 1] hello from rank 1" in out


def test_non_importable_task_is_rejected_before_sending(pool2):
    with pytest.raises(TypeError, match="module level"):
        pool2.run(lambda: 1)
    _assert_pool_works(pool2)


@pytest.mark.timeout(60)
def test_exception_on_rank1_surfaces_and_pool_restarts(small_pool):
    restarts = small_pool.restarts
    with pytest.raises(RankTaskError) as info:
        small_pool.run(raise_on_rank1_task)
    msg = str(info.value)
    headline = msg.splitlines()[0]
    assert "rank 1" in headline and "ValueError: deliberate failure 8731" in headline, headline
    assert "Traceback" in msg and "raise_on_rank1_task" in msg  # the worker's traceback text
    assert info.value.rank == 1 and info.value.exc_type == "ValueError"
    assert isinstance(info.value.original, ValueError)
    assert small_pool.restarts == restarts + 1
    _assert_pool_works(small_pool)


@pytest.mark.timeout(60)
def test_timeout_raises_and_pool_recovers(small_pool):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="sleep_task") as info:
        small_pool.run(sleep_task, 60)
    assert isinstance(info.value, RankTaskTimeout)
    assert 2.5 < time.monotonic() - t0 < 15
    _assert_pool_works(small_pool)


@pytest.mark.timeout(60)
def test_dead_worker_is_detected_quickly_and_pool_recovers(small_pool):
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="rank 1 \\(exit code 3\\)") as info:
        small_pool.run_with_timeout(30, exit_on_rank1_task)
    assert time.monotonic() - t0 < 5  # well under the 30 s timeout
    assert info.value.exitcodes.get(1) == 3
    _assert_pool_works(small_pool)


def test_worker_watchdog_exits_when_the_test_process_dies():
    # What each worker runs in a thread (a rank stuck in a collective never sees its pipe close).
    test_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = subprocess.Popen([sys.executable, "-c", "from tests.rank_pool import "
                               f"_exit_when_test_process_dies as f; f({test_process.pid})"])
    try:
        time.sleep(1)
        assert worker.poll() is None, "the watchdog exited while the test process was alive"
        test_process.kill()
        test_process.wait()
        assert worker.wait(timeout=5) == 70
    finally:
        test_process.kill()
        worker.kill()


def test_four_ranks(pool4):
    _assert_pool_works(pool4)
    results = pool4.run(identity_task, tag="four")
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert len(set(r["pid"] for r in results)) == 4
