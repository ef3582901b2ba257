// The Python module of the native CPU kernels (kernels.h).

#include <torch/extension.h>

#include "bf16_gemm.h"
#include "omp_team.h"
#include "kernels.h"

namespace {

// The two native routed-experts forwards share one signature (kernels.h).
template <typename Fn>
void def_experts_forward(py::module_& m, const char* name, Fn fn, const char* doc) {
  m.def(name, fn, doc, py::arg("x"), py::arg("topk_weights"), py::arg("order"), py::arg("counts"), py::arg("w_up"),
        py::arg("w_down"), py::arg("b_up"), py::arg("b_down"), py::arg("activation"), py::arg("glu"), py::arg("alpha"),
        py::arg("limit"), py::arg("gate_softcap"), py::arg("up_softcap"), py::arg("w_up_scale") = py::none(),
        py::arg("w_down_scale") = py::none(), py::arg("format") = 0, py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while a kernel runs: other Python threads keep going
  m.def("grouped_matvec", &grouped_matvec, "y[r] = w[expert of r] @ x[r] for rows sorted by expert",
        py::call_guard<py::gil_scoped_release>());
  m.def("grouped_matvec_quantized", &grouped_matvec_quantized,
        "grouped_matvec over int8 / fp8 / int4 weights converted in registers", py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_rows", &dequantize_rows, "one quantized weight matrix in full precision",
        py::call_guard<py::gil_scoped_release>());
  m.def("omp_team_awake", [] { return kernel_moe::omp_team().awake(); },
        "whether a decode call from this thread would run on its OpenMP team now (omp_team.h)");
  m.def("has_bf16_gemm", &kernel_moe::Bf16Gemm::available, "whether this build has the bf16 expert GEMM");
  m.def("bf16_gemm", &bf16_gemm, "x @ w.T (+ bias) in bf16 with fp32 sums: the fused forward's expert GEMM",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("float_out") = false,
        py::call_guard<py::gil_scoped_release>());
  def_experts_forward(m, "fused_experts", &fused_experts, "the routed-experts forward of a batch, experts run concurrently");
  def_experts_forward(m, "matvec_experts", &matvec_experts,
                      "the routed-experts forward of decode on the matrix-vector kernels");
}
