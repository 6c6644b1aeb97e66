// A prepared CPU step of a whole TCN stack: hiertcn_fast::tcn_step_out's arguments checked once and kept, so
// that stepping one event through the stack costs the kernel plus a few checks, not the dispatcher's
// conversion of a dozen tensor lists (about 10 us of a 20 us step at batch 1). Used by TCN.step in eager
// mode; torch.compile and every other backend go through the registered op.
#include <torch/extension.h>

#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <typeinfo>
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
    // (Before packed_.back() below; make_tcn_step_params checks the layers against the other lists.)
    TORCH_CHECK(!packed_.empty() && packed_.size() <= static_cast<size_t>(kMaxStackLayers),
                "a TCN stack step takes 1 to ", kMaxStackLayers, " layers, got ", packed_.size());
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

  // Whether step() takes x, once contiguous along channels: the plan's batch, channels and dtype, on the CPU.
  // (TcnFastStep asks first, and leaves anything else to the op's own checks and messages.)
  bool accepts(const at::Tensor& x) const {
    return x.dim() == 2 && x.size(0) == params_.batch && x.size(1) == in_channels_ && x.device().is_cpu() &&
           x.scalar_type() == dtype_;
  }
  bool has_table() const { return has_table_; }
  bool has_residual() const { return has_residual_; }

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

// TCN.step's shortcut: the Python module code of a step costs as much as the kernel at batch 1 (about 10 us
// of 27 at 7 layers), most of it making sure that this call is made of the same objects as the one that
// prepared the plan. Here that comparison is a list of identity checks, run in C: each names a held object
// and what must be found in it (a dict's item, an instance's __dict__, a list's items, ...). Every container
// checked is itself found by an earlier check, from the call's arguments down, so a module, parameter,
// state tensor or attribute replaced anywhere on the way is seen. Then the plan runs on x directly.
// Anything unexpected (a check failing, x of another shape, dtype, device or kind, gradients wanted) makes
// step() return None, and TCN.step takes its full path, which checks everything and raises the errors.
namespace py = pybind11;

class TcnFastStep {
 public:
  static constexpr int kCheckedArguments = 3;  // step()'s tcn, state and context
  enum class Kind { Arg, ArgItem, DictOf, Item, Values, List, Env, ContextVar };

  struct Check {
    Kind kind;
    int index = 0;
    py::object object, key, expected;
    std::vector<py::object> items;
    std::string env_name, env_value;
    bool env_set = false;
  };

  // checks: tuples, one per check (see kind()); plan: the TcnStepPlan; tensor_type: torch.Tensor (x must be
  // exactly one); table, term: the context's table and residual term the plan takes, valid while the tensors
  // they were computed from (context_sources) are unchanged.
  TcnFastStep(const py::list& checks, py::object plan, py::object tensor_type, std::optional<at::Tensor> table,
              std::optional<at::Tensor> term, const std::vector<at::Tensor>& context_sources)
      : plan_object_(std::move(plan)), tensor_type_(std::move(tensor_type)), table_(std::move(table)),
        term_(std::move(term)) {
    plan_ = &plan_object_.cast<TcnStepPlan&>();
    TORCH_CHECK(plan_->has_table() == table_.has_value() && plan_->has_residual() == term_.has_value(),
                "TcnFastStep: the context table and residual term must be given exactly when the plan takes them");
    for (const py::handle item : checks) checks_.push_back(parse(py::reinterpret_borrow<py::tuple>(item)));
    for (const at::Tensor& t : context_sources) {
      // An inference tensor has no version counter: what is derived from it is derived again at every use, so
      // no step with it can be taken here.
      if (t.is_inference()) usable_ = false;
      sources_.push_back(t);
      versions_.push_back(t.is_inference() ? 0 : t._version());
      pointers_.push_back(t.data_ptr());
      storages_.push_back(t.storage());
    }
  }

