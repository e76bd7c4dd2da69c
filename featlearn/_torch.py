"""Private torch plumbing shared by every stage.

Device resolution, memory budgeting for chunked work, the CPU thread policy (worker threads
of one intra-op thread each), numpy <-> torch conversion and private random generators live
here once, so each estimator has a single numeric code path whose
``device`` is a parameter, not a second implementation.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch
from sklearn.utils import check_random_state

#: Fraction of the currently available memory a single chunked computation may use.
MEMORY_FRACTION = 0.25
#: Hard ceiling for one chunk's working set on the CPU: small chunks stay near the caches and
#: leave room for the rest of the process; the throughput gain above this is negligible.
CPU_CHUNK_BYTES = 512 * 2**20


#: The device names :func:`resolve_device` accepts, for error messages.
VALID_DEVICES = '"auto", "cpu", "cuda", "cuda:N", "mps"'


def check_device_name(device):
    """The :class:`torch.device` a name stands for, without asking whether this machine has it.

    Returns None for "auto" and None (resolved by :func:`resolve_device`). Raises a ValueError
    listing the valid devices for anything but those, "cpu", "cuda", "cuda:N", "mps" or a
    :class:`torch.device` of those types.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return None
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be one of {VALID_DEVICES}, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        hint = ' (did you mean "cuda"?)' if str(device).lower().startswith("gpu") else ""
        raise ValueError(f"unknown device {str(device)!r}{hint}; valid devices are {VALID_DEVICES}")
    return dev


def mps_available() -> bool:
    """Whether Apple's Metal (MPS) backend can be used here (False on builds without it)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device="auto") -> torch.device:
    """Map ``"auto"``/``None``/strings/devices to a concrete :class:`torch.device`.

    ``"auto"`` picks CUDA when it is available, then Apple's MPS, else the CPU. Any other name must be one of
    "cpu", "cuda", "cuda:N" or "mps" (or a :class:`torch.device` of those types); an unknown
    name, or a device this machine lacks, is a ValueError that says so, rather than a torch
    traceback or a silent fallback.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    dev = check_device_name(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available on "
                             "this machine; use \"cpu\" or \"auto\"")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not mps_available():
        raise ValueError(f"device {str(device)!r} was requested but MPS is not available on this "
                         "machine; use \"cpu\" or \"auto\"")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated now on ``device`` (free GPU memory or available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 2 * 2**30


def chunk_size(bytes_per_item: int, device: torch.device, *, minimum: int = 1,
               maximum: int | None = None, budget: int | None = None) -> int:
    """How many items of ``bytes_per_item`` working memory fit in one chunk.

    The budget is a fraction of the memory available now (capped on the CPU so chunks stay
    cache-friendly), so peak memory is bounded by design rather than by the dataset size.
    """
    if budget is None:
        budget = int(available_memory(device) * MEMORY_FRACTION)
        if device.type == "cpu":
            budget = min(budget, CPU_CHUNK_BYTES)
    n = max(minimum, budget // max(1, int(bytes_per_item)))
    if maximum is not None:
        n = min(n, maximum)
    return max(1, int(n))


def make_generator(random_state) -> torch.Generator:
    """A private CPU :class:`torch.Generator` seeded from a scikit-learn ``random_state``.

    Randomness is always drawn on the CPU so that the same seed selects the same samples on
    every device; the global torch seed is never touched.
    """
    rng = check_random_state(random_state)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(rng.randint(0, 2**31 - 1)))
    return gen


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Tensor -> numpy array on the host (a view when it already lives on the CPU)."""
    return t.detach().cpu().numpy()


def state_to_cpu(obj):
    """Recursively move tensors in a pickled state to the CPU, so CUDA-fitted models load anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: state_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_cpu(v) for v in obj)
    return obj


