"""Int4 weights packed for ATen's CPU int4 kernel: the same grid, the decode gate's extra weights, the file."""

import pytest
import torch
from torch import nn

from lightning_quantum.models import CausalLM
from lightning_quantum.quantization import Int4CpuLinear, pack_int4_for_cpu, quantize_weights_int4


def _random_lm():
    torch.manual_seed(0)
    sizes = {"vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
    return CausalLM(**sizes, context=48).eval()


def _asymmetric_int4(model, group_size):
    """torchao int4 weight-only with zero points (the project's configs are symmetric: zero points of 0)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(group_size), mapping_type=MappingType.ASYMMETRIC
    )
    quantize_(model, config, filter_fn=lambda m, _: type(m) is nn.Linear)
    return model


@pytest.mark.parametrize("zero_points", [False, True])
def test_packed_weights_compute_the_int4_models_logits(zero_points):
    """With fp32 activations the kernel computes the int4 model's products on the same grid (other summation
    order: 1e-5); with bf16 activations (the fast path) the logits move by bf16's rounding, about 1e-2 here."""
    lm = _random_lm()
    int4 = _asymmetric_int4(lm, 32) if zero_points else quantize_weights_int4(lm, group_size=32)
    assert bool((int4.model.lm_head.weight.zero_point != 0).any()) is zero_points
    tokens = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    exact = pack_int4_for_cpu(int4, activation_dtype="float32")
    fast = pack_int4_for_cpu(int4)
    assert isinstance(fast.model.lm_head, Int4CpuLinear) and fast.model.lm_head.activation_dtype == torch.bfloat16
    assert type(int4.model.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"  # the model is not changed
    with torch.inference_mode():
        expected = int4(tokens)
        torch.testing.assert_close(exact(tokens), expected, atol=1e-5, rtol=1e-5)
        moved = (fast(tokens) - expected).abs().max().item()
    assert 0 < moved < 5e-2
    linears = [m for m in fast.modules() if isinstance(m, Int4CpuLinear)]
    assert len(linears) == 2 * 7 + 1 and not [m for m in fast.modules() if type(m) is nn.Linear]
    # two int4 values per byte, bf16 (scale, zero) per group: smaller than torchao's one value per byte
    packed_bytes = sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
    unpacked = [m.weight for m in int4.modules() if isinstance(m, nn.Linear)]
    assert packed_bytes < sum(w.qdata.numel() for w in unpacked)


def test_packing_refuses_what_the_kernel_cannot_take():
    lm = _random_lm()
    with pytest.raises(ValueError, match=r"`activation_dtype`='int8' is not valid. Choose one of: 'bfloat16'"):
        pack_int4_for_cpu(quantize_weights_int4(lm, group_size=32), activation_dtype="int8")
    with pytest.raises(ValueError, match="CausalLM has no int4 weight-only linear to pack"):
        pack_int4_for_cpu(lm)
    with pytest.raises(ValueError, match=r"has int4 groups of 16: ATen's CPU int4 kernel takes groups of 32, 64"):
        pack_int4_for_cpu(quantize_weights_int4(lm, group_size=16))
    with pytest.raises(TypeError, match="`linear` must have a torchao int4 weight-only weight, got Parameter"):
        Int4CpuLinear(nn.Linear(64, 8))


def test_the_decode_gate_measures_the_packed_weights_and_their_file_reloads(tmp_path):
    """The decode gate adds the int4 model's weights packed for the kernel as a candidate of its own, judged by
    its own perplexity; a packed decoder saved by ``save_decoder`` is packed again on loading, identically."""
    from lightning_quantum.models.decoding import INT4_KERNEL_WEIGHTS, choose_decoder, load_decoder, save_decoder

    lm = _random_lm()
    blocks = [torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    int4 = quantize_weights_int4(lm, group_size=32)
    _, decision = choose_decoder(int4, blocks, forms=["generate"], prompt_tokens=8, new_tokens=8, repeats=1, rounds=1)
    trained, packed = decision.candidates
    assert (trained.weights, packed.weights) == ("as trained", INT4_KERNEL_WEIGHTS)
    assert packed.eligible and "within budget" in packed.note and packed.tokens_per_second > 0
    assert abs(packed.perplexity - trained.perplexity) < 0.01 * trained.perplexity
    _, float_only = choose_decoder(lm, blocks, forms=["generate"], prompt_tokens=8, new_tokens=8, repeats=1, rounds=1)
    assert [c.weights for c in float_only.candidates] == ["as trained"]  # nothing to pack
    _, off = choose_decoder(
        int4, blocks, forms=["generate"], prompt_tokens=8, new_tokens=8, repeats=1, rounds=1, int4_kernel=False
    )
    assert [c.weights for c in off.candidates] == ["as trained"]
    fast = pack_int4_for_cpu(int4)
    decision.weights, decision.form = INT4_KERNEL_WEIGHTS, "generate"
    save_decoder(fast, decision, tmp_path)
    back = load_decoder(tmp_path)
    assert isinstance(back.model.lm_head, Int4CpuLinear)
    with torch.inference_mode():
        assert torch.equal(back(blocks[0]), fast(blocks[0]))
        prompt = blocks[0][:1, :8]
        assert torch.equal(back.generate(prompt, max_new_tokens=8), fast.generate(prompt, max_new_tokens=8))


def test_a_saved_int4_decoder_loads_in_a_fresh_process(tmp_path):
    """``torch.load(weights_only=True)`` refuses torchao's tensor classes until torchao has registered them: in a
    fresh process ``load_decoder`` of an int4 model's decoder failed before it imported torchao first."""
    import subprocess
    import sys

    from lightning_quantum.models.decoding import INT4_KERNEL_WEIGHTS, DecodeDecision, load_decoder, save_decoder

    fast = pack_int4_for_cpu(quantize_weights_int4(_random_lm(), group_size=32))
    decision = DecodeDecision("generate", INT4_KERNEL_WEIGHTS, "set by the test", [], 8, 8, 0.01, 1, 0.0)
    save_decoder(fast, decision, tmp_path)
    prompt = torch.randint(1, 300, (1, 8), generator=torch.Generator().manual_seed(1))
    torch.save(prompt, tmp_path / "prompt.pt")
    script = (
        "import sys, torch; from lightning_quantum.models.decoding import load_decoder; "
        "d = load_decoder(sys.argv[1]); p = torch.load(sys.argv[1] + '/prompt.pt'); "
        "torch.save(d.generate(p, max_new_tokens=6, min_new_tokens=6), sys.argv[1] + '/tokens.pt')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True)
    expected = load_decoder(tmp_path).generate(prompt, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), expected)


@pytest.mark.slow
def test_the_compiled_decode_step_runs_the_packed_weights():
    """The deployed decode loop (compiled static-cache step) on packed weights gives their eager greedy tokens."""
    from lightning_quantum.models import StaticCacheDecoder

    fast = pack_int4_for_cpu(quantize_weights_int4(_random_lm(), group_size=32))
    prompt = torch.randint(1, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = fast.generate(prompt, max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(StaticCacheDecoder(fast).generate(prompt, max_new_tokens=12, min_new_tokens=12), expected)
