// The one TORCH_LIBRARY(fastllm, m): every op's schema. Implementations are registered
// per device next to each family's glue (csrc/<family>/<family>_ops.cpp); autograd and
// fake (meta) implementations are registered in Python (fastllm/ops/).
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

#define FASTLLM_DEF(schema) m.def(schema);

TORCH_LIBRARY(fastllm, m) {
  FASTLLM_ALL_SCHEMAS(FASTLLM_DEF)
}

// `import fastllm._C` loads the library (running the registrations above); the module
// itself is empty — every op is reached through torch.ops.fastllm.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
