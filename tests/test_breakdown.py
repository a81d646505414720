"""``bench --breakdown``'s classification of kernels and operators by kind (the rule table on real kernel names of
cuDNN, cuBLAS(Lt), cutlass, SDPA's backends, ATen, Inductor and ddim_fast), and how profiler events are given
to the variant whose range they started in. The end-to-end CPU run is tests/test_cli.py's
test_bench_breakdown_on_the_cpu."""

from __future__ import annotations

import pytest

from ddim_fast.tools.bench import load_harness

breakdown = load_harness("breakdown")

# Names as the profiler reports them (CUDA kernels: demangled, as in a Chrome trace of an H100/H200 run).
NAMES = {
    "convolution": [
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_g1_"
        "execute_segment_k_off_kernel__5x_cudnn",
        "sm80_xmma_fprop_implicit_gemm_indexed_wo_smem_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x32x64_stage4_"
        "warpsize4x1x1_g1_tensor16x8x16_kernel",
        "void cudnn::cnn::conv2d_grouped_direct_kernel<false, true, false, false, false, 0, 0, int, __half>(...)",
        "cudnn_infer_ampere_scudnn_winograd_128x128_ldg1_ldg4_relu_tile148t_nt_v1",
        "void cutlass_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_128x128_32x5_nhwc_align8>(...)",
        "void at::native::im2col_kernel<float>(long, float const*, long, long, long, long, long, long, long, long, "
        "long, long, long, float*)",
        "triton_tem_fused_convolution_0",
        "aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
    ],
    "GEMM": [
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__"
        "5x_cublas",
        "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT",
        "ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn",
        "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_128x128_32x3_nn_align8>(...)",
        "void cublasLt::splitKreduce_kernel<32, 16, int, __half, __half, float, __half, false, false>(...)",
        "triton_tem_fused_addmm_3", "triton_tem_fused_mm_0",
        "aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm",
    ],
    "attention": [
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t"
        ", Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, false, false, false, true, true, false, "
        "false>(pytorch_flash::Flash_fwd_params)",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, "
        "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0",
        "_attention_kernel",  # ours (Triton)
        "void (anonymous namespace)::softmax_warp_per_row_kernel<__half>(SoftmaxParams, bool)",  # ours (CUDA)
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)",
        "triton_per_fused__softmax_4",
        "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
        "ddim_fast::attention", "aten::_softmax",
    ],
    "normalization": [
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>(long, float, "
        "c10::Half const*, float*, float*)",
        "void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<c10::Half, float>(long, long, long, "
        "float const*, float const*, c10::Half const*, c10::Half const*, float*, float*)",
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::(anonymous "
        "namespace)::GroupNormKernelImplInternal<c10::Half, float>(...)::{lambda(c10::Half, float, float)#1}>(...)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, false>(int, float, "
        "c10::Half const*, c10::Half const*, c10::Half const*, float*, float*, c10::Half*)",
        "triton_red_fused_native_group_norm_0", "triton_per_fused_native_layer_norm_5",
        "triton_poi_fused_native_group_norm_silu_2", "_group_norm_stats_kernel", "_group_norm_apply_kernel",
        "ddim_fast::group_norm_silu",
        "aten::group_norm", "aten::native_group_norm", "aten::layer_norm", "aten::native_layer_norm",
    ],
    "elementwise": [
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>, std::array<char*,"
        " 3> >(int, at::native::CUDAFunctor_add<c10::Half>, std::array<char*, 3>)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel(at::"
        "TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda()#5}::operator()() const::{lambda(c10::Half)"
        "#1}, std::array<char*, 2> >(...)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::Half>, std::array<char*, 1> "
        ">(int, at::native::FillFunctor<c10::Half>, std::array<char*, 1>)",
        "triton_poi_fused_add_convolution_silu_3", "triton_poi_fused_mul_sigmoid_7", "triton_poi_fused_0",
        "void ddim_step_vector_kernel<__half, 2>(DdimStepParams)", "_ddim_step_kernel",
        "_geglu_kernel", "ddim_fast::geglu",
        "aten::add", "aten::mul", "aten::silu", "aten::gelu", "aten::div", "aten::exp", "aten::sin", "aten::fill_",
    ],
    "copies/layout": [
        "Memcpy DtoD (Device -> Device)", "Memset (Device)",
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_"
        "kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::"
        "{lambda(c10::Half)#1}>(at::TensorIteratorBase&, ...)::{lambda(int)#1}>(int, ...)",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)"
        "0>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>, __half const*, __half*)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u"
        ">, unsigned int, 4, 64, 64>(...)",
        "void at::native::(anonymous namespace)::upsample_nearest2d_nhwc_out_frame<c10::Half, float>(...)",
        "triton_poi_fused_clone_1", "triton_poi_fused__to_copy_2", "triton_poi_fused_cat_5",
        "triton_poi_fused_permute_view_3",
        "aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::contiguous", "aten::clone",
        "aten::upsample_nearest2d", "aten::permute", "aten::transpose", "aten::view", "aten::reshape",
        "aten::chunk", "aten::split",
    ],
    "other": [
        "aten::empty", "aten::empty_strided", "aten::resize_", "triton_red_fused_mean_1",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>, "
        "unsigned int, float, 4> >(...)",
    ],
}


