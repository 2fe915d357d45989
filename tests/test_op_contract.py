"""The op and the loss as PyTorch ops: torch.compile, saved-tensor hooks, and no host reads.

- torch.compile(fullgraph=True) traces a Hugging Face model's packed forward plus PreferenceLoss
  (the op's custom op and fake implementation) without a graph break, and equals eager, gradients
  included.
- everything the backward needs is saved through save_for_backward: saved-tensor hooks (what
  save_on_cpu and activation offloading use) see the frozen head's [N, H] direction, and a
  backward through hooks that replace every saved tensor by a copy gives the same gradients.
- a default call of the op, the loss and the trainer's micro-batch reads no tensor value on the
  host (tests/host_reads.py stands in for torch.cuda.set_sync_debug_mode("error") on the CPU),
  forward and backward; check=True does (the detector is live).
"""
from fastpref.train.data import TokenizedPair

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastpref
from fastpref.train.packing import dense_attention_mask, pack_pairs
from host_reads import HostRead, no_host_reads
from reference import relative_error
from test_linear_logprobs import make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(vocab=97, seed=0):
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(DEVICE)


def packed_pairs():
    pairs = [TokenizedPair(prompt_ids=[1, 2, 3], chosen_ids=[4, 5, 6, 7], rejected_ids=[8, 9], row=0),
             TokenizedPair(prompt_ids=[11, 12], chosen_ids=[13, 14], rejected_ids=[15, 16, 17], row=1),
             TokenizedPair(prompt_ids=[20], chosen_ids=[21, 22, 23], rejected_ids=[24, 25, 26, 27], row=2)]
    return pack_pairs(pairs, prefix_sharing=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, outputs_softcap", [("sigmoid", 5.0), ("ipo", None)])
def test_compile_fullgraph_model_forward_and_loss_equal_eager(loss_type, outputs_softcap):
    model = tiny_llama()
    packed = packed_pairs()
    mask = dense_attention_mask(packed, torch.float32)
    loss_fn = fastpref.PreferenceLoss(loss_type, beta=0.1, softcap=outputs_softcap, temperature=0.9)
    reference = torch.randn(6, generator=torch.Generator().manual_seed(1)).to(DEVICE) - 20.0

    def step(input_ids, position_ids, attention_mask, loss_positions, targets, reference):
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                    logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1][0].index_select(0, loss_positions)
        loss, metrics = loss_fn(hidden, model.lm_head.weight, targets, packed.layout, reference)
        return loss, metrics["rewards/margins"]

    args = (packed.input_ids, packed.position_ids, mask, packed.loss_positions, packed.targets, reference)
    parameters = [p for p in model.parameters()]

    def run(fn):
        loss, margin = fn(*args)
        grads = torch.autograd.grad(loss, parameters)
        return loss.detach(), margin, grads

    eager = run(step)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True))
    assert relative_error(compiled[0], eager[0]) <= 1e-5
    # the margin is a small difference of two rewards: compared to their size, not its own
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(compiled[2], eager[2]):
        assert relative_error(ours, theirs) <= 1e-4


@pytest.mark.slow
def test_compile_fullgraph_op_with_every_output():
    hidden, weight, bias, targets, grad_out = make_inputs(23, 40, 150, torch.float32, with_bias=True, ignore_every=4)
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]

    def head(h, w, b):
        got = fastpref.linear_logprobs(h, w, targets, bias=b, softcap=3.0, logit_scale=0.8,
                                       outputs=fastpref.OUTPUT_NAMES)
        objective = (got.log_probs * grad_out).sum() + 0.3 * got.entropy.sum()
        return objective, got.log_sum_sq_probs, got.mean_logits, got.is_top1

    eager = head(*leaves)
    eager_grads = torch.autograd.grad(eager[0], leaves)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)(*leaves)
    compiled_grads = torch.autograd.grad(compiled[0], leaves)
    names = ["objective", "log_sum_sq_probs", "mean_logits", "d_hidden", "d_weight", "d_bias"]
    for name, ours, theirs in zip(names, compiled[:3] + compiled_grads, eager[:3] + eager_grads):
        # the compiled graph fuses the elementwise work around the op: float32 rounding, no more
        assert relative_error(ours, theirs) <= 1e-5, name
    assert torch.equal(compiled[3], eager[3]), "is_top1"


def test_saved_tensor_hooks_see_the_frozen_heads_direction():
    """A frozen head folds d_hidden into the forward as u [N, H]: saved through save_for_backward,
    so the hooks see it, and a backward through copies made by the hooks is the same."""
    hidden, weight, bias, targets, grad_out = make_inputs(31, 24, 90, torch.float32, ignore_every=5)
    hidden.requires_grad_()
    expected = torch.autograd.grad((fastpref.linear_logprobs(hidden, weight, targets) * grad_out).sum(), hidden)[0]

    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor.clone()  # the backward must read the hook's copy, not a tensor kept elsewhere

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logp = fastpref.linear_logprobs(hidden, weight, targets)
    (grad,) = torch.autograd.grad((logp * grad_out).sum(), hidden)
    assert torch.equal(grad, expected)
    assert ((31, 24), torch.float32) in saved[1:], f"the direction u is not among the saved tensors: {saved}"
    assert saved.count(((31,), torch.float32)) >= 2  # lse and miss


