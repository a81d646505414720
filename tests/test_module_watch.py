"""``module_graph.ModuleWatch``: the per-call check that decides whether ``GraphedForward`` may replay its graphs.
Every kind of change a captured graph bakes in must be seen (a missed one replays a stale graph: wrong images, or
reads of freed memory); nothing else may cost a recapture. Each case changes a tiny UNet one way, expects
``changed()`` once, then no change on the next look."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_pipelines as tp  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

from ddim_fast.module_graph import ModuleWatch  # noqa: E402


def _attn(unet):
    return unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2


class _Peft(torch.nn.Module):
    """The Python state of a PEFT tuner layer, which PEFT changes in place (lists and dicts)."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self._active_adapter = "default"
        self._disable_adapters = False
        self.merged_adapters = []
        self.scaling = {"default": 1.0}

    def forward(self, x):
        return self.base_layer(x)


def _replace_processor(unet):
    _attn(unet).set_processor(AttnProcessor())


def _swap_children(unet):
    blocks = unet.down_blocks
    blocks[0], blocks[1] = blocks[1], blocks[0]


def _insert(unet):
    unet.down_blocks.insert(0, torch.nn.Identity())


def _pop(unet):
    unet.up_blocks[0].resnets.pop(-1)


def _delete(unet):
    del unet.conv_norm_out


def _new_parameter(unet):
    unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight.detach().clone())


def _data_swap(unet):
    # What PEFT's safe merge and Module._apply (.to / .half) do: the same Parameter, new storage.
    unet.conv_out.weight.data = unet.conv_out.weight.data.clone()


def _dtype_in_place(unet):
    w = unet.conv_out.weight
    w.data = w.data.view(torch.bfloat16)  # same address, other dtype


def _buffer(unet):
    unet.conv_out.register_buffer("extra", torch.zeros(1))


def _bias_removed(unet):
    unet.conv_out.bias = None


def _submodule_train(unet):
    unet.mid_block.train()


def _submodule_forward(unet):
    layer = unet.conv_out
    original = layer.forward
    layer.forward = lambda x: original(x) * 2


def _hook_added(unet):
    unet.conv_out.register_forward_hook(lambda module, args, out: out)



def _global_hook(unet):
    _global_hook.handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out)


def _peft_wrapped(unet):
    attn = _attn(unet)
    attn.to_q = _Peft(attn.to_q)


