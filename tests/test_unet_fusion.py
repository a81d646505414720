"""ddim_fast.unet_fusion on tiny random-weight diffusers models (tests/tiny_pipelines.py, no downloads): which modules
it fuses and which it leaves (with reasons), outputs against the unpatched model (CPU kernels: bit for bit; Triton
under the interpreter: within the fp32 tolerance, no further from an fp64 run than the plain model), parameters
read at call time, the fallbacks (autograd, float64), and unfuse giving back exactly the model it was given."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tiny_pipelines as tp
from conftest import assert_rel_close
from ddim_fast import unet_fusion
from ddim_fast._library import interpreting
from ddim_fast.reference import relative_error
from ddim_fast.unet_fusion import FusedUnetBody, fuse_unet_body, unfuse_unet_body

pytest.importorskip("diffusers")

from diffusers.models.activations import GEGLU  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and not interpreting(),
    reason="no CUDA device and TRITON_INTERPRET is not 1: Triton runs CPU tensors only under its interpreter")


def unet_inputs(batch=2, size=16, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=gen)
    if channels_last:
        sample = sample.to(memory_format=torch.channels_last)
    return sample, torch.full((batch,), 10), torch.randn(batch, tp.TEXT_TOKENS, tp.TEXT_DIM, generator=gen)


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def instance_state(model):
    """Every module's instance attributes that a patcher could leave behind."""
    return {name: sorted(k for k in m.__dict__ if k == "forward" or k.startswith("_ddim_fast"))
            for name, m in model.named_modules()}


def expected_counts(model):
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    covered = {id(r.norm1) for r in resnets} | {id(r.norm2) for r in resnets}
    norms = [m for m in model.modules() if type(m) is nn.GroupNorm and id(m) not in covered]
    counts = {"resnet": len(resnets), "geglu": sum(isinstance(m, GEGLU) for m in model.modules()),
              "group_norm": len(norms)}
    return {kind: n for kind, n in counts.items() if n}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_tiny_unet_cpu_kernels_bit_identical(channels_last):
    """The CPU kernels are PyTorch's composites: the fused fp32 UNet gives the plain UNet's output bit for bit, in
    either layout; unfuse leaves no trace and the same output."""
    unet = tp.tiny_unet()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    inputs = unet_inputs(channels_last=channels_last)
    before = instance_state(unet)
    plain = run(unet, inputs)

    record = fuse_unet_body(unet)
    assert record.counts == expected_counts(unet) and record.skipped == {} and record.already == 0
    assert record.counts["resnet"] == 8 and record.counts["geglu"] == 4  # the tiny UNet's 8 blocks, 4 transformers
    fused = run(unet, inputs)
    assert torch.equal(fused, plain)

    assert unfuse_unet_body(unet, record) == len(record.patched)
    assert instance_state(unet) == before
    assert torch.equal(run(unet, inputs), plain)


@requires_triton
def test_tiny_unet_triton_within_fp32_tolerance():
    """The Triton kernels (fp32 between the fused steps, other summation orders): within the fp32 tolerance of the
    plain UNet, and no further from a float64 run of the same UNet than the plain fp32 UNet is (2x margin).
    channels_last, batch 1, 8x8 latents: the interpreter runs 21 GroupNorms and 4 GEGLUs."""
    unet = tp.tiny_unet().to(memory_format=torch.channels_last)
    unet64 = copy.deepcopy(unet).double()
    sample, t, text = unet_inputs(batch=1, size=8, channels_last=True)
    reference64 = run(unet64, (sample.double(), t, text.double()))
    inputs = (sample.to(TRITON_DEVICE), t.to(TRITON_DEVICE), text.to(TRITON_DEVICE))
    unet = unet.to(TRITON_DEVICE)
    plain = run(unet, inputs)

    record = fuse_unet_body(unet, backend="triton")
    fused = run(unet, inputs)
    assert_rel_close(fused, plain, torch.float32, "fused UNet vs plain")
    assert_no_worse_than_plain(fused, plain, reference64, "Triton-fused UNet")
    unfuse_unet_body(unet, record)
    assert torch.equal(run(unet, inputs), plain)


