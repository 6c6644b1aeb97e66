// A prepared CPU step of a whole TCN stack: hiertcn_fast::tcn_step_out's arguments checked once and kept, so
// that stepping one event through the stack costs the kernel plus a few checks, not the dispatcher's
// conversion of a dozen tensor lists (about 10 us of a 20 us step at batch 1). Used by TCN.step in eager
// mode; torch.compile and every other backend go through the registered op.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "hiertcn/causal_conv_host.h"

namespace hiertcn {
namespace {

class TcnStepPlan {
 public:
  // The arguments of one valid tcn_step_out call (x and context_table as examples of the later ones), and
  // the tensors the packed weights were made from (sources): a step refuses to run once one of those was
  // modified in place or given new storage (held here, so compared by identity), and the caller repacks.
  TcnStepPlan(const at::Tensor& x, std::vector<at::Tensor> packed_weights, std::vector<std::optional<at::Tensor>> biases,
              std::vector<std::optional<at::Tensor>> proj_weights, std::vector<std::optional<at::Tensor>> proj_biases,
              const std::optional<at::Tensor>& context_table, const std::optional<at::Tensor>& context_residual,
              std::vector<int64_t> dilations, int64_t activation,
              std::vector<at::Tensor> histories, std::vector<at::Tensor> positions, std::vector<at::Tensor> sources)
      : packed_(std::move(packed_weights)), histories_(std::move(histories)), positions_(std::move(positions)),
        sources_(std::move(sources)) {
    TORCH_CHECK(x.device().is_cpu(), "a prepared TCN step runs on the CPU, got x on ", x.device());
    for (auto& t : biases) held_.push_back(t);
    for (auto& t : proj_weights) held_.push_back(t);
    for (auto& t : proj_biases) held_.push_back(t);
    OptionalTensorList bias_list, proj_list, proj_bias_list;
    for (auto& t : biases) bias_list.push_back(t);
    for (auto& t : proj_weights) proj_list.push_back(t);
    for (auto& t : proj_biases) proj_bias_list.push_back(t);
    const int64_t out_channels = packed_.back().dim() == 4 ? packed_.back().size(0) * packed_.back().size(3)
                                                           : packed_.back().size(2);
    const at::Tensor out = at::empty({x.size(0), out_channels}, x.options());
    params_ = make_tcn_step_params(x, packed_, bias_list, proj_list, proj_bias_list, context_table, context_residual,
                                   dilations, activation, histories_, positions_, out);
    dtype_ = x.scalar_type();
    in_channels_ = x.size(1);
    out_channels_ = out_channels;
    has_table_ = context_table.has_value();
    has_residual_ = context_residual.has_value();
    for (const at::Tensor& t : sources_) {
      versions_.push_back(t._version());
      pointers_.push_back(t.data_ptr());
      storages_.push_back(t.storage());
    }
    for (const auto& group : {std::cref(packed_), std::cref(histories_), std::cref(positions_)})
      for (const at::Tensor& t : group.get()) watch(t);
    for (const auto& t : held_)
      if (t) watch(*t);
  }

