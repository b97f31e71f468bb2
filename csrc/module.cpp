// The Python module sagan_fast._C: importing it loads this library, whose static initializers
// register the operators (torch.ops.sagan_fast.ext_*). It also answers two questions for
// sagan_fast/ops/_backend.py: built_with_cuda() and has_op(name).
//
// Those two are defined as small *Python* functions in the module's namespace (not C builtins):
// the backend dispatch calls them while torch.compile traces a model, and Dynamo can inline a
// Python function but not a C extension's builtin. Plain CPython API, no pybind11: nothing here
// depends on torch's Python bindings, so one source serves every torch version.
#include <Python.h>

namespace {

#ifdef SAGAN_FAST_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

const char kFunctions[] = R"PY(
# Public op names as sagan_fast.ops spells them (see sagan_fast/ops/_backend.py).
_OPS = frozenset(("sagan_attention", "spectral_norm_power_iteration", "spectral_norm_normalize"))


def built_with_cuda():
    """True if the CUDA kernels were compiled in (False: the C++ CPU ops only)."""
    return _BUILT_WITH_CUDA


def has_op(name):
    """True if the extension implements the sagan_fast.ops op of this name."""
    if not isinstance(name, str):
        raise TypeError(f"has_op expects an op name (str), got {type(name).__name__}")
    return name in _OPS
)PY";

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "sagan_fast._C",
                       "Compiled ops of sagan_fast (torch.ops.sagan_fast.ext_*).", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  PyObject* globals = PyModule_GetDict(module);  // borrowed
  PyObject* result = nullptr;
  if (PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) == 0 &&
      PyDict_SetItemString(globals, "_BUILT_WITH_CUDA", kBuiltWithCuda ? Py_True : Py_False) == 0) {
    result = PyRun_String(kFunctions, Py_file_input, globals, globals);
  }
  if (result == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_DECREF(result);
  return module;
}