def gemm_rate(n=4096, repeats=3, device="cpu", dtype=torch.float32) -> float:
    """Best-of-``repeats`` ``torch.mm`` rate at ``n^3`` on ``device`` in ``dtype``, in GFLOP/s
    (``torch.int8``: ``torch._int_mm``'s int32-accumulated products, in GOP/s).

    The yardstick for efficiency figures: the same machine can differ several-fold in raw speed
    from one session to the next, so a run states its speed as a fraction of this rate, measured
    in the precision the measured code multiplies in.
    """
    import time

    device = torch.device(device)
    if dtype == torch.int8:
        a, b = (torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
                for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=torch.int32)
        mm = torch._int_mm
    else:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        mm = torch.mm
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mm(a, b, out=out)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------------------------
# CPU parallelism: one worker thread per core over row ranges (k-means passes, and any other
# pass of many small torch ops that must not wait at OpenMP barriers on a busy machine)
# --------------------------------------------------------------------------------------------
#
# torch parallelises every op inside it (an OpenMP region per op, with a barrier). A k-means
# pass is thousands of small ops (a GEMM and an argmin per chunk, the centre updates), and on
# a machine with more runnable threads than cores each barrier waits for a descheduled thread,
# thousands of times per pass (benchmarks/results/kmeans.md has the slowdown). So the solvers
# run with one intra-op thread (``cpu_workers``) and split each pass's rows between worker
# threads themselves (torch releases the GIL inside ops), as scikit-learn does with one OpenMP
# region per pass: each core keeps its own distance block in its own cache and never waits for
# the other except once at the end of the pass.

_WORKERS = threading.local()
_POOL: dict = {"pid": None, "size": 0, "executor": None}
_POOL_LOCK = threading.Lock()


@contextlib.contextmanager
def cpu_workers(device: torch.device):
    """Run the enclosed code's :func:`over_rows` passes on ``torch.get_num_threads()`` worker
    threads of one intra-op thread each (CPU only; a no-op on CUDA, with one thread, or when
    nested).

    ``torch.set_num_threads`` is process-wide: other threads' torch ops also run on one thread
    until the block ends. The count is restored on exit, also after an error.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or getattr(_WORKERS, "n", 1) > 1:
        yield
        return
    torch.set_num_threads(1)
    _WORKERS.n = threads
    try:
        yield
    finally:
        _WORKERS.n = 1
        torch.set_num_threads(threads)


#: glibc's mallopt parameters (malloc.h); how large a freed block :func:`reuse_freed_memory`
#: keeps; and where it leaves the thresholds afterwards: the ceiling of glibc's own dynamic
#: adjustment (mmap threshold 4 MiB * sizeof(long), trim threshold twice that), which a process
#: that frees blocks of a few MB reaches by itself and which setting either by hand turns off.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 256 * 2**20
_MMAP_AFTER = 4 * 2**20 * struct.calcsize("l")
_TRIM_AFTER = 2 * _MMAP_AFTER
_MALLOC = {"depth": 0, "libc": None}
_MALLOC_LOCK = threading.Lock()


def _mallopt():
    """glibc's ``mallopt``, or None (another C library, or none found)."""
    if _MALLOC["libc"] is None:
        import ctypes
        import platform

        fn = False
        if platform.libc_ver()[0] == "glibc":
            try:
                fn = ctypes.CDLL(None).mallopt
                fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _MALLOC["libc"] = fn
    return _MALLOC["libc"] or None