def assert_no_worse_than_plain(fused, plain, reference64, what):
    """fused is no further from a float64 run of the model than the plain fp32 model is (2x margin)."""
    plain_error = relative_error(plain, reference64)
    fused_error = relative_error(fused, reference64)
    assert fused_error <= 2 * plain_error + 1e-7, f"{what}: {fused_error:.3e} from fp64, plain {plain_error:.3e}"


def test_tiny_sdxl_unet_and_vae():
    """SDXL's UNet (linear projections, two transformer layers per block, added conditioning) gives its plain output
    bit for bit on the CPU. The VAE (ResnetBlock2D without a time embedding, the decoder's "group" norms, the
    attention's GroupNorm on a [B, C, L] transposed view, conv_norm_out) fuses every block; its encoder's
    conv_norm_out gets a channels_last-strided input, for which the op returns channels_last (its layout contract)
    where PyTorch's GroupNorm returns NCHW, so the convolution after it rounds differently: the fused VAE is
    compared with a float64 run instead (the tiny fp32 VAE is itself ~2e-6 from it)."""
    unet = tp.tiny_unet(sdxl=True)
    sample, t, text = unet_inputs()
    added = {"text_embeds": torch.randn(2, tp.POOLED_DIM), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        plain = unet(sample, t, text, added_cond_kwargs=added).sample
        record = fuse_unet_body(unet)
        assert record.counts == expected_counts(unet) and not record.skipped
        assert torch.equal(unet(sample, t, text, added_cond_kwargs=added).sample, plain)

    vae = tp.tiny_vae()
    vae64 = copy.deepcopy(vae).double()
    image = torch.randn(1, 3, tp.IMAGE_SIZE, tp.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))

    def roundtrip(model, x):
        return model.decode(model.encode(x).latent_dist.mean).sample

    with torch.no_grad():
        reference64 = roundtrip(vae64, image.double())
        plain = roundtrip(vae, image)
        record = fuse_unet_body(vae)
        assert record.counts == expected_counts(vae) and record.counts["resnet"] == 10 and not record.skipped
        assert_no_worse_than_plain(roundtrip(vae, image), plain, reference64, "fused VAE")


def test_parameters_read_at_call_time():
    """In-place weight edits (LoRA fusing, load_state_dict) reach the fused forwards: no copies are kept."""
    unet = tp.tiny_unet()
    inputs = unet_inputs()
    record = fuse_unet_body(unet)
    resnet = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D))
    geglu = next(m for m in unet.modules() if isinstance(m, GEGLU))
    with torch.no_grad():
        resnet.norm1.weight.mul_(1.5)
        resnet.norm2.bias.add_(0.25)
        geglu.proj.weight.mul_(0.5)
    fused = run(unet, inputs)
    unfuse_unet_body(unet, record)
    assert torch.equal(fused, run(unet, inputs))


