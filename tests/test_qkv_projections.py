"""``ddim_fast.qkv_projections``: one GEMM for an attention module's q/k/v (k/v for cross-attention) projections over
a buffer that is the projection weights' own storage. Results equal the separate projections within fp32 rounding,
whatever writes the weights (in place, through ``.data``, new storage), whichever processor runs them; what
cannot be fused exactly falls back, and unfusing gives every parameter its own storage back."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_rel_close

diffusers = pytest.importorskip("diffusers")

import tiny_pipelines as tp  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402

import ddim_fast  # noqa: E402
from ddim_fast.qkv_projections import fuse_qkv, unfuse_qkv  # noqa: E402

RTOL = 1e-6  # fp32 GEMMs blocked differently


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, tp.TEXT_TOKENS, tp.TEXT_DIM, generator=gen)


def _attn(unet, which: str = "attn1"):
    return getattr(unet.down_blocks[1].attentions[0].transformer_blocks[0], which)


def _fused_calls(fused) -> int:
    return sum(group.fused_calls for group in fused.groups.values())


@torch.no_grad()
@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor, ddim_fast.FusedAttnProcessor])
def test_fused_projections_equal_separate_ones(processor):
    unet = tp.tiny_unet()
    unet.set_attn_processor(processor())
    x, cond = _inputs()
    expected = unet(x, 500, cond).sample
    fused = fuse_qkv(unet)
    attention_modules = sum(1 for m in unet.modules() if isinstance(m, diffusers.models.attention_processor.Attention))
    assert fused.count == attention_modules and not fused.unserved
    assert [g.names for g in fused.groups.values()].count(("to_q", "to_k", "to_v")) == attention_modules // 2
    assert [g.names for g in fused.groups.values()].count(("to_k", "to_v")) == attention_modules // 2
    got = unet(x, 500, cond).sample
    assert _fused_calls(fused) == fused.count, "every module ran its fused GEMM once"
    assert_rel_close(got, expected, RTOL, f"fused QKV under {processor.__name__}")
    # Self-attention: the parameters are rows of one buffer, the same Parameter objects as before.
    group = fused.groups["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    weights = [linear.weight for linear in group.linears]
    assert all(w.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr() for w in weights)
    assert all(w.is_contiguous() for w in weights)


@torch.no_grad()
def test_our_triton_attention_reads_the_fused_projection_views():
    """On CUDA optimize fuses QKV and attention together: our Triton attention kernel then reads q, k and v as
    column slices of the packed GEMM output (row stride 3C or 2C). Under the interpreter here: the same output as
    with separate projections (on the CPU the 'auto' processor would run SDPA and never reach the kernel)."""
    unet = tp.tiny_unet()
    unet.set_attn_processor(ddim_fast.FusedAttnProcessor(backend="triton"))
    x, cond = _inputs()
    x = x[:1, :, :8, :8]  # the interpreter pays per program: the smallest latent the tiny UNet takes
    cond = cond[:1]
    expected = unet(x, 500, cond).sample
    fused = fuse_qkv(unet)
    got = unet(x, 500, cond).sample
    assert _fused_calls(fused) == fused.count
    assert_rel_close(got, expected, RTOL, "fused QKV views into the Triton attention kernel")


def test_inference_mode_fuses_and_then_normal_calls_still_work():
    """Inference tensors have no version counter: under torch.inference_mode the followers match by identity;
    the same fused model then runs under no_grad as before (graphs made under inference mode do not poison later
    calls: ddim_fast.graphs.make_static)."""
    unet = tp.tiny_unet()
    x, cond = _inputs()
    with torch.no_grad():
        expected = unet(x, 500, cond).sample
    fused = fuse_qkv(unet)
    with torch.inference_mode():
        got = unet(x, 500, cond).sample
    assert _fused_calls(fused) == fused.count, "every module ran its fused GEMM once"
    assert_rel_close(got, expected, RTOL, "fused QKV under inference_mode")
    with torch.no_grad():
        assert_rel_close(unet(x, 500, cond).sample, expected, RTOL, "fused QKV after inference_mode")
    assert _fused_calls(fused) == 2 * fused.count


def test_graph_buffers_made_under_inference_mode_serve_later_normal_calls():
    """The static-buffer path (what the CUDA graphs use) first entered under torch.inference_mode: a later call
    outside it writes its inputs into the same buffers (an inference tensor would refuse that write)."""
    from ddim_fast.module_graph import GraphedForward

    unet = tp.tiny_unet()
    x, cond = _inputs()
    with torch.no_grad():
        expected = unet(x, 500, cond).sample
    graphed = GraphedForward(unet, off_cuda="static").install()
    try:
        with torch.inference_mode():
            first = unet(x, 500, cond).sample
        with torch.no_grad():
            second = unet(x, 500, cond).sample
        assert graphed.cache.misses == 1 and graphed.cache.hits == 1
        assert torch.equal(first, expected) and torch.equal(second, expected)
    finally:
        graphed.uninstall()


@torch.no_grad()
def test_projections_are_the_modules_own_results():
    """Each wrapped projection returns what its nn.Linear gives, for the input it is called with: the shared GEMM
    serves only calls with the same (unwritten) input object."""
    unet = tp.tiny_unet()
    attn = _attn(unet)
    fuse_qkv(unet)
    x = torch.randn(2, 16, attn.to_q.in_features)
    y = torch.randn_like(x)

    def separate(linear, inp):
        return torch.nn.functional.linear(inp, linear.weight, linear.bias)

    q = attn.to_q(x)
    k_other = attn.to_k(y)  # another input: its own projection
    assert_rel_close(q, separate(attn.to_q, x), RTOL)
    assert torch.equal(k_other, separate(attn.to_k, y))
    q = attn.to_q(x)
    x.mul_(2.0)  # written in place after the shared GEMM: k and v must see the new values
    assert torch.equal(attn.to_k(x), separate(attn.to_k, x))
    assert torch.equal(attn.to_v(x), separate(attn.to_v, x))
    # The normal order: one GEMM, served results equal to the separate projections.
    q, k, v = attn.to_q(y), attn.to_k(y), attn.to_v(y)
    for linear, out in ((attn.to_q, q), (attn.to_k, k), (attn.to_v, v)):
        assert_rel_close(out, separate(linear, y), RTOL)
    assert attn.to_v(y) is not v  # served once: a second call projects again
    cross = _attn(unet, "attn2")
    context = torch.randn(2, tp.TEXT_TOKENS, tp.TEXT_DIM)
    k, v = cross.to_k(context), cross.to_v(context)
    assert_rel_close(k, separate(cross.to_k, context), RTOL)
    assert_rel_close(v, separate(cross.to_v, context), RTOL)


@torch.no_grad()
def test_weight_updates_are_seen_without_a_refresh():
    unet = tp.tiny_unet()
    x, cond = _inputs()
    fused = fuse_qkv(unet)
    attn = _attn(unet)
    group = fused.groups["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]

    def check(what):
        got = unet(x, 500, cond).sample
        restore = unfuse_qkv(unet, fused)
        expected = unet(x, 500, cond).sample
        assert restore == fused.count
        assert_rel_close(got, expected, RTOL, what)
        return got

    before = unet(x, 500, cond).sample
    # In place, through .data (PEFT's merge): writes the packed buffer itself.
    attn.to_k.weight.data.add_(0.5)
    after = unet(x, 500, cond).sample
    assert not torch.allclose(after, before)
    assert group.packs == 1
    check("in-place write through .data")

    # New storage for one weight (PEFT's safe merge, .to()): packed again on the next call.
    unet2 = tp.tiny_unet()
    fused = fuse_qkv(unet2)
    attn = _attn(unet2)
    group = fused.groups["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    plain = tp.tiny_unet()
    plain_attn = _attn(plain)
    for target in (attn, plain_attn):
        target.to_v.weight.data = target.to_v.weight.data * 3.0
    got = unet2(x, 500, cond).sample
    assert group.packs == 2 and group.holds()
    assert_rel_close(got, plain(x, 500, cond).sample, RTOL, "after param.data = new tensor")


def test_autograd_runs_the_separate_projections():
    unet = tp.tiny_unet()
    fused = fuse_qkv(unet)
    x, cond = _inputs()
    unet(x, 500, cond).sample.square().mean().backward()
    assert _fused_calls(fused) == 0, "the packed buffer is no leaf: with autograd on, no fused GEMM"
    attn = _attn(unet)
    assert all(linear.weight.grad is not None for linear in (attn.to_q, attn.to_k, attn.to_v))


class _Wrapped(torch.nn.Module):
    """What PEFT does to a projection it adapts: a module holding the original as base_layer."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x) * 1.5


