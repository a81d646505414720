// The one place where the ddim_fast operator schemas are defined, the Triton ones included. Device kernels
// register themselves with TORCH_LIBRARY_IMPL in their own files (csrc/cpu/*.cpp, csrc/cuda/*_cuda.cpp);
// the fake (meta) kernels and the Triton kernels are registered from Python by ddim_fast/_library.py,
// which `import ddim_fast` runs.
#include <Python.h>

#include <torch/library.h>

// Importing ddim_fast._C loads this shared library, which runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ddim_fast, m) {
  // One fused DDIM step: guidance combine, x0/eps prediction, clamp, update and noise.
  // Returns (x_prev, pred_x0); pred_x0 has shape [0] unless return_pred_x0.
  m.def(
      "ddim_step(Tensor x, Tensor model_output, Tensor table, Tensor row, float? guidance_scale, "
      "str prediction_type, float? clip_range, Tensor? x0_threshold, bool use_clipped_model_output, "
      "Tensor? noise, Tensor? rng_state, float temperature, bool return_pred_x0) -> (Tensor, Tensor)");
  // The same step writing into caller-owned buffers (CUDA graphs, in-place updates: out may be x).
  m.def(
      "ddim_step_out(Tensor x, Tensor model_output, Tensor table, Tensor row, float? guidance_scale, "
      "str prediction_type, float? clip_range, Tensor? x0_threshold, bool use_clipped_model_output, "
      "Tensor? noise, Tensor? rng_state, float temperature, Tensor(a!) out, Tensor(b!)? pred_x0_out) -> ()");

  // The step's argument rules (csrc/ddim_step_args.cpp) for the backends that are not C++ (the Triton launcher,
  // the reference path): raises what ddim_step raises, else returns [prediction, clamp, noise kind,
  // rng_per_row, flat]. No out: fresh outputs laid out like x.
  m.def(
      "ddim_step_check(Tensor x, Tensor model_output, Tensor table, Tensor row, float? guidance_scale, "
      "str prediction_type, float? clip_range, Tensor? x0_threshold, bool use_clipped_model_output, "
      "Tensor? noise, Tensor? rng_state, float temperature, Tensor? out, Tensor? pred_x0_out, "
      "bool float64_allowed) -> int[]");

  // softmax(scores * scale + mask) over the last dim in one pass; mask is additive (float) or
  // boolean (True = keep), broadcast over the leading dims as documented in ddim_fast/attention.py.
  m.def("scaled_masked_softmax(Tensor scores, Tensor? mask, float scale) -> Tensor");
  m.def("scaled_masked_softmax_(Tensor(a!) scores, Tensor? mask, float scale) -> ()");
  // softmax(q k^T * scale + mask) v, fused. q [..., Lq, D], k/v [..., Lk, D].
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? mask) -> Tensor");

  // The Triton kernels as ops of their own (ddim_fast/triton/*.py), with the schemas of the ops above;
  // they run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
  m.def(
      "ddim_step_triton(Tensor x, Tensor model_output, Tensor table, Tensor row, float? guidance_scale, "
      "str prediction_type, float? clip_range, Tensor? x0_threshold, bool use_clipped_model_output, "
      "Tensor? noise, Tensor? rng_state, float temperature, bool return_pred_x0) -> (Tensor, Tensor)");
  m.def(
      "ddim_step_triton_out(Tensor x, Tensor model_output, Tensor table, Tensor row, float? guidance_scale, "
      "str prediction_type, float? clip_range, Tensor? x0_threshold, bool use_clipped_model_output, "
      "Tensor? noise, Tensor? rng_state, float temperature, Tensor(a!) out, Tensor(b!)? pred_x0_out) -> ()");
  m.def("attention_triton(Tensor q, Tensor k, Tensor v, float scale, Tensor? mask) -> Tensor");

  // The UNet body's non-GEMM hot paths (ddim_fast/unet_ops.py). No C++ kernels: the CPU kernel is PyTorch's own
  // composite and the CUDA kernel the Triton one, both registered from Python (ddim_fast/_library.py).
  // GroupNorm over [B, C, *spatial] (any strides; the output is laid out like empty_like(x)), optionally with a
  // per-(sample, channel) value channel_add [B, C] added to x first and SiLU after the affine transform.
  m.def(
      "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool apply_silu, "
      "Tensor? channel_add=None) -> Tensor");
  // diffusers' GEGLU after its projection: h [..., 2D] -> h[..., :D] * gelu(h[..., D:]) (erf GELU), [..., D].
  m.def("geglu(Tensor h) -> Tensor");
  m.def(
      "group_norm_silu_triton(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool apply_silu, "
      "Tensor? channel_add=None) -> Tensor");
  m.def("geglu_triton(Tensor h) -> Tensor");
}
