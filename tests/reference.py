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


def reference_sequence_logps(hidden, weight, targets, cu_seqlens, response_mask, bias=None):
    """Per-sequence summed response log-probs and response lengths, float64, from full logits."""
    logp = reference_logprobs(hidden, weight, torch.where(response_mask.cpu(), targets.cpu(), -100), bias)
    bounds = cu_seqlens.tolist()
    sums = torch.stack([logp[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    lengths = torch.tensor([int(response_mask[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])],
                           dtype=torch.float64)
    return sums, lengths


def _logsig(x):
    return torch.nn.functional.logsigmoid(x)


def reference_pair_loss(loss_type, seq, lengths, chosen, rejected, ref, *, beta, eps=0.0,
                        gamma=0.5, average=None):
    """One loss type, written pair by pair from its paper / TRL's DPOTrainer, float64."""
    averages = {"ipo": True, "simpo": True, "orpo": True}.get(loss_type, False)
    if average is not None and loss_type not in ("orpo", "sft"):
        averages = average
    chosen_tokens = sum(float(lengths[c]) for c in chosen)
    total = 0.0
    for c, r in zip(chosen, rejected):
        nc = lengths[c] if averages else 1.0
        nr = lengths[r] if averages else 1.0
        pc, pr = seq[c] / nc, seq[r] / nr
        rc, rr = (ref[c] / nc, ref[r] / nr) if ref is not None else (0.0, 0.0)
        logits = (pc - rc) - (pr - rr)
        nll = -seq[c] / chosen_tokens
        s = torch.sigmoid
        if loss_type == "sigmoid":
            term = -_logsig(beta * logits) * (1 - eps) - _logsig(-beta * logits) * eps
        elif loss_type == "robust":
            term = (-_logsig(beta * logits) * (1 - eps) + _logsig(-beta * logits) * eps) / (1 - 2 * eps)
        elif loss_type == "hinge":
            term = torch.relu(1 - beta * logits)
        elif loss_type == "ipo":
            term = (logits - 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            term = (1 - s(beta * (pc - rc))) + s(beta * (pr - rr))
        elif loss_type == "apo_down":
            term = s(beta * (pc - rc)) + (1 - s(beta * logits))
        elif loss_type == "simpo":
            x = beta * (pc - pr) - gamma
            term = -_logsig(x) * (1 - eps) - _logsig(-x) * eps
        elif loss_type == "orpo":
            log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
            term = -beta * _logsig(log_odds)
        elif loss_type == "sft":
            term = 0.0
        else:
            raise ValueError(loss_type)
        total = total + term / len(chosen)
        if loss_type in ("orpo", "sft"):
            total = total + nll
    return total


def reference_kto_loss(seq, lengths, desirable, ref, *, beta, kl=0.0, desirable_weight=1.0,
                       undesirable_weight=1.0, average=False):
    total = 0.0
    for s in range(len(seq)):
        scale = lengths[s] if average else 1.0
        logratio = (seq[s] - ref[s]) / scale
        if desirable[s]:
            total = total + desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
        else:
            total = total + undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return total / len(seq)


def reference_head_outputs(hidden, weight, targets, bias=None, ignore_index=-100, *, logit_scale=1.0,
                           softcap=None, temperature=1.0):
    """Every per-token output of the op in float64 on the CPU from the full transformed logits,
    0 (False) at ignored positions: {log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1,
    top_gap} (top_gap: the margin between the two largest logits, where is_top1 is decided)."""
    h, w = hidden.double().cpu(), weight.double().cpu()
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias.double().cpu()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    t = targets.cpu().long()
    kept = t != ignore_index
    safe = t.clamp(0, w.shape[0] - 1)[:, None]
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    top2 = logits.topk(min(2, logits.shape[1]), dim=-1).values
    outputs = {
        "log_probs": log_p.gather(1, safe)[:, 0],
        "entropy": -(p * torch.where(torch.isinf(log_p), 0.0, log_p)).sum(dim=-1),  # 0 log 0 = 0
        "log_sum_sq_probs": torch.log((p * p).sum(dim=-1)),
        "mean_logits": logits.mean(dim=-1),
        "is_top1": logits.argmax(dim=-1) == t,
        "top_gap": top2[:, 0] - top2[:, -1],
    }
    return {name: torch.where(kept, value, torch.zeros_like(value)) for name, value in outputs.items()}
