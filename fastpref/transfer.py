"""Host-to-device copies that do not make the host wait."""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`. A CPU tensor goes to a GPU through pinned memory, so that the copy is
    queued on the stream instead of making the host wait for it (a plain copy from pageable memory
    synchronises)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
