"""Cross-check against Liger-Kernel's fused-linear preference losses (run on CPU, uncompiled).

Same padded batch, same weights: loss and gradients of hidden and weight within 1e-4 (fp32).
"""
import pytest
import torch

import fastpref
from reference import relative_error

import liger_kernel.chunked_loss as chunked

BACKENDS = ["torch", "triton"]
TOLERANCE = 1e-4


def padded_batch(num_pairs=3, length=9, width=16, vocab=37, seed=0, rows=None):
    gen = torch.Generator().manual_seed(seed)
    rows = rows or 2 * num_pairs
    hidden = torch.randn(rows, length, width, generator=gen)
    ref_hidden = hidden + 0.2 * torch.randn(rows, length, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * (1.5 / width**0.5)
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    for row in range(rows):
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        pad = int(torch.randint(0, 3, (1,), generator=gen))
        targets[row, :prompt] = -100
        if pad:
            targets[row, -pad:] = -100
    return hidden, ref_hidden, weight, targets


def fastpref_run(backend, hidden, ref_hidden, weight, targets, reference, *, desirable=None,
                 kto_kl=None, **options):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    packed = fastpref.pack_padded(h, targets, desirable=desirable)
    ref = fastpref.ReferenceHead(packed.pack(ref_hidden), weight) if reference else None
    call = {"kto_kl": kto_kl} if kto_kl is not None else {}
    loss, _ = fastpref.PreferenceLoss(backend=backend, **options)(
        packed.hidden, w, packed.targets, packed.layout, ref, **call)
    return (loss, *torch.autograd.grad(loss, [h, w]))


def liger_run(module, call):
    h = call["_input"].clone().requires_grad_()
    w = call["lin_weight"].clone().requires_grad_()
    out = module(**{**call, "_input": h, "lin_weight": w})
    loss = out[0] if isinstance(out, tuple) else out
    return (loss, *torch.autograd.grad(loss, [h, w]))


def assert_close(ours, theirs):
    for name, a, b in zip(["loss", "d_hidden", "d_weight"], ours, theirs):
        err = relative_error(a, b)
        assert err <= TOLERANCE, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2),
                                                  ("apo_zero", 0.0), ("apo_down", 0.0)])
def test_dpo_family(backend, loss_type, smoothing):
    hidden, ref_hidden, weight, targets = padded_batch()
    liger = chunked.LigerFusedLinearDPOLoss(beta=0.3, compiled=False, use_ref_model=True,
                                            loss_type=loss_type, label_smoothing=smoothing)
    theirs = liger_run(liger, dict(lin_weight=weight, _input=hidden, target=targets,
                                   ref_input=ref_hidden, ref_weight=weight))
    ours = fastpref_run(backend, hidden, ref_hidden, weight, targets, True, loss_type=loss_type,
                        beta=0.3, label_smoothing=smoothing)
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_with_nll_is_rpo(backend):
    hidden, ref_hidden, weight, targets = padded_batch(seed=1)
    liger = chunked.LigerFusedLinearDPOLoss(beta=0.2, compiled=False, use_ref_model=True,
                                            compute_nll_loss=True, alpha=0.6)
    theirs = liger_run(liger, dict(lin_weight=weight, _input=hidden, target=targets,
                                   ref_input=ref_hidden, ref_weight=weight))
    ours = fastpref_run(backend, hidden, ref_hidden, weight, targets, True,
                        loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.6], beta=0.2)
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_nll", [False, True])
def test_simpo(backend, with_nll):
    hidden, ref_hidden, weight, targets = padded_batch(seed=2)
    liger = chunked.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.4, compiled=False,
                                              compute_nll_loss=with_nll, alpha=1.0)
    theirs = liger_run(liger, dict(lin_weight=weight, _input=hidden, target=targets))
    types = ["simpo", "sft"] if with_nll else "simpo"
    ours = fastpref_run(backend, hidden, ref_hidden, weight, targets, False, loss_type=types,
                        beta=2.0, simpo_gamma=0.4)
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo(backend):
    hidden, ref_hidden, weight, targets = padded_batch(seed=3)
    liger = chunked.LigerFusedLinearORPOLoss(beta=0.25, compiled=False)
    theirs = liger_run(liger, dict(lin_weight=weight, _input=hidden, target=targets))
    ours = fastpref_run(backend, hidden, ref_hidden, weight, targets, False, loss_type="orpo", beta=0.25)
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", [None, 0.3])
def test_kto(backend, kl):
    hidden, ref_hidden, weight, targets = padded_batch(seed=4, rows=5)
    desirable = torch.tensor([True, False, True, True, False])
    liger = chunked.LigerFusedLinearKTOLoss(beta=0.2, compiled=False, use_ref_model=True)
    call = dict(_input=hidden, lin_weight=weight, target=targets, preference_labels=desirable,
                ref_input=ref_hidden, ref_weight=weight)
    if kl is not None:
        call["kl"] = torch.tensor(kl)
    theirs = liger_run(liger, call)
    ours = fastpref_run(backend, hidden, ref_hidden, weight, targets, True, loss_type="kto",
                        beta=0.2, desirable=desirable, kto_kl=kl)
    assert_close(ours, theirs)