CHANGES = {
    "processor": _replace_processor,
    "children swapped": _swap_children,
    "ModuleList.insert": _insert,
    "ModuleList.pop": _pop,
    "del submodule": _delete,
    "new Parameter": _new_parameter,
    "param.data swap": _data_swap,
    "dtype view": _dtype_in_place,
    "buffer registered": _buffer,
    "bias set to None": _bias_removed,
    "submodule train()": _submodule_train,
    "submodule forward override": _submodule_forward,
    "forward hook": _hook_added,
    "global forward hook": _global_hook,
    "PEFT layer wrapped in": _peft_wrapped,
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_a_graph_bakes_in_is_seen(change):
    unet = tp.tiny_unet()
    watch = ModuleWatch(unet)
    assert not watch.changed()
    try:
        CHANGES[change](unet)
        assert watch.changed(), f"{change}: not seen"
        assert not watch.changed(), f"{change}: seen again without a further change"
    finally:
        handle = getattr(_global_hook, "handle", None)
        if handle is not None:
            handle.remove()
            del _global_hook.handle


def test_freeu_factors_are_seen():
    """enable_freeu adds the factors to the up blocks, a second call changes their values, disable_freeu sets them
    to None: each is a change (the up blocks' forward reads them at capture time)."""
    unet = tp.tiny_unet()
    watch = ModuleWatch(unet)
    for change in (lambda: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
                   lambda: unet.enable_freeu(s1=0.8, s2=0.2, b1=1.2, b2=1.4), unet.disable_freeu):
        change()
        assert watch.changed() and not watch.changed()


def test_processor_state_changed_in_place_is_seen():
    """IP-Adapter's set_ip_adapter_scale writes into its processors' ``scale`` list in place: the same processor
    object, another value baked into the graph."""

    class ScaledProcessor(AttnProcessor):
        def __init__(self):
            super().__init__()
            self.scale = [1.0]

    unet = tp.tiny_unet()
    processor = ScaledProcessor()
    _attn(unet).set_processor(processor)
    watch = ModuleWatch(unet)
    processor.scale[0] = 0.5
    assert watch.changed() and not watch.changed()
    processor.scale[0] = 0.5  # the same value again: nothing to recapture
    assert not watch.changed()


def test_hook_removed_and_another_registered_is_seen():
    unet = tp.tiny_unet()
    handle = unet.conv_out.register_forward_pre_hook(lambda module, args: None)
    watch = ModuleWatch(unet)
    handle.remove()
    unet.conv_out.register_forward_pre_hook(lambda module, args: None)
    assert watch.changed()
    handle_count = len(unet.conv_out._forward_pre_hooks)
    assert handle_count == 1 and not watch.changed()


@pytest.mark.parametrize("field,value", [("scaling", 0.5), ("merged_adapters", "default"),
                                         ("_disable_adapters", True), ("_active_adapter", "other")])
def test_peft_state_changed_in_place_is_seen(field, value):
    unet = tp.tiny_unet()
    _peft_wrapped(unet)
    layer = _attn(unet).to_q
    watch = ModuleWatch(unet)
    if field == "scaling":
        layer.scaling["default"] = value  # the same dict object
    elif field == "merged_adapters":
        layer.merged_adapters.append(value)  # the same list object
    else:
        setattr(layer, field, value)
    assert watch.changed() and not watch.changed()


def test_what_a_graph_reads_live_is_not_a_change():
    unet = tp.tiny_unet()
    watch = ModuleWatch(unet)
    walks = watch.walks
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.5)  # in place: replays read it
        unet.conv_out.weight.data.add_(1.0)  # through .data (PEFT's merge): same storage
        unet.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()})  # copied into the tensors
    unet.eval()  # already in eval mode
    _attn(unet).set_processor(_attn(unet).processor)  # the same object
    assert not watch.changed() and watch.walks == walks, "no walk needed"
    # A hook registered on another model makes the next check walk this tree again, but is no change.
    other = torch.nn.Linear(2, 2)
    handle = other.register_forward_hook(lambda module, args, out: out)
    assert not watch.changed() and watch.walks == walks + 1
    handle.remove()
    assert not watch.changed()


@torch.no_grad()
def test_forward_passes_cost_no_walk():
    """diffusers' blocks build temporary containers in their forward (``self.resnets[1:]``): registrations into
    modules no watch has seen must not flag the check, or every call would walk the tree."""
    from ddim_fast.module_graph import GraphedForward

    unet = tp.tiny_unet(sdxl=True)
    graphed = GraphedForward(unet, off_cuda="static").install()
    x = torch.randn(2, 4, 16, 16)
    cond = torch.randn(2, tp.TEXT_TOKENS, tp.TEXT_DIM)
    added = {"text_embeds": torch.randn(2, tp.POOLED_DIM), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    for t in (900, 500, 100):
        unet(x, t, cond, added_cond_kwargs=added)
    assert graphed.watch.walks == 1 and graphed.cache.hits == 2
    graphed.uninstall()


def test_the_documented_gap_a_same_size_direct_dict_write():
    """The one change the per-call check does not see (documented in ModuleWatch): a module put into a
    ``_modules`` dict directly, bypassing nn.Module, at the same dict size. PyTorch, diffusers and PEFT never do
    it; the next check that flags anything walks the tree and sees it too."""
    unet = tp.tiny_unet()
    watch = ModuleWatch(unet)
    unet._modules["conv_out"] = torch.nn.Conv2d(32, 4, 3, padding=1)
    assert not watch.changed()
    unet.eval()
    unet.conv_in.training = True  # any watched change: the walk compares everything
    assert watch.changed()
    unet.conv_in.training = False
    assert watch.changed() and not watch.changed()
