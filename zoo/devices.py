"""GPU utilisation and memory for metric snapshots (empty on a machine without CUDA).

Memory comes from CUDA itself (``torch.cuda.mem_get_info``: the whole device, every process);
utilisation needs NVML (the ``nvidia-ml-py`` package), read through torch when it is installed,
and is reported as unknown (−1) otherwise rather than guessed.
"""

from __future__ import annotations

import torch

from shared.schemas import GpuStats


def device_stats() -> list[GpuStats]:
    if not torch.cuda.is_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        try:
            utilization = torch.cuda.utilization(index) / 100
        except Exception:  # no NVML here: unknown, not zero
            utilization = -1.0
        out.append(
            GpuStats(
                index=index,
                name=torch.cuda.get_device_name(index),
                utilization=utilization,
                memory_used_bytes=total - free,
                memory_total_bytes=total,
            )
        )
    return out
