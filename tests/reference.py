"""Float64 materialized reference for the fused ops (the very thing fastpref avoids at scale)."""
import torch


def reference_logprobs(hidden, weight, targets, bias=None, ignore_index=-100):
    """log softmax(h W^T + b)[t] in float64 on the CPU, 0 at ignored positions."""
    h, w = hidden.double().cpu(), weight.double().cpu()
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias.double().cpu()
    t = targets.cpu().long()
    kept = t != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(1, t.clamp(0, w.shape[0] - 1)[:, None])[:, 0]
    return torch.where(kept, logp, torch.zeros_like(logp))


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (0 when both are exactly 0)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    denom = expected.norm()
    diff = (actual - expected).norm()
    return float(diff / denom) if denom > 0 else float(diff)