def test_skips_what_the_kernels_do_not_reproduce():
    unet = tp.tiny_unet()
    resnets = [(n, m) for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    norms = [(n, m) for n, m in unet.named_modules() if type(m) is nn.GroupNorm and n.endswith(".norm")]
    (mish_name, mish), (hook_name, hooked), (cls_name, subclassed), (fwd_name, replaced) = resnets[:4]
    mish.nonlinearity = nn.Mish()
    hooked.norm1.register_forward_hook(lambda *args: None)

    class MyResnet(ResnetBlock2D):
        def forward(self, input_tensor, temb, *args, **kwargs):
            return super().forward(input_tensor, temb, *args, **kwargs)

    subclassed.__class__ = MyResnet
    own_forward = replaced.forward
    replaced.forward = own_forward  # an instance-level forward another tool set
    norm_name, norm = norms[0]
    norm.double()

    record = fuse_unet_body(unet)
    assert "nonlinearity Mish" in record.skipped[mish_name]
    assert "norm1 has forward hooks" in record.skipped[hook_name]
    assert "overrides ResnetBlock2D.forward" in record.skipped[cls_name]
    assert "forward already replaced" in record.skipped[fwd_name]
    assert "torch.float64 parameter weight" in record.skipped[norm_name]
    assert len(record.skipped) == 5
    # The skipped blocks' norms are plain GroupNorms the patcher may still fuse (SiLU stays in the block).
    assert record.patched.get(mish_name + ".norm1") == "group_norm"
    assert "nonlinearity Mish" in record.skipped_summary()
    unfuse_unet_body(unet, record)
    assert replaced.__dict__["forward"] is own_forward


def test_fuse_twice_counts_already_and_unfuse_is_idempotent():
    unet = tp.tiny_unet()
    first = fuse_unet_body(unet)
    second = fuse_unet_body(unet)
    assert second.patched == {} and second.already == len(first.patched)
    assert unfuse_unet_body(unet, first) == len(first.patched)
    assert unfuse_unet_body(unet, first) == 0


def test_fallbacks_autograd_and_float64():
    """Grad mode with parameters that require grad (training, LoRA fitting) and float64 inputs run the original
    computation: gradients flow, nothing is refused."""
    unet = tp.tiny_unet()
    sample, t, text = unet_inputs(batch=1, size=8)
    plain = unet(sample, t, text).sample
    record = fuse_unet_body(unet)
    out = unet(sample, t, text).sample
    assert torch.equal(out, plain) and out.requires_grad
    out.square().mean().backward()
    assert all(p.grad is not None for p in unet.conv_in.parameters())

    unet64 = unet.double()
    with torch.no_grad():
        fused64 = unet64(sample.double(), t, text.double()).sample
        unfuse_unet_body(unet64, record)
        assert torch.equal(fused64, unet64(sample.double(), t, text.double()).sample)


def test_argument_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_unet_body("unet")
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_unet_body(nn.Linear(2, 2), backend="cuda")
    with pytest.raises(TypeError, match="record must be the FusedUnetBody"):
        unfuse_unet_body(nn.Linear(2, 2), {})
    assert fuse_unet_body(nn.Linear(2, 2)) == FusedUnetBody({}, {}, 0, "auto")


def test_unknown_diffusers_version_is_skipped(monkeypatch):
    """A diffusers whose ResnetBlock2D.forward / GEGLU.forward differ from the ones the fused forwards mirror is left
    alone (reported), not run with a forward that computes something else."""
    monkeypatch.setitem(unet_fusion._KNOWN_DIGESTS, "ResnetBlock2D.forward", {"0" * 16})
    monkeypatch.setitem(unet_fusion._KNOWN_DIGESTS, "GEGLU.forward", {"0" * 16})
    record = fuse_unet_body(tp.tiny_unet())
    assert set(record.counts) == {"group_norm"}
    assert all("is not the one the fused forward reproduces" in reason for reason in record.skipped.values())
    assert len(record.skipped) == 12


def test_fused_blocks_trace_with_torch_compile():
    """The fused forwards and the ops' fake kernels go through torch.compile without graph breaks (AOT autograd's
    eager backend: Dynamo and the fake kernels, no Inductor compile); the compiled blocks give the eager fused
    outputs."""
    torch._dynamo.reset()
    unet = tp.tiny_unet()
    fuse_unet_body(unet)
    resnet = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None)
    transformer = next(m for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, resnet.in_channels, 8, 8, generator=gen).to(memory_format=torch.channels_last)
    temb = torch.randn(2, resnet.time_emb_proj.in_features, generator=gen)
    h = torch.randn(2, transformer.in_channels, 4, 4, generator=gen).to(memory_format=torch.channels_last)
    tokens = torch.randn(2, 16, transformer.inner_dim, generator=gen)
    feed_forward = transformer.transformer_blocks[0].ff  # GEGLU inside
    # (Transformer2DModel.forward itself breaks the graph in diffusers 0.42: a deprecation warning.)
    with torch.no_grad():
        for module, args in ((resnet, (x, temb)), (transformer.norm, (h,)), (feed_forward, (tokens,))):
            compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
            assert torch.equal(compiled(*args), module(*args)), type(module).__name__
    torch._dynamo.reset()
