"""Bad loss configurations and layouts fail at once with a message naming what is wrong."""
import pytest
import torch

import fastpref
from test_losses import make_packed_batch


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"loss_type": "dpop"}, ValueError, r"unknown loss_type 'dpop'; valid types: sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, "
         r"aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, simpo, orpo, kto \(dpo = sigmoid\)"),
        ({"loss_type": ["dpo", "sigmoid"]}, ValueError, r"lists a type twice: \['sigmoid', 'sigmoid'\]"),
        ({"loss_type": []}, ValueError, r"loss_type must name at least one"),
        ({"loss_type": ["sigmoid", "sigmoid"]}, ValueError, r"lists a type twice"),
        ({"loss_type": ["kto", "sft"]}, ValueError, r"'kto' is unpaired and cannot be combined"),
        ({"beta": 0.0}, ValueError, r"beta must be a number > 0, got 0.0"),
        ({"beta": -1}, ValueError, r"beta must be a number > 0"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError,
         r"label_smoothing must be a number that lies in \[0, 0.5\), got 0.5"),
        ({"loss_type": "robust", "label_smoothing": -0.1}, ValueError, r"label_smoothing must be a number that lies in"),
        ({"label_smoothing": 0.1}, ValueError, r"label_smoothing=0.1 is read by none of the loss types \['sigmoid'\] "
                                               r"\(it is read by exo_pair, robust, aot, aot_unpaired, simpo\)"),
        ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, ValueError,
         r"f_divergence_type='forward_kl' is read by none of the loss types \['nca_pair'\]"),
        ({"f_divergence_type": "kl"}, ValueError, r"f_divergence_type must be one of reverse_kl, forward_kl, "
                                                  r"js_divergence, alpha_divergence, got 'kl'"),
        ({"ld_alpha": 1.5}, ValueError, r"ld_alpha must be None or a number that lies in \[0, 1\], got 1.5"),
        ({"use_weighting": 1}, TypeError, r"use_weighting must be True or False"),
        ({"loss_type": "kto", "use_weighting": True}, ValueError, r"use_weighting=True is read by none"),
        ({"discopop_tau": 0}, ValueError, r"discopop_tau must be a number > 0"),
        ({"loss_type": "aot", "use_weighting": True}, ValueError, r"use_weighting=True \(WPO\) with loss_type 'aot': "
                                                                 r"it sorts the pairs"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ValueError, r"one weight per loss type \(2\), got 1"),
        ({"average_logps": "yes"}, TypeError, r"average_logps must be None, True or False"),
        ({"desirable_weight": 0}, ValueError, r"desirable_weight must be a number > 0"),
        ({"desirable_weight": 2.0}, ValueError, r"desirable_weight=2.0 is read by none of the loss types "
                                                r"\['sigmoid'\] \(it is read by kto\)"),
        ({"ignore_index": None}, TypeError, r"ignore_index must be an int"),
    ],
)
def test_bad_configuration(options, error, message):
    with pytest.raises(error, match=message):
        fastpref.PreferenceLoss(**options)


def test_dpo_is_another_name_for_sigmoid():
    assert fastpref.PreferenceLoss("dpo").spec == fastpref.PreferenceLoss("sigmoid").spec
    assert fastpref.PreferenceLoss(["dpo", "sft"]).spec.loss_types == ("sigmoid", "sft")


def test_reference_rules():
    hidden, weight, targets, layout, reference = make_packed_batch(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match=r"loss types \['sigmoid'\] need a reference"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, targets, layout)
    with pytest.raises(ValueError, match=r"loss types \['simpo'\] are reference-free: pass reference=None"):
        fastpref.PreferenceLoss("simpo")(hidden, weight, targets, layout, reference)
    with pytest.raises(ValueError, match=r"one value per sequence \(6\), got torch.float32 of shape \(5,\)"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, targets, layout, reference[:5])
    loss, metrics = fastpref.PreferenceLoss("ipo")(hidden, weight, targets, layout, reference * float("nan"))
    assert torch.isnan(loss) and metrics["non_finite_logps"] == 1  # let through, counted
    with pytest.raises(ValueError, match=r"reference log-probs must be finite"):
        fastpref.raise_pending_errors(non_finite=True)
    with pytest.raises(ValueError, match=r"reference log-probs must be finite"):
        fastpref.PreferenceLoss("ipo", check=True)(hidden, weight, targets, layout, reference * float("nan"))
    with pytest.raises(TypeError, match=r"reference must be None, a \[S\] tensor or a ReferenceHead"):
        fastpref.PreferenceLoss("ipo")(hidden, weight, targets, layout, [0.0] * 6)