@pytest.mark.parametrize("kind", list(NAMES))
def test_every_kernel_name_gets_its_kind(kind):
    wrong = {name[:70]: breakdown.kernel_kind(name) for name in NAMES[kind] if breakdown.kernel_kind(name) != kind}
    assert not wrong, f"expected {kind}: {wrong}"


def test_the_rule_table_names_only_known_kinds_and_says_what_each_rule_catches():
    assert set(breakdown.KINDS) == set(NAMES)
    for kind, pattern, what in breakdown.KERNEL_RULES:
        assert kind in breakdown.KINDS and pattern and len(what) > 20


def test_inductor_kernels_are_classified_by_their_fused_ops_before_the_table():
    # "convolution" in a pointwise kernel's name is the bias / epilogue it carries, not a convolution
    assert breakdown.inductor_kind("triton_poi_fused_convolution_4") == "elementwise"
    assert breakdown.inductor_kind("triton_tem_fused_convolution_4") == "convolution"
    assert breakdown.inductor_kind("triton_poi_fused__unsafe_view_clone_8") == "copies/layout"
    assert breakdown.inductor_kind("not_inductor") is None and breakdown.kernel_kind("no-such-kernel") == "other"


def _event(name, start, duration, on_device=True):
    return breakdown.TimedEvent(name, start, duration, on_device)


def test_events_go_to_the_range_they_started_in_and_sum_per_call():
    events = [
        _event("sm90_xmma_fprop_implicit_gemm_x", 10, 300),   # plain, conv
        _event("nvjet_hsh_128x256", 400, 100),                 # plain, GEMM
        _event("nvjet_hsh_128x256", 600, 100),                 # plain, second call
        _event("sm90_xmma_fprop_implicit_gemm_x", 1200, 200),  # optimize
        _event("_attention_kernel", 1500, 50),                 # optimize
        _event("aten::addmm", 450, 999, on_device=False),      # a CPU op: not a kernel
        _event("ghost_kernel", 5000, 1),                       # outside every range
    ]
    plain = breakdown.summarize_events(events, 0, 1000, calls=2, on_device=True)
    assert plain["kinds_ms"]["convolution"] == pytest.approx(0.150)  # 300 us over 2 calls
    assert plain["kinds_ms"]["GEMM"] == pytest.approx(0.100)
    assert plain["kernel_ms"] == pytest.approx(0.250) and plain["kernels_per_call"] == 1.5
    assert plain["top"][0]["name"].startswith("sm90_xmma_fprop") and plain["other"] == []
    optimized = breakdown.summarize_events(events, 1000, 2000, calls=1, on_device=True)
    assert optimized["kinds_ms"]["attention"] == pytest.approx(0.050)
    assert optimized["kernel_ms"] == pytest.approx(0.250)
    cpu = breakdown.summarize_events(events, 0, 1000, calls=1, on_device=False)
    assert cpu["kinds_ms"]["GEMM"] == pytest.approx(0.999) and cpu["kernels_per_call"] == 1


class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _FakeEvent:
    def __init__(self, name, device_type, start, end, self_cpu=0.0, is_async=False):
        self.name, self.device_type, self.is_async = name, device_type, is_async
        self.time_range = _Range(start, end)
        self.self_cpu_time_total = self_cpu


def test_timed_events_reads_kernels_operators_and_ranges():
    from torch.autograd import DeviceType

    prefix = breakdown.RANGE_PREFIX

    class _Prof:
        def events(self):
            return [
                _FakeEvent(prefix + "plain", DeviceType.CPU, 0, 100),
                _FakeEvent(prefix + "plain", DeviceType.CUDA, 2, 99),   # the range's GPU annotation: not a kernel
                _FakeEvent("aten::addmm", DeviceType.CPU, 5, 20, self_cpu=12.0),
                _FakeEvent("cudaLaunchKernel", DeviceType.CPU, 6, 7, self_cpu=1.0),  # a runtime call: left out
                _FakeEvent("nvjet_hsh_x", DeviceType.CUDA, 30, 70),
            ]

    events, ranges = breakdown.timed_events(_Prof())
    assert ranges == {"plain": (0, 100)}
    assert [(e.name, e.duration_us, e.on_device) for e in events] == [("aten::addmm", 12.0, False),
                                                                       ("nvjet_hsh_x", 40.0, True)]