@torch.no_grad()
def test_replaced_projections_fall_back_and_are_reported():
    unet = tp.tiny_unet()
    attn = _attn(unet)
    x, cond = _inputs()
    fused = fuse_qkv(unet)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    group = fused.groups[name]
    attn.to_q = _Wrapped(attn.to_q)  # after fusing: this module's group no longer holds
    got = unet(x, 500, cond).sample
    assert group.fused_calls == 0 and not group.valid
    unfuse_qkv(unet, fused)
    assert_rel_close(got, unet(x, 500, cond).sample, RTOL, "a module adapted after fusing")

    # Before fusing: left alone, with the reason.
    again = fuse_qkv(unet)
    assert again.unserved[name] == "to_q is a PEFT layer, not a plain nn.Linear"
    other = tp.tiny_unet()
    other.fuse_qkv_projections()
    assert set(fuse_qkv(other).unserved.values()) == {"fused by diffusers already (fuse_qkv_projections)"}


@torch.no_grad()
def test_unfuse_gives_each_parameter_its_own_storage():
    unet = tp.tiny_unet()
    params = dict(unet.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    fused = fuse_qkv(unet)
    assert fuse_qkv(unet).count == 0, "fusing twice leaves fused modules alone"
    assert unfuse_qkv(unet, fused) == fused.count
    for name, p in unet.named_parameters():
        assert p is params[name] and torch.equal(p, values[name])
        assert p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_compiled_code_fuses_and_follows_repacking():
    """Under torch.compile the fused GEMM is traced (data pointers cannot be read while tracing: the group's
    `valid` flag is, and FusedQKV.revalidate() before each call keeps it true)."""
    torch._dynamo.reset()
    unet = tp.tiny_unet()
    plain = tp.tiny_unet()
    fused = fuse_qkv(unet)
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    x, cond = _inputs()
    with torch.no_grad():
        assert_rel_close(compiled(x, 500, cond).sample, plain(x, 500, cond).sample, RTOL, "compiled")
        for model in (unet, plain):
            _attn(model).to_k.weight.data = _attn(model).to_k.weight.data + 0.25
        fused.revalidate()
        assert_rel_close(compiled(x, 500, cond).sample, plain(x, 500, cond).sample, RTOL, "compiled, repacked")
    torch._dynamo.reset()
