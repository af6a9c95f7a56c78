"""GpuTelemetry: memory, power and utilisation of the GPUs through NVML (nvidia-ml-py).

Without the `pynvml` module, an NVIDIA driver or a GPU, `.available` is False (and
`.unavailable_reason` says why), `sample()` returns {} and nothing is printed or raised.
Keys of sample(), per NVML device index i (NVML ignores CUDA_VISIBLE_DEVICES; pass
`device_indices` to restrict, e.g. to the local rank's GPU):
    "gpu{i}/memory_used_gib", "gpu{i}/power_w", "gpu{i}/utilization_pct"
A reading the device does not support is left out; the others are still returned.
"""
from typing import Dict, Iterable, Optional


class GpuTelemetry:
    def __init__(self, device_indices: Optional[Iterable[int]] = None):
        self.available = False
        self.unavailable_reason: Optional[str] = None
        self._nvml = None
        self._handles = {}
        try:
            import pynvml
        except Exception as error:  # not installed, or broken install
            self.unavailable_reason = f"pynvml not importable: {error}"
            return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            indices = range(count) if device_indices is None else [i for i in device_indices if 0 <= i < count]
            self._handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
        except pynvml.NVMLError as error:
            self.unavailable_reason = f"NVML unavailable: {error}"
            return
        self._nvml = pynvml
        self.available = bool(self._handles)
        if not self.available:
            self.unavailable_reason = "NVML found no GPU"

    def _read(self, reader, handle):
        try:
            return reader(handle)
        except self._nvml.NVMLError:
            return None

    def sample(self) -> Dict[str, float]:
        """One reading per device; {} when not available."""
        if not self.available:
            return {}
        nvml, result = self._nvml, {}
        for i, handle in self._handles.items():
            memory = self._read(nvml.nvmlDeviceGetMemoryInfo, handle)
            power_mw = self._read(nvml.nvmlDeviceGetPowerUsage, handle)
            rates = self._read(nvml.nvmlDeviceGetUtilizationRates, handle)
            if memory is not None:
                result[f"gpu{i}/memory_used_gib"] = memory.used / 2**30
            if power_mw is not None:
                result[f"gpu{i}/power_w"] = power_mw / 1000.0
            if rates is not None:
                result[f"gpu{i}/utilization_pct"] = float(rates.gpu)
        return result

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None
        self.available = False
        self._handles = {}
