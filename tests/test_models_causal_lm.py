"""What every decoder-only model (fastllm.models.GPT, Llama and its variants) must do alike:
left padding with HF-style position ids equals the unpadded sequence (no NaN anywhere),
gradient accumulation with num_items_in_batch equals the full batch exactly, bf16 weights
and autocast train, gradient checkpointing gives the same gradients, and
torch.compile(fullgraph=True) forward + backward equals eager. Tiny random configs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_models_gpt import tiny_gpt
from tests.test_models_llama import tiny_llama

V, T = 97, 13  # the tiny configs' vocabulary; an odd length on purpose
MODELS = {
    "gpt": tiny_gpt,
    "llama-sliding-window": lambda: tiny_llama(sliding_window=4),
    "qwen2-bias-tied": lambda: tiny_llama(qkv_bias=True, tie_word_embeddings=True),
}


@pytest.fixture(params=sorted(MODELS))
def make_model(request):
    torch.manual_seed(0)
    return MODELS[request.param]


def test_left_padding_with_position_ids_matches_unpadded(make_model):
    """HF's convention for batched prompts: left padding, positions counted from each
    sequence's first token. The padded rows see no key at all: zeros, never NaN."""
    model = make_model().eval()
    ids = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=position_ids).logits
    with torch.no_grad():
        alone = model(ids[1:, 4:]).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 4:], alone[0], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_num_items_in_batch_accumulation_equals_full_batch(make_model):
    """Unequal micro-batches with different numbers of valid targets, each loss normalised
    by the whole batch's count and their gradients accumulated, give the full batch's mean
    loss and gradient (the normalisation HF fixed in 2024)."""
    model = make_model()
    ids = torch.randint(0, V, (4, T))
    labels = ids.clone()
    labels[0, 2:] = -100  # micro-batch 1 has far fewer targets than micro-batch 2
    labels[1, 6:] = -100
    labels[3, :7] = -100
    full = model(ids, labels=labels).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n_items = (labels[:, 1:] != -100).sum()
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        loss = model(ids[sl], labels=labels[sl], num_items_in_batch=n_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


def test_bf16_weights_and_autocast_train_step(make_model):
    ids = torch.randint(0, V, (2, T))
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    model = make_model().to(torch.bfloat16)
    loss = model(ids, labels=ids).loss
    loss.backward()
    # float32 loss, as Hugging Face's causal LMs return it (fastllm.models.config.CausalLMOutput)
    assert loss.dtype == torch.float32 and abs(loss.item() - math.log(V)) < 0.5
    n_items = (ids[:, 1:] != -100).sum()
    summed = model(ids, labels=ids, num_items_in_batch=n_items).loss
    assert summed.dtype == torch.float32
    torch.testing.assert_close(summed.detach(), loss.detach(), atol=0, rtol=2**-8)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_gradient_checkpointing_gives_same_gradients(make_model):
    model = make_model()
    ids = torch.randint(0, V, (2, T))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_torch_compile_fullgraph_forward_backward(make_model):
    model = make_model()
    ids = torch.randint(0, V, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, 10:] = 0
    mask[1, 11:] = 0
    eager = model(ids, attention_mask=mask, labels=ids).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
