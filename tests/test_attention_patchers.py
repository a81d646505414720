"""patch_attention (ldm CrossAttention, found by structure) and FusedAttnProcessor (diffusers) give the
original modules' outputs (fp32: relative error <= 1e-5, docs/design.md's drop-in tolerance), with the backend
'auto' chooses (SDPA on the CPU; our C++ kernel for ldm's bool masks) and with our fused kernel forced
('fused'). Which backend each call runs is tested in tests/test_attention_choice.py."""

from __future__ import annotations

import pytest
import torch
from torch import einsum, nn

import ddim_fast
from conftest import SAMPLER_RTOL, assert_rel_close

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402


class CrossAttention(nn.Module):
    """Stability-AI ldm/modules/attention.py CrossAttention, structure and math, without einops."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        h = self.heads
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context)

        def split(t):  # 'b n (h d) -> (b h) n d'
            b, n, _ = t.shape
            return t.reshape(b, n, h, -1).permute(0, 2, 1, 3).reshape(b * h, n, -1)

        q, k, v = split(q), split(k), split(v)
        sim = einsum("b i d, b j d -> b i j", q.float(), k.float()) * self.scale  # _ATTN_PRECISION == "fp32"
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            max_neg_value = -torch.finfo(sim.dtype).max
            mask = mask.repeat_interleave(h, dim=0)[:, None, :]  # 'b j -> (b h) () j'
            sim.masked_fill_(~mask, max_neg_value)
        sim = sim.softmax(dim=-1)
        out = einsum("b i j, b j d -> b i d", sim.to(v.dtype), v)
        b = out.shape[0] // h
        out = out.reshape(b, h, out.shape[1], -1).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
        return self.to_out(out)


class TinyLdmBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = CrossAttention(32, heads=4, dim_head=8)  # self-attention
        self.attn2 = CrossAttention(32, context_dim=24, heads=2, dim_head=40)  # cross, SD's d = 40
        self.other = nn.Linear(32, 32)

    def forward(self, x, context=None, mask=None):
        x = self.attn1(x) + x
        return self.attn2(x, context=context, mask=mask) + x


BACKENDS = ["auto", "fused"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_ldm_cross_attention(backend):
    torch.manual_seed(0)
    model = TinyLdmBlock().eval()
    x, context = torch.randn(2, 70, 32), torch.randn(2, 77, 24)
    mask = torch.rand(2, 77) > 0.3
    mask[0] = False  # fully masked: ldm's masked_fill gives a uniform row
    with torch.no_grad():
        expected = model(x, context, mask)
        expected_no_mask = model(x, context)
        original_forward = model.attn1.forward
        assert ddim_fast.patch_attention(model, backend=backend) == 2
        assert ddim_fast.patch_attention(model, backend=backend) == 0  # idempotent
        assert "forward" in model.attn1.__dict__ and "forward" in model.attn2.__dict__
        got = model(x, context, mask)
        got_no_mask = model(x, context)
        assert not torch.allclose(expected, expected_no_mask)
        assert_rel_close(got, expected, SAMPLER_RTOL, "patched ldm (mask)")
        assert_rel_close(got_no_mask, expected_no_mask, SAMPLER_RTOL, "patched ldm")
        assert ddim_fast.unpatch_attention(model) == 2
        assert "forward" not in model.attn1.__dict__ and model.attn1.forward == original_forward
        assert torch.equal(model(x, context, mask), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_ldm_fp16_storage(backend):
    torch.manual_seed(1)
    model = CrossAttention(32, context_dim=24, heads=2, dim_head=40).eval()
    x, context = torch.randn(2, 40, 32), torch.randn(2, 77, 24)
    with torch.no_grad():
        expected = model(x, context)
        ddim_fast.patch_attention(model.half(), backend=backend)
        got = model(x.half(), context.half())
    assert got.dtype == torch.float16
    assert_rel_close(got, expected, 5e-3, "patched ldm fp16")


def test_patch_skips_diffusers_attention_and_rejects_non_modules():
    model = nn.Sequential(Attention(query_dim=32, heads=2, dim_head=16), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no ldm CrossAttention .* 1 diffusers Attention modules: use "
                                         r"unet.set_attn_processor\(ddim_fast.FusedAttnProcessor\(\)\)"):
        ddim_fast.patch_attention(model)
    assert ddim_fast.patch_attention(model, allow_none=True) == 0
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ddim_fast.patch_attention("not a model")
    with pytest.raises(ValueError, match="patch_attention: backend must be one of"):
        ddim_fast.patch_attention(TinyLdmBlock(), backend="flash")


def _compare_processors(attn: Attention, *args, backend="auto", **kwargs):
    attn.eval()
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(*args, **kwargs)
        attn.set_processor(ddim_fast.FusedAttnProcessor(backend))
        got = attn(*args, **kwargs)
    assert_rel_close(got, expected, SAMPLER_RTOL, "FusedAttnProcessor")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_processor_attention_features(backend):
    torch.manual_seed(0)
    # 4-D input, group_norm, norm_cross, residual_connection, rescale_output_factor, a float mask.
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=40, norm_num_groups=8,
                     cross_attention_norm="layer_norm", residual_connection=True, rescale_output_factor=2.0, bias=True)
    hidden = torch.randn(2, 32, 6, 5)
    context = torch.randn(2, 77, 24)
    mask = torch.zeros(2, 1, 77)
    mask[1, :, 50:] = -10000.0
    _compare_processors(attn, hidden, encoder_hidden_states=context, attention_mask=mask, backend=backend)
    # Self-attention on 3-D input with spatial_norm (VAE decoder style) and a key-padding mask.
    attn = Attention(query_dim=32, heads=4, dim_head=8, spatial_norm_dim=4)
    hidden = torch.randn(2, 32, 4, 4)
    temb = torch.randn(2, 4, 2, 2)
    _compare_processors(attn, hidden, temb=temb, backend=backend)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    self_mask = torch.zeros(2, 1, 20)
    self_mask[0, :, 15:] = -10000.0
    _compare_processors(attn, torch.randn(2, 20, 32), attention_mask=self_mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_processor_unet(backend):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    sample = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 24)
    encoder_mask = torch.ones(2, 77, dtype=torch.bool)
    encoder_mask[1, 40:] = False
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(sample, 10, context).sample
        expected_masked = unet(sample, 10, context, encoder_attention_mask=encoder_mask).sample
        unet.set_attn_processor(ddim_fast.FusedAttnProcessor(backend))
        got = unet(sample, 10, context).sample
        got_masked = unet(sample, 10, context, encoder_attention_mask=encoder_mask).sample
    assert_rel_close(got, expected, SAMPLER_RTOL, "UNet with FusedAttnProcessor")
    assert_rel_close(got_masked, expected_masked, SAMPLER_RTOL, "UNet with FusedAttnProcessor, masked")
    assert not torch.allclose(expected_masked, expected), "the encoder mask had no effect: the test would prove nothing"
    assert all(isinstance(p, ddim_fast.FusedAttnProcessor) for p in unet.attn_processors.values())


def test_fused_processor_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ddim_fast.FusedAttnProcessor(backend="flash")


# ---- fuse_attention / unfuse_attention: which modules FusedAttnProcessor serves, and the way back -------------


def _attention_zoo():
    from diffusers.models.attention_processor import (AttnAddedKVProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0,
                                                      JointAttnProcessor2_0, SlicedAttnProcessor)

    torch.manual_seed(0)
    zoo = nn.ModuleDict({
        "sdpa": Attention(query_dim=32, heads=2, dim_head=16),
        "classic": Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=40, processor=AttnProcessor()),
        "sliced": Attention(query_dim=32, heads=4, dim_head=8, processor=SlicedAttnProcessor(slice_size=1)),
        # AttnProcessor2_0 ignores attn.scale (SDPA's default 1/sqrt(d)), as FusedAttnProcessor does: served.
        "sdpa_scale_one": Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False, processor=AttnProcessor2_0()),
        # The classic processor applies attn.scale = 1 here: not what the fused processor computes.
        "classic_scale_one": Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False),
        "ip_adapter": Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16,
                                processor=IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24)),
        "added_kv": Attention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=24,
                              processor=AttnAddedKVProcessor2_0()),
        "joint": Attention(query_dim=32, heads=2, dim_head=16, processor=JointAttnProcessor2_0()),
        "head_dim_320": Attention(query_dim=32, heads=1, dim_head=320),
        "float64": Attention(query_dim=32, heads=2, dim_head=16).double(),
    })
    return zoo.eval()


def test_fuse_attention_serves_what_it_reproduces_and_names_the_rest():
    zoo = _attention_zoo()
    originals = {name: module.processor for name, module in zoo.items()}
    x = torch.randn(2, 12, 32)
    context = torch.randn(2, 77, 24)
    args = {"classic": dict(encoder_hidden_states=context)}
    with torch.no_grad():
        expected = {name: zoo[name](x, **args.get(name, {})) for name in ("sdpa", "classic", "sliced", "sdpa_scale_one")}
        fused = ddim_fast.fuse_attention(zoo, backend="fused")  # our kernel, so that it visibly ran
        got = {name: zoo[name](x, **args.get(name, {})) for name in expected}
    assert sorted(fused.originals) == sorted(expected)
    assert fused.count == 4 and fused.already == 0
    assert all(fused.originals[name] is originals[name] for name in expected)
    for name in expected:
        assert isinstance(zoo[name].processor, ddim_fast.FusedAttnProcessor)
        assert_rel_close(got[name], expected[name], SAMPLER_RTOL, f"fused {name}")
        assert not torch.equal(got[name], expected[name]), f"{name}: the fused kernel did not run"
    reasons = fused.unserved
    assert reasons["classic_scale_one"] == ("AttnProcessor with softmax scale 1 (the fused processor uses "
                                            "1/sqrt(head_dim))")
    assert reasons["ip_adapter"].startswith("IPAdapterAttnProcessor2_0: IP-Adapter image-prompt attention")
    assert reasons["added_kv"] == "AttnAddedKVProcessor2_0: added key/value projections"
    assert reasons["joint"].startswith("JointAttnProcessor2_0: joint attention")
    assert reasons["head_dim_320"] == "head_dim 320 > 256, the fused kernels' limit"
    assert reasons["float64"].startswith("torch.float64 weights")
    assert set(reasons) | set(expected) == set(zoo)
    assert all(zoo[name].processor is originals[name] for name in reasons)  # left exactly as they were
    summary = fused.unserved_summary()
    assert "IP-Adapter" in summary and "head_dim 320" in summary and summary.count(";") == len(reasons) - 1

    # Fusing again counts the modules that already run it, changes nothing.
    again = ddim_fast.fuse_attention(zoo)
    assert again.count == 0 and again.already == 4
    # The way back: the very same processor objects (nn.Module processors stay registered submodules).
    zoo["sliced"].set_processor(AttnProcessor2_0())  # the user's own change since: kept
    assert ddim_fast.unfuse_attention(zoo, fused.originals) == 3
    assert all(zoo[name].processor is originals[name] for name in zoo if name != "sliced")
    assert type(zoo["sliced"].processor) is AttnProcessor2_0
    assert zoo["ip_adapter"]._modules["processor"] is originals["ip_adapter"]


def test_fuse_attention_rejects_non_modules():
    with pytest.raises(TypeError, match="fuse_attention: model must be a torch.nn.Module"):
        ddim_fast.fuse_attention("unet")


def test_fused_backend_in_an_sd_pipeline():
    """Our fused kernel (backend='fused') inside a whole tiny SD pipeline: within the drop-in tolerance of
    diffusers' own processors, and visibly run (its rounding differs from SDPA's). 'auto' runs SDPA on the CPU
    (tests/test_optimize_pipeline.py checks that its images match diffusers' bit for bit)."""
    import tiny_pipelines as tp

    pipe = tp.sd()

    def run():
        return pipe(**tp.prompt_embeds(), height=32, width=32, num_inference_steps=3, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    with torch.no_grad():
        expected = run()
        fused = ddim_fast.fuse_attention(pipe.unet, backend="fused")
        got = run()
    assert fused.count == len(pipe.unet.attn_processors) > 0
    assert not torch.equal(got, expected), "our kernel did not run"
    assert_rel_close(got, expected, SAMPLER_RTOL, "SD pipeline with backend='fused'")
