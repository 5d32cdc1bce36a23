"""Resource telemetry: GPU memory/utilization through NVML and host RSS, sampled in a
background thread while training or benchmarking.

NVML (the ``pynvml`` module of the ``nvidia-ml-py`` package) reads what the driver sees:
all memory of the process on the GPU, CUDA context and cuDNN workspaces included, which
``torch.cuda.max_memory_allocated`` does not count. On a machine without a GPU only the
resident set size of this process is sampled.

NVML is optional everywhere: without ``pynvml``, without a driver, or when a query fails
mid-run (MIG slices and some virtual GPUs refuse the utilization query), GPU fields stay
``None`` and sampling of the host goes on; nothing here raises because of NVML.
``gpu_index`` is the CUDA device index as torch numbers it; under ``CUDA_VISIBLE_DEVICES``
it is mapped to NVML's numbering through the PCI bus id.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nvml_devices() -> tuple[list[dict], str | None]:
    """``([{index, name, memory_total, memory_used, driver}], None)``, or ``([], reason)``
    when NVML is not there or sees no GPU."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml (package nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError subclasses differ by version
        return [], f"NVML could not start ({e}); no NVIDIA driver on this machine"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(
                dict(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else name,
                    memory_total=int(mem.total),
                    memory_used=int(mem.used),
                    driver=driver,
                )
            )
        return out, None if out else "NVML sees no GPU"
    finally:
        pynvml.nvmlShutdown()


def _nvml_handle(pynvml, cuda_index: int):
    """NVML's handle of CUDA device ``cuda_index`` (torch's numbering): by PCI bus id when
    torch can tell it (``CUDA_VISIBLE_DEVICES`` renumbers devices for CUDA, not for NVML),
    else by index."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        try:
            import torch

            props = torch.cuda.get_device_properties(cuda_index)
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
        except Exception:  # noqa: BLE001 - old torch, no CUDA, NVML disagrees: use the index
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


def gpu_free_bytes(cuda_index: int) -> int | None:
    """Free memory of CUDA device ``cuda_index`` (torch's numbering) as NVML reports it, or
    ``None`` where NVML cannot tell. Unlike ``torch.cuda.mem_get_info`` it creates no CUDA
    context (a few hundred MiB that would stay on that GPU for the life of the process)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no pynvml, no driver
        return None
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(pynvml, cuda_index)).free)
    except Exception:  # noqa: BLE001 - no such device, a query NVML refuses
        return None
    finally:
        pynvml.nvmlShutdown()


@dataclass
class Summary:
    seconds: float = 0.0
    samples: int = 0
    peak_rss: int = 0
    peak_gpu_memory: int | None = None
    mean_gpu_util: float | None = None
    gpu_util_trace: list[float] = field(default_factory=list)


class Telemetry:
    """Sample RSS (and, with a GPU, NVML memory used and utilization of ``gpu_index``)
    every ``interval`` seconds in a daemon thread::

        with Telemetry(gpu_index=0) as tel:
            train()
        print(tel.summary().peak_rss)
    """

    def __init__(self, interval: float = 0.2, gpu_index: int | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval
        self.gpu_index = gpu_index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._summary = Summary()
        self._utils: list[float] = []
        self._start = 0.0
        self._handle = None
        self._nvml = None

    def _open_gpu(self) -> None:
        if self.gpu_index is None:
            return
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no driver: no GPU telemetry, not an error
            return
        self._nvml = pynvml  # initialized: shut down in stop()
        try:
            self._handle = _nvml_handle(pynvml, self.gpu_index)
        except Exception:  # noqa: BLE001 - no GPU telemetry is not an error
            self._handle = None

    def _sample(self) -> None:
        s = self._summary
        s.samples += 1
        s.peak_rss = max(s.peak_rss, rss_bytes())
        if self._handle is not None:
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
                s.peak_gpu_memory = max(s.peak_gpu_memory or 0, int(mem.used))
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                self._utils.append(float(util.gpu))
            except Exception:  # noqa: BLE001 - a query NVML refuses here: stop asking
                self._handle = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> Telemetry:
        if self._thread is not None:
            raise RuntimeError("Telemetry already started")
        self._open_gpu()
        self._start = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="spar-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Summary:
        if self._thread is None:
            return self._summary
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        s = self._summary
        s.seconds = time.perf_counter() - self._start
        s.peak_rss = max(s.peak_rss, peak_rss_bytes())
        if self._utils:
            s.gpu_util_trace = list(self._utils)
            s.mean_gpu_util = sum(self._utils) / len(self._utils)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down NVML must not fail a run
                pass
            self._nvml = self._handle = None
        return s

    def summary(self) -> Summary:
        return self._summary

    def __enter__(self) -> Telemetry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
