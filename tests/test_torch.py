import pytest
import torch

from featlearn._torch import resolve_device


def test_auto_and_none_pick_cuda_when_available_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_is_always_valid(device):
    assert resolve_device(device) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "bogus", "cuda:x", "meta", "xpu", "", "CPU"])
def test_unknown_device_lists_the_valid_ones(name):
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    msg = str(info.value)
    assert "\n" not in msg and repr(name) in msg
    for valid in ('"auto"', '"cpu"', '"cuda"', '"cuda:N"', '"mps"'):
        assert valid in msg


@pytest.mark.parametrize("value", [3, 1.5, ["cpu"]])
def test_non_string_device_is_a_value_error(value):
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_so(name):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_past_the_last_device():
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0").type == "cuda"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_device(f"cuda:{n}")


def test_mps_without_mps_says_so():
    if torch.backends.mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")


def test_check_device_name_does_not_need_the_device():
    from featlearn._torch import check_device_name

    assert check_device_name("auto") is None and check_device_name(None) is None
    assert check_device_name("cuda:1") == torch.device("cuda:1")  # a name, not a lookup
    assert check_device_name("mps").type == "mps"
    with pytest.raises(ValueError, match="valid devices"):
        check_device_name("gpu")


# ---- chunks handed to worker threads ---------------------------------------------------------

def _record(made, seen):
    def make_work():
        made.append(1)
        return lambda a, b: seen.append((a, b))
    return make_work


def test_over_chunks_visits_every_chunk_once_one_work_per_worker(two_threads):
    from featlearn._torch import cpu_workers, over_chunks

    cpu = torch.device("cpu")
    made, seen = [], []
    with cpu_workers(cpu):
        over_chunks(1000, 64, _record(made, seen), cpu)
    assert sorted(seen) == [(s, min(1000, s + 64)) for s in range(0, 1000, 64)]
    assert len(made) == 2  # each worker builds its own state, once
    made.clear(), seen.clear()
    over_chunks(150, 64, _record(made, seen), cpu)  # outside cpu_workers: in order, here
    assert seen == [(0, 64), (64, 128), (128, 150)] and len(made) == 1
    made.clear(), seen.clear()
    with cpu_workers(cpu):
        over_chunks(50, 64, _record(made, seen), cpu)  # one chunk: one worker
    assert seen == [(0, 50)] and len(made) == 1


def test_over_chunks_error_stops_the_other_workers(two_threads):
    from featlearn._torch import cpu_workers, over_chunks

    cpu = torch.device("cpu")
    seen = []

    def make_work():
        def work(a, b):
            seen.append(a)
            if a == 64:
                raise RuntimeError("chunk 1 failed")
        return work

    with pytest.raises(RuntimeError, match="chunk 1 failed"):
        with cpu_workers(cpu):
            over_chunks(64 * 1000, 64, make_work, cpu)
    assert len(seen) < 100  # the rest of the 1000 chunks were never started
    assert torch.get_num_threads() == 2


def test_reuse_freed_memory_sets_and_restores_glibc_thresholds(monkeypatch):
    import featlearn._torch as ft

    calls = []
    monkeypatch.setitem(ft._MALLOC, "libc", lambda param, value: calls.append((param, value)) or 1)
    with ft.reuse_freed_memory():
        with ft.reuse_freed_memory():  # nested: set once, restored once
            pass
        assert calls == [(-3, 256 * 2**20), (-1, 256 * 2**20)]
    after = [(-3, 32 * 2**20), (-1, 64 * 2**20)]  # glibc's dynamic ceiling on 64-bit
    assert calls[2:] == after
    with pytest.raises(RuntimeError):
        with ft.reuse_freed_memory():
            raise RuntimeError("a failed step")
    assert calls[-2:] == after and ft._MALLOC["depth"] == 0
    monkeypatch.setitem(ft._MALLOC, "libc", False)  # not glibc: nothing to call
    with ft.reuse_freed_memory():
        pass


def test_buffers_are_reused_after_reuse_freed_memory():
    """After the context, a buffer of a few MB freed and allocated again comes from the heap,
    not from a fresh mapping faulted in page by page (the thresholds are left at glibc's
    dynamic ceiling, not fixed at its 128 KiB start)."""
    import resource

    import featlearn._torch as ft

    if ft._mallopt() is None:
        pytest.skip("glibc only")
    with ft.reuse_freed_memory():
        pass

    def faults_of_100_buffers():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(100):
            torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1)  # 4 MB, every page touched
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # Mapped afresh each time, 100 buffers take 100 x 1024 faults; reused, about one buffer's.
    assert faults_of_100_buffers() < 20 * 1024