def test_layout_and_tokens_must_agree():
    hidden, weight, targets, layout, reference = make_packed_batch(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match=r"layout describes \d+ tokens but hidden has N = \d+ rows"):
        fastpref.PreferenceLoss("sigmoid")(hidden[:-1], weight, targets[:-1], layout, reference)
    with pytest.raises(ValueError, match=r"targets must be 1-D of length N"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, targets[:-1], layout, reference)
    bad_targets = targets.clone()
    bad_targets[layout.response_mask.nonzero()[0, 0]] = -100
    with pytest.raises(ValueError, match=r"targets at response positions must be token ids"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, bad_targets, layout, reference)
    with pytest.raises(TypeError, match=r"layout must be a fastpref.PackedLayout"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, targets, {"cu_seqlens": None}, reference)


def test_paired_and_unpaired_layouts_are_not_mixed():
    hidden, weight, targets, layout, reference = make_packed_batch(3, 8, 20, torch.float32)
    with pytest.raises(ValueError, match=r"'kto' needs an unpaired layout"):
        fastpref.PreferenceLoss("kto")(hidden, weight, targets, layout, reference)
    with pytest.raises(ValueError, match=r"kto_kl is KTO's reference point"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, targets, layout, reference, kto_kl=0.1)
    hidden, weight, targets, unpaired, reference = make_packed_batch(3, 8, 20, torch.float32, unpaired=True)
    with pytest.raises(ValueError, match=r"need a paired layout"):
        fastpref.PreferenceLoss("sigmoid")(hidden, weight, targets, unpaired, reference)
    with pytest.raises(ValueError, match=r"kto_kl must be a finite scalar"):
        fastpref.PreferenceLoss("kto")(hidden, weight, targets, unpaired, reference, kto_kl=float("inf"))


def _stream(lengths=(3, 4, 2, 5)):
    cu = torch.tensor([0, *lengths]).cumsum(0)
    mask = torch.ones(int(cu[-1]), dtype=torch.bool)
    return cu, mask


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m, [0, 1], [2, 4]),
         r"pairs must point at sequences in \[0, 4\); got sequence 4"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m, [0, 1], [-1, 2]),
         r"pairs must point at sequences in \[0, 4\); got sequence -1"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m, [0, 1], [1, 2]),
         r"every sequence must belong to a pair, as chosen or as rejected: 4 sequences, 1 in no pair"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m, [0, 1, 3], [2, 1, 2]),
         r"pair 1 has the same sequence as chosen and as rejected"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m, [0, 1], [2]),
         r"one entry per pair, got 2 and 1"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu + 1, m, [0, 1], [2, 3]),
         r"cu_seqlens must start at 0 and end at the number of tokens 14"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m[:-1], [0, 1], [2, 3]),
         r"end at the number of tokens 13, got 0 ... 14"),
        (lambda cu, m: fastpref.PackedLayout.paired(torch.tensor([0, 3, 3, 9, 14]), m, [0, 1], [2, 3]),
         r"cu_seqlens must be strictly increasing"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m.clone().index_fill_(0, torch.arange(7, 9), False), [0, 1], [2, 3]),
         r"sequence 2 has no response tokens"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu, m.long(), [0, 1], [2, 3]),
         r"response_mask must be a 1-D bool tensor"),
        (lambda cu, m: fastpref.PackedLayout.paired(cu.float(), m, [0, 1], [2, 3]),
         r"cu_seqlens must be an integer tensor"),
        (lambda cu, m: fastpref.PackedLayout(cu, m),
         r"either paired .* or unpaired .*, exactly one"),
        (lambda cu, m: fastpref.PackedLayout.unpaired(cu, m, torch.tensor([True, False])),
         r"desirable must be a bool tensor with one label per sequence \(4\)"),
    ],
    ids=["pair-past-end", "negative-pair", "sequence-in-no-pair", "same-sequence-twice", "uneven-pairs", "offset-bounds",
         "short-mask", "empty-sequence", "no-response", "mask-dtype", "float-bounds", "no-pairing",
         "short-labels"],
)
def test_bad_layouts(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build(*_stream())


def test_pack_padded_checks_its_input():
    hidden = torch.randn(4, 6, 8)
    targets = torch.randint(0, 10, (4, 6))
    with pytest.raises(ValueError, match=r"hidden must be \[rows, T, H\]"):
        fastpref.pack_padded(hidden[0], targets)
    with pytest.raises(ValueError, match=r"targets must be \[rows, T\] = \(4, 6\)"):
        fastpref.pack_padded(hidden, targets[:, :5])
    with pytest.raises(ValueError, match=r"needs 2B rows .* got 3"):
        fastpref.pack_padded(hidden[:3], targets[:3])
    targets[2] = -100
    with pytest.raises(ValueError, match=r"row 2 has no target outside ignore_index"):
        fastpref.pack_padded(hidden, targets)