  // One event: x (batch, in_channels) -> (batch, out_channels), advancing the histories and positions; None
  // (nothing stepped) when a source tensor changed since the plan was made.
  std::optional<at::Tensor> step(const at::Tensor& x, const std::optional<at::Tensor>& context_table,
                                 const std::optional<at::Tensor>& context_residual) {
    for (size_t i = 0; i < sources_.size(); ++i)
      if (sources_[i]._version() != versions_[i] || sources_[i].data_ptr() != pointers_[i] ||
          !same_storage(sources_[i], storages_[i]))
        return std::nullopt;
    for (size_t i = 0; i < watched_.size(); ++i)
      if (watched_[i].data_ptr() != watched_pointers_[i] || watched_[i].numel() != watched_numel_[i] ||
          !same_storage(watched_[i], watched_storages_[i]))
        return std::nullopt;
    TORCH_CHECK(x.dim() == 2 && x.size(0) == params_.batch && x.size(1) == in_channels_, "x must be (",
                params_.batch, ", ", in_channels_, "), got shape ", x.sizes());
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype_, "x must be a CPU ", dtype_, " tensor, got ",
                x.scalar_type(), " on ", x.device());
    TORCH_CHECK(has_unit_stride(x, 1), "x must have unit stride along channels, got strides ", x.strides());
    TORCH_CHECK(context_table.has_value() == has_table_, has_table_ ? "this step needs its context table"
                                                                    : "this step was prepared without context");
    TcnStepParams p = params_;
    if (context_table) {
      const at::Tensor& table = *context_table;
      TORCH_CHECK(table.dim() == 3 && table.size(0) == p.batch && table.size(1) == p.layer[0].kernel_size &&
                      table.size(2) == p.layer[0].out_channels && table.is_contiguous() && table.device().is_cpu() &&
                      table.scalar_type() == dtype_,
                  "context_table must be a contiguous (", p.batch, ", ", p.layer[0].kernel_size, ", ",
                  p.layer[0].out_channels, ") CPU ", dtype_, " tensor, got shape ", table.sizes(), ", dtype ",
                  table.scalar_type(), " on ", table.device(), table.is_contiguous() ? "" : ", not contiguous");
      p.context_table = table.data_ptr();
    }
    TORCH_CHECK(context_residual.has_value() == has_residual_,
                has_residual_ ? "this step needs its context residual" : "this step was prepared without a context "
                                                                           "residual");
    if (context_residual) {
      const at::Tensor& term = *context_residual;
      TORCH_CHECK(term.dim() == 2 && term.size(0) == p.batch && term.size(1) == p.layer[0].out_channels &&
                      term.is_contiguous() && term.device().is_cpu() && term.scalar_type() == dtype_,
                  "context_residual must be a contiguous (", p.batch, ", ", p.layer[0].out_channels, ") CPU ", dtype_,
                  " tensor, got shape ", term.sizes(), ", dtype ", term.scalar_type(), " on ", term.device(),
                  term.is_contiguous() ? "" : ", not contiguous");
      p.context_residual = term.data_ptr();
    }
    at::Tensor out = at::empty({p.batch, out_channels_}, x.options());
    p.x = x.data_ptr();
    p.x_row_stride = x.stride(0);
    p.out = out.data_ptr();
    tcn_step_cpu(p, dtype_);
    return out;
  }

 private:
  void watch(const at::Tensor& t) {
    watched_.push_back(t);
    watched_pointers_.push_back(t.data_ptr());
    watched_numel_.push_back(t.numel());
    watched_storages_.push_back(t.storage());
  }

  // Whether t still has the storage it had when the plan was made. The plan holds that storage, so it is never
  // freed meanwhile and new storage cannot reuse its address: w.data = ... (a module's .half() then .float()
  // does it) is seen even when the data pointer comes back the same.
  static bool same_storage(const at::Tensor& t, const c10::Storage& held) {
    return t.storage().unsafeGetStorageImpl() == held.unsafeGetStorageImpl();
  }

  std::vector<at::Tensor> packed_, histories_, positions_, sources_;
  std::vector<std::optional<at::Tensor>> held_;
  std::vector<int64_t> versions_;
  std::vector<void*> pointers_;
  std::vector<c10::Storage> storages_;
  // Every tensor the params point into: a step refuses to run if one was given other storage (set_, resize_).
  std::vector<at::Tensor> watched_;
  std::vector<void*> watched_pointers_;
  std::vector<int64_t> watched_numel_;
  std::vector<c10::Storage> watched_storages_;
  TcnStepParams params_{};
  at::ScalarType dtype_;
  int64_t in_channels_ = 0, out_channels_ = 0;
  bool has_table_ = false, has_residual_ = false;
};

}  // namespace

void bind_tcn_step_plan(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<TcnStepPlan>(m, "TcnStepPlan", "A prepared CPU step of a TCN stack (hiertcn_fast.ops.tcn_step).")
      .def(py::init<const at::Tensor&, std::vector<at::Tensor>, std::vector<std::optional<at::Tensor>>,
                    std::vector<std::optional<at::Tensor>>, std::vector<std::optional<at::Tensor>>,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::vector<int64_t>, int64_t,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("step", &TcnStepPlan::step, py::arg("x"), py::arg("context_table") = py::none(),
           py::arg("context_residual") = py::none());
}

}  // namespace hiertcn