@contextlib.contextmanager
def reuse_freed_memory():
    """While it lasts, blocks of up to 256 MB that torch frees stay in the process for the next
    allocation (glibc's ``mallopt``), instead of going back to the kernel to be faulted in again
    page by page: a training step frees and reallocates the same weight-sized buffers (the
    bfloat16 copy of a wide first layer, its gradients) every time, and those page faults cost
    more than the step's products. Process-wide while it lasts. On exit the thresholds are set
    to the ceiling of glibc's dynamic adjustment, not to its start (128 KiB): a threshold set
    by hand stays fixed, and at 128 KiB every later chunk buffer of a few MB would be mapped
    and faulted in again page by page on every call. A no-op outside glibc.
    """
    fn = _mallopt()
    if fn is None:
        yield
        return
    with _MALLOC_LOCK:
        if _MALLOC["depth"] == 0:
            fn(_M_MMAP_THRESHOLD, _KEEP_BYTES)
            fn(_M_TRIM_THRESHOLD, _KEEP_BYTES)
        _MALLOC["depth"] += 1
    try:
        yield
    finally:
        with _MALLOC_LOCK:
            _MALLOC["depth"] -= 1
            if _MALLOC["depth"] == 0:
                fn(_M_MMAP_THRESHOLD, _MMAP_AFTER)
                fn(_M_TRIM_THRESHOLD, _TRIM_AFTER)


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool of ``workers`` threads, made anew after a fork or a change of size."""
    with _POOL_LOCK:
        if _POOL["pid"] != os.getpid() or _POOL["size"] != workers:
            old = _POOL["executor"] if _POOL["pid"] == os.getpid() else None
            _POOL.update(pid=os.getpid(), size=workers,
                         executor=ThreadPoolExecutor(workers, thread_name_prefix="featlearn"))
            if old is not None:
                old.shutdown(wait=False)
        return _POOL["executor"]


def n_workers(device: torch.device) -> int:
    """Worker threads :func:`over_rows` and :func:`over_chunks` use here (1 outside
    :func:`cpu_workers` or off the CPU)."""
    return getattr(_WORKERS, "n", 1) if device.type == "cpu" else 1


def over_rows(n: int, chunk: int, work, device: torch.device, alongside=None) -> None:
    """Call ``work(start, stop)`` over ``[0, n)`` split into chunk-aligned ranges: one per
    worker inside :func:`cpu_workers` on the CPU (when there are chunks enough), else one.

    ``alongside()``, when given, is called once by the calling thread after the workers start
    and before its own range: independent work (e.g. the next mini-batch's rows) that then
    overlaps theirs instead of waiting before or after the pass.
    """
    workers = n_workers(device)
    n_chunks = -(-n // chunk)
    workers = min(workers, n_chunks)
    if workers <= 1:
        if alongside is not None:
            alongside()
        work(0, n)
        return
    bounds = [min(n, chunk * (n_chunks * i // workers)) for i in range(workers + 1)]
    ranges = list(zip(bounds, bounds[1:]))
    # The calling thread takes the last range itself: one thread fewer to wake and join, which
    # is most of a small pass (a mini-batch step).
    futures = [_executor(workers).submit(work, a, b) for a, b in ranges[:-1]]
    try:
        if alongside is not None:
            alongside()
        work(*ranges[-1])
    finally:
        wait(futures)  # never leave a worker writing into buffers the caller moves on from
    for f in futures:
        f.result()


def over_chunks(n: int, chunk: int, make_work, device: torch.device) -> None:
    """Call ``work(start, stop)`` for every chunk ``[s, s + chunk)`` of ``[0, n)``, where each
    worker of :func:`cpu_workers` builds its own ``work = make_work()`` once (its buffers) and
    takes the next chunk from a shared counter; outside the workers, one ``work`` does them all.

    Chunks are handed out as workers free up, not split in advance, so a worker that the
    machine's other jobs slow down does fewer chunks instead of holding the pass back. An error
    in one worker stops the others at their next chunk and is raised here.
    """
    workers = min(n_workers(device), -(-n // chunk))
    if workers <= 1:
        work = make_work()
        for s in range(0, n, chunk):
            work(s, min(n, s + chunk))
        return
    starts = iter(range(0, n, chunk))
    lock, stop = threading.Lock(), threading.Event()

    def worker():
        try:
            work = make_work()
            while not stop.is_set():
                with lock:
                    s = next(starts, None)
                if s is None:
                    return
                work(s, min(n, s + chunk))
        except BaseException:
            stop.set()  # the others stop at their next chunk, whoever waits on which future
            raise

    futures = [_executor(workers).submit(worker) for _ in range(workers)]
    try:
        for f in futures:
            f.result()
    finally:  # an error or an interrupt here: no worker goes on writing after we return
        stop.set()
        for f in futures:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - the first error is already propagating
                pass


# -- torch datasets as streams of image batches --------------------------------------------------

#: Images per batch when a ``Dataset`` (rather than a ``DataLoader``, which keeps its own batch
#: size) is streamed: enough to amortize the per-batch work, small enough to stay cache-sized.
DATASET_BATCH = 256


def is_torch_data(obj) -> bool:
    """Whether ``obj`` is a torch ``Dataset`` or ``DataLoader`` (streamed, never an array)."""
    from torch.utils.data import DataLoader, Dataset

    return isinstance(obj, (Dataset, DataLoader))


def _sample_images(sample):
    """The images of one item a dataset yields: ``images``, or the first of ``(images, labels)``."""
    if isinstance(sample, (tuple, list)) and len(sample) > 0 and not _is_number(sample[0]):
        sample = sample[0]
    if isinstance(sample, dict):
        raise ValueError("a dataset yielding dicts is not supported: yield images or "
                         "(images, labels)")
    if isinstance(sample, torch.Tensor):
        return to_numpy(sample)
    return np.asarray(sample)  # numpy arrays, PIL images, nested lists


def _is_number(x):
    return isinstance(x, (int, float, np.number)) or (isinstance(x, torch.Tensor) and x.ndim == 0)


def _collate_images(samples):
    """``collate_fn`` that stacks the images of a list of samples into one numpy batch."""
    images = [_sample_images(s) for s in samples]
    for img in images[1:]:
        if img.shape != images[0].shape:
            raise ValueError(f"the dataset's images differ in shape ({images[0].shape} and "
                             f"{img.shape}); all images must have one size (resize them, e.g. "
                             "with torchvision.transforms.Resize)")
    return np.stack(images)


def _check_order(loader):
    """A shuffling loader would give features in an order no label can be matched to."""
    from torch.utils.data import RandomSampler

    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    if any(isinstance(s, RandomSampler) for s in samplers):
        raise ValueError("the DataLoader shuffles (shuffle=True), so its features could not be "
                         "matched to its labels; pass a DataLoader with shuffle=False")


def stream_length(data):
    """Images a ``Dataset``/``DataLoader`` will yield, when it says without being iterated."""
    from torch.utils.data import DataLoader

    try:
        if not isinstance(data, DataLoader):
            return len(data)
        if data.batch_sampler is None:  # no automatic batching: one sample per item
            return len(data.dataset)
        if data.batch_size is None:  # a custom batch_sampler: batch sizes unknown
            return None
        n = len(data.sampler)
        return (n // data.batch_size) * data.batch_size if data.drop_last else n
    except TypeError:  # an IterableDataset without __len__
        return None


def iter_image_batches(data, batch_size=DATASET_BATCH):
    """Yield the images of a torch ``Dataset`` or ``DataLoader`` as numpy batches, in order.

    Items may be images or ``(images, labels)`` (labels are dropped), as tensors on any device,
    numpy arrays or PIL images. A ``DataLoader`` yields its own batches; a ``Dataset`` is read
    through a ``DataLoader`` of ``batch_size`` samples (so one without ``__len__`` works too).
    Only one batch is held at a time. A shuffling ``DataLoader`` is refused (ValueError).
    """
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False,
                          collate_fn=_collate_images)
        for batch in data:
            yield batch
        return
    _check_order(data)
    if data.batch_sampler is None:  # automatic batching off: the loader yields single samples
        group = []
        for sample in data:
            group.append(sample)
            if len(group) == batch_size:
                yield _collate_images(group)
                group = []
        if group:
            yield _collate_images(group)
        return
    for batch in data:
        yield _sample_images(batch)


def has_fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are native (hence faster than float32) on ``device``.

    CUDA GPUs and CPUs with AVX512-BF16 or AMX run them in hardware; elsewhere (e.g. AVX2-only
    CPUs) torch emulates them, slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not hasattr(torch.cpu, "get_capabilities"):
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def has_fast_int8(device: torch.device) -> bool:
    """Whether int8 matrix products with int32 sums (``torch._int_mm``) run in hardware on the
    CPU ``device``: VNNI (AVX512-VNNI, AVX-VNNI) or AMX-INT8, at about twice the bfloat16
    rate. False off the CPU (featlearn's int8 k-means settles its products natively on the
    CPU only)."""
    if device.type != "cpu" or not hasattr(torch, "_int_mm"):
        return False
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni") or caps.get("amx_int8"))


def resolve_precision(precision: str, device) -> str:
    """``precision`` with ``"auto"`` resolved for ``device`` (a name or a device, resolved only
    then): bfloat16 where its products are native (:func:`has_fast_bfloat16`), else float32."""
    if precision != "auto":
        return precision
    return "bfloat16" if has_fast_bfloat16(resolve_device(device)) else "float32"
