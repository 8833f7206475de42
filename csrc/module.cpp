// rankwise._C: the C++ extension. One PYBIND11_MODULE block; the ops live in
// their own .cpp files and are declared in ops.h.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static int64_t num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rankwise C++ extension (CPU sparse update-masking ops)";
  m.def("num_threads", &num_threads,
        "Number of OpenMP threads the extension's parallel loops use.");
}