  // The step's output, or None where TCN.step must take its full path.
  py::object step(py::handle tcn, py::handle x, py::handle state, py::handle context) {
    if (!usable_ || !passes({tcn.ptr(), state.ptr(), context.ptr()})) return py::none();
    if (Py_TYPE(x.ptr()) != reinterpret_cast<PyTypeObject*>(tensor_type_.ptr())) return py::none();
    at::Tensor input = THPVariable_Unpack(x.ptr());
    if (!plain(input) || !plan_->accepts(input) || (c10::GradMode::is_enabled() && input.requires_grad()))
      return py::none();
    if (input.size(1) > 1 && input.stride(1) != 1) input = input.contiguous();
    if (!context.is_none()) {
      if (Py_TYPE(context.ptr()) != reinterpret_cast<PyTypeObject*>(tensor_type_.ptr())) return py::none();
      if (c10::GradMode::is_enabled() && THPVariable_Unpack(context.ptr()).requires_grad()) return py::none();
    }
    for (size_t i = 0; i < sources_.size(); ++i)
      if (sources_[i]._version() != versions_[i] || sources_[i].data_ptr() != pointers_[i] ||
          sources_[i].storage().unsafeGetStorageImpl() != storages_[i].unsafeGetStorageImpl())
        return py::none();
    std::optional<at::Tensor> out;
    {
      // Python objects are done with: other threads run while the kernel does (as around torch's ops).
      py::gil_scoped_release released;
      out = plan_->step(input, table_, term_);
    }
    if (!out) return py::none();
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(*out)));
  }

 private:
  // A plain dense CPU tensor (no functorch, functionalization or subclass wrapper, no negative bit), whose
  // memory the plan may read directly.
  static bool plain(const at::Tensor& t) {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    return typeid(*impl) == typeid(c10::TensorImpl) && t.layout() == at::kStrided && !t.is_neg() && !t.is_conj();
  }

  // The index of one of step()'s three checked arguments (tcn, state, context), which passes() reads.
  static int argument_index(const py::handle index) {
    const int i = index.cast<int>();
    TORCH_CHECK(i >= 0 && i < kCheckedArguments, "TcnFastStep: an argument check's index must be 0 (tcn), 1 (state) "
                "or 2 (context), got ", i);
    return i;
  }

  static Check parse(const py::tuple& spec) {
    const std::string kind = spec[0].cast<std::string>();
    Check c;
    auto items = [&](const py::handle sequence) {
      std::vector<py::object> out;
      for (const py::handle item : sequence) out.push_back(py::reinterpret_borrow<py::object>(item));
      return out;
    };
    if (kind == "arg") {  // ("arg", i, expected): argument i (tcn, state, context) is expected
      c = {Kind::Arg, argument_index(spec[1]), py::none(), py::none(), spec[2]};
    } else if (kind == "arg_item") {  // ("arg_item", i, name, expected): argument i's __dict__[name] is expected
      c = {Kind::ArgItem, argument_index(spec[1]), py::none(), spec[2], spec[3]};
    } else if (kind == "dict_of") {  // ("dict_of", obj, d): obj's __dict__ is d
      c = {Kind::DictOf, 0, spec[1], py::none(), spec[2]};
    } else if (kind == "item") {  // ("item", d, key, expected): d.get(key) is expected (a dict)
      TORCH_CHECK(PyDict_CheckExact(spec[1].ptr()), "TcnFastStep: an item check needs a dict");
      c = {Kind::Item, 0, spec[1], spec[2], spec[3]};
    } else if (kind == "values") {  // ("values", d, values): d's values, in order, are these (a dict)
      TORCH_CHECK(PyDict_CheckExact(spec[1].ptr()), "TcnFastStep: a values check needs a dict");
      c = {Kind::Values, 0, spec[1]};
      c.items = items(spec[2]);
    } else if (kind == "list") {  // ("list", l, items): the list l holds exactly these
      TORCH_CHECK(PyList_CheckExact(spec[1].ptr()), "TcnFastStep: a list check needs a list");
      c = {Kind::List, 0, spec[1]};
      c.items = items(spec[2]);
    } else if (kind == "env") {  // ("env", name, value or None): the process environment's variable
      c = {Kind::Env};
      c.env_name = spec[1].cast<std::string>();
      c.env_set = !spec[2].is_none();
      if (c.env_set) c.env_value = spec[2].cast<std::string>();
    } else if (kind == "context_var") {  // ("context_var", var, expected): var.get() is expected
      c = {Kind::ContextVar, 0, spec[1], py::none(), spec[2]};
    } else {
      TORCH_CHECK(false, "TcnFastStep: unknown check ", kind);
    }
    return c;
  }

  // obj.__dict__[key] (None when absent), as a borrowed reference, or nullptr on an error (cleared).
  static PyObject* instance_item(PyObject* obj, PyObject* key, bool* ok) {
    PyObject* dict = PyObject_GenericGetDict(obj, nullptr);
    if (dict == nullptr) {
      PyErr_Clear();
      *ok = false;
      return nullptr;
    }
    PyObject* value = PyDict_GetItemWithError(dict, key);
    Py_DECREF(dict);  // obj keeps the dict and so the value alive
    if (value == nullptr && PyErr_Occurred()) {
      PyErr_Clear();
      *ok = false;
    }
    return value == nullptr ? Py_None : value;
  }

  bool passes(std::array<PyObject*, kCheckedArguments> args) const {
    for (const Check& c : checks_) {
      switch (c.kind) {
        case Kind::Arg:
          if (args[c.index] != c.expected.ptr()) return false;
          break;
        case Kind::ArgItem: {
          bool ok = true;
          if (instance_item(args[c.index], c.key.ptr(), &ok) != c.expected.ptr() || !ok) return false;
          break;
        }
        case Kind::DictOf: {
          PyObject* dict = PyObject_GenericGetDict(c.object.ptr(), nullptr);
          if (dict == nullptr) {
            PyErr_Clear();
            return false;
          }
          Py_DECREF(dict);
          if (dict != c.expected.ptr()) return false;
          break;
        }
        case Kind::Item: {
          PyObject* value = PyDict_GetItemWithError(c.object.ptr(), c.key.ptr());
          if (value == nullptr) {
            if (PyErr_Occurred()) {
              PyErr_Clear();
              return false;
            }
            value = Py_None;
          }
          if (value != c.expected.ptr()) return false;
          break;
        }
        case Kind::Values: {
          if (PyDict_Size(c.object.ptr()) != static_cast<Py_ssize_t>(c.items.size())) return false;
          Py_ssize_t position = 0;
          PyObject *key, *value;
          for (size_t i = 0; PyDict_Next(c.object.ptr(), &position, &key, &value); ++i)
            if (i >= c.items.size() || value != c.items[i].ptr()) return false;
          break;
        }
        case Kind::List: {
          if (PyList_GET_SIZE(c.object.ptr()) != static_cast<Py_ssize_t>(c.items.size())) return false;
          for (size_t i = 0; i < c.items.size(); ++i)
            if (PyList_GET_ITEM(c.object.ptr(), i) != c.items[i].ptr()) return false;
          break;
        }
        case Kind::Env: {
          // os.environ's changes reach the process environment (putenv), where this reads them.
          const char* value = std::getenv(c.env_name.c_str());
          if ((value != nullptr) != c.env_set || (value != nullptr && c.env_value != value)) return false;
          break;
        }
        case Kind::ContextVar: {
          PyObject* value = nullptr;
          if (PyContextVar_Get(c.object.ptr(), nullptr, &value) < 0) {
            PyErr_Clear();
            return false;
          }
          const bool same = (value == nullptr ? Py_None : value) == c.expected.ptr();
          Py_XDECREF(value);
          if (!same) return false;
          break;
        }
      }
    }
    return true;
  }

  py::object plan_object_, tensor_type_;
  TcnStepPlan* plan_ = nullptr;
  std::optional<at::Tensor> table_, term_;
  std::vector<Check> checks_;
  std::vector<at::Tensor> sources_;
  std::vector<int64_t> versions_;
  std::vector<void*> pointers_;
  std::vector<c10::Storage> storages_;
  bool usable_ = true;
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
           py::arg("context_residual") = py::none(), py::call_guard<py::gil_scoped_release>());
  py::class_<TcnFastStep>(m, "TcnFastStep", "TCN.step's guarded shortcut to a prepared step (see TCN.step).")
      .def(py::init<const py::list&, py::object, py::object, std::optional<at::Tensor>, std::optional<at::Tensor>,
                    const std::vector<at::Tensor>&>())
      .def("step", &TcnFastStep::step, py::arg("tcn"), py::arg("x"), py::arg("state"), py::arg("context"));
}

}  // namespace hiertcn
