"""parallel_map: the pieces of one global registration side by side, results as in one thread."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from end2reg_ros.parallel import (
    limit_math_threads,
    openblas_threads,
    parallel_batches,
    parallel_map,
)


def test_results_come_back_in_input_order():
    items = list(range(25))
    assert parallel_map(lambda x: x * x, items, 3) == [x * x for x in items]
    assert parallel_map(lambda x: x, [], 2) == []


def test_pieces_run_side_by_side():
    """Two pieces wait for each other: they can only both finish when two threads run them
    at once (one after the other, the barrier times out and breaks)."""
    barrier = threading.Barrier(2, timeout=20.0)

    def piece(x):
        barrier.wait()
        return threading.get_ident()

    idents = parallel_map(piece, [0, 1], 2)
    assert len(set(idents)) == 2
    assert threading.get_ident() in idents  # the calling thread takes its share


def test_one_worker_runs_in_the_calling_thread():
    caller = threading.get_ident()
    assert parallel_map(lambda _: threading.get_ident(), range(4), 1) == [caller] * 4


def test_a_piece_that_maps_again_runs_its_items_itself():
    """Nested calls run inline (no helper waits on a helper: no deadlock)."""
    def outer(x):
        me = threading.get_ident()
        inner = parallel_map(lambda y: (threading.get_ident(), x + y), range(5), 2)
        assert {ident for ident, _ in inner} == {me}
        return [value for _, value in inner]

    assert parallel_map(outer, [0, 10, 20], 2) == [[x + y for y in range(5)] for x in (0, 10, 20)]


def test_an_error_is_raised_after_every_thread_stopped():
    running = []

    def piece(x):
        running.append(x)
        if x in (3, 5):
            raise ValueError(f"piece {x}")
        return x

    with pytest.raises(ValueError, match="piece 3"):
        parallel_map(piece, range(8), 2)
    # the pool is usable afterwards
    assert parallel_map(lambda x: x + 1, range(6), 2) == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_helpers_of_its_own():
    """After a fork the child has none of the parent's helper threads: its pieces still run
    (a pool of its own) instead of waiting forever in the parent's queue."""
    assert parallel_map(lambda x: x, range(4), 2) == [0, 1, 2, 3]  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the pieces ran
        ok = False
        try:
            ok = parallel_map(lambda x: x * 2, range(6), 2) == [0, 2, 4, 6, 8, 10]
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's parallel_map did not finish within 60 s")


def test_batches_of_rows_come_back_whole_and_in_order():
    """Rows split into at most ``workers`` batches (fewer rows than workers: one a row;
    none: ``fn`` of the empty array)."""
    sizes = []

    def row_sums(batch):
        sizes.append(len(batch))
        return batch.sum(axis=1)

    rows = np.arange(30.0).reshape(10, 3)
    np.testing.assert_array_equal(parallel_batches(row_sums, rows, 3), rows.sum(axis=1))
    assert sorted(sizes) == [3, 3, 4]
    sizes.clear()
    np.testing.assert_array_equal(parallel_batches(row_sums, rows[:2], 3), rows[:2].sum(axis=1))
    assert sizes == [1, 1]
    sizes.clear()
    assert parallel_batches(row_sums, rows[:0], 2).shape == (0,)
    assert sizes == [0]


def test_the_math_libraries_run_the_thread_count_they_are_limited_to():
    """numpy's OpenBLAS (every copy in the process) and torch's pool take the count given,
    and give it back when asked; a matrix product still computes the same."""
    torch = pytest.importorskip("torch")
    before = openblas_threads()
    if not before:
        pytest.skip("no OpenBLAS loaded in this process (numpy built on another BLAS): "
                    "nothing for limit_math_threads to set")
    torch_before = torch.get_num_threads()
    a = np.random.default_rng(0).random((300, 300))
    product = a @ a
    try:
        for count in (1, 2):
            got = limit_math_threads(count)
            assert set(got) == set(before) | {"torch"}
            assert set(openblas_threads().values()) == {count}
            assert torch.get_num_threads() == count
            assert np.allclose(a @ a, product, rtol=1e-12)
    finally:
        limit_math_threads(max(before.values()))
        torch.set_num_threads(torch_before)
    with pytest.raises(ValueError, match=">= 1"):
        limit_math_threads(0)


def test_a_pipeline_sets_the_math_libraries_to_its_math_threads():
    """Building a pipeline applies ``PipelineConfig.math_threads`` (process-wide)."""
    pytest.importorskip("torch")
    from end2reg_ros.pipeline import PipelineConfig, RegistrationPipeline
    from end2reg_ros.registration import make_method
    from end2reg_ros.synth.anatomy import generate_specimen

    before = openblas_threads()
    if not before:
        pytest.skip("no OpenBLAS loaded in this process: nothing for the pipeline to set")
    try:
        limit_math_threads(2)
        RegistrationPipeline(make_method("icp-prior"), generate_specimen(3, "threads"),
                             config=PipelineConfig(tracking=False, math_threads=1),
                             calibration=False, bone_colour=False)
        assert set(openblas_threads().values()) == {1}
        limit_math_threads(2)
        RegistrationPipeline(make_method("icp-prior"), generate_specimen(3, "threads"),
                             config=PipelineConfig(tracking=False, math_threads=None),
                             calibration=False, bone_colour=False)
        assert set(openblas_threads().values()) == {2}  # None: left as they were
    finally:
        limit_math_threads(max(before.values()))
