// The Python module sagan_fast._C: importing it loads this library, whose static initializers
// register the operators (torch.ops.sagan_fast.ext_*). It also answers two questions for
// sagan_fast/ops/_backend.py. Plain CPython API (no pybind11): nothing here depends on torch's
// Python bindings, so one source serves every torch version.
#include <Python.h>

#include <cstring>

namespace {

#ifdef SAGAN_FAST_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

// Public op names as sagan_fast.ops spells them (see ops/_backend.py `has_op`).
const char* const kOps[] = {"sagan_attention", "spectral_norm_power_iteration", "spectral_norm_normalize"};

PyObject* built_with_cuda(PyObject*, PyObject*) { return PyBool_FromLong(kBuiltWithCuda); }

PyObject* has_op(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: TypeError already set
  for (const char* op : kOps)
    if (std::strcmp(op, name) == 0) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef kMethods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True if the CUDA kernels were compiled in."},
    {"has_op", has_op, METH_O, "True if the extension implements the sagan_fast.ops op of this name."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "sagan_fast._C",
                       "Compiled ops of sagan_fast (torch.ops.sagan_fast.ext_*).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