def test_save_on_cpu_offloads_the_op_and_the_loss():
    from test_losses import make_packed_batch

    hidden, weight, targets, layout, reference = make_packed_batch(3, 16, 50, torch.float32, seed=3)
    leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
    loss_fn = fastpref.PreferenceLoss("sigmoid", softcap=4.0)
    expected = torch.autograd.grad(loss_fn(*leaves, targets, layout, reference)[0], leaves)
    with torch.autograd.graph.save_on_cpu():
        loss, _ = loss_fn(*leaves, targets, layout, reference)
    for ours, theirs in zip(torch.autograd.grad(loss, leaves), expected):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_autocast_leaves_the_ops_precision_alone(backend, trainable_head):
    """Under a bfloat16 autocast, forward and backward included, the op and the loss compute in
    their inputs' float32, as without it (autocast would round the backends' matmuls)."""
    from test_losses import make_packed_batch

    hidden, weight, targets, layout, reference = make_packed_batch(3, 16, 70, torch.float32, seed=5)
    leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_(trainable_head)]
    loss_fn = fastpref.PreferenceLoss("sigmoid", softcap=4.0, backend=backend)

    def loss_and_grads():
        loss, _ = loss_fn(*leaves, targets, layout, reference)
        entropy = fastpref.linear_logprobs(leaves[0], leaves[1], targets, outputs=("entropy",),
                                           backend=backend).entropy.sum()
        return loss, torch.autograd.grad(loss + entropy, [x for x in leaves if x.requires_grad])

    expected_loss, expected_grads = loss_and_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads()
    assert loss.dtype == torch.float32 and torch.equal(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == torch.float32 and torch.equal(grad, expected)


OP_CALLS = {
    "plain": dict(),
    "ignored-rows": dict(ignore=True),
    "num-kept": dict(ignore=True, num_kept=True),
    "all-kept": dict(num_kept=True),
    "transform-and-outputs": dict(ignore=True, softcap=3.0, temperature=0.7, outputs=fastpref.OUTPUT_NAMES),
    "frozen-head": dict(ignore=True, frozen=True),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("call", OP_CALLS.values(), ids=OP_CALLS.keys())
def test_default_op_call_reads_nothing_on_the_host(backend, call):
    call = dict(call)
    hidden, weight, bias, targets, grad_out = make_inputs(19, 24, 70, torch.float32, with_bias=not call.get("frozen"),
                                                          ignore_every=4 if call.pop("ignore", False) else 0)
    leaves = [hidden.requires_grad_(), weight.requires_grad_(not call.pop("frozen", False))]
    if bias is not None:
        leaves.append(bias.requires_grad_())
    if call.pop("num_kept", False):
        call["num_kept"] = int((targets != -100).sum())
    with no_host_reads():
        got = fastpref.linear_logprobs(hidden, weight, targets, bias=bias, backend=backend, **call)
        logp = got if isinstance(got, torch.Tensor) else got.log_probs
        objective = (logp * grad_out).sum() + (0 if isinstance(got, torch.Tensor) else got.entropy.sum())
        torch.autograd.grad(objective, [x for x in leaves if x.requires_grad])


def test_check_true_reads_on_the_host():
    """The detector is live: check=True reads the flags, and it raises there."""
    hidden, weight, _, targets, _ = make_inputs(7, 8, 20, torch.float32)
    with pytest.raises(HostRead, match="tolist"), no_host_reads():
        fastpref.linear_logprobs(hidden, weight, targets, check=True)


def test_the_detector_sees_the_backward(monkeypatch):
    """A read planted in a backend's backward is caught: the check covers the backward's custom op."""
    from fastpref.backends import torch_backend

    backward = torch_backend.BACKEND.backward

    def reading_backward(*args, **kwargs):
        args[4].lse.sum().item()
        return backward(*args, **kwargs)

    monkeypatch.setattr(torch_backend.BACKEND, "backward", reading_backward)
    hidden, weight, _, targets, _ = make_inputs(7, 8, 20, torch.float32)
    logp = fastpref.linear_logprobs(hidden.requires_grad_(), weight.requires_grad_(), targets, backend="torch")
    with pytest.raises(HostRead, match="item"), no_host_reads():
        logp.sum().backward()


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto", "simpo"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_default_loss_call_reads_nothing_on_the_host(loss_type, backend):
    from test_losses import make_packed_batch

    hidden, weight, targets, layout, reference = make_packed_batch(3, 16, 50, torch.float32, seed=5,
                                                                    unpaired=loss_type == "kto")
    leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
    # the path GPUs take; the CPU's one-op loss (fastpref.head_loss) reads the layout by design
    loss_fn = fastpref.PreferenceLoss(loss_type, softcap=4.0, backend=backend, gradients_in_forward=False)
    with no_host_reads():
        loss, metrics = loss_fn(*leaves, targets, layout, None if loss_type == "simpo" else reference)
        torch.autograd.grad(loss, leaves)
    assert set(metrics) >= {"rewards/chosen", "logps/chosen"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_trainers_micro_batch_reads_nothing_on_the_host(tmp_path, small_data, attention, monkeypatch):
    """The trainer's micro-batch past the host's packing: the batch to the device, the reference
    log-probs from the cache, the packed forward of the embedded model, the fused loss (the two-op
    path a GPU takes, not the CPU's one-op loss), and the backward."""
    from fastpref import head_loss
    from fastpref.train.loop import Trainer
    from fastpref.train.packing import pack_pairs
    from test_trainer import config

    trainer = Trainer(config(tmp_path, small_data, attn_implementation=attention))
    pairs = trainer._micro_batches(0)[0]
    packed = pack_pairs(pairs, prefix_sharing=False)
    reference = trainer._reference_for(pairs)
    monkeypatch.setattr(head_loss, "unavailable_reason", lambda *_, **__: "the path a GPU takes")
    with no_host_reads():
        loss, metrics, _ = trainer._device_loss(packed, reference, trainer.forward_model)
        loss.backward()
    assert all(p.grad is not None for p in trainer.policy.parameters() if p.requires_grad)
