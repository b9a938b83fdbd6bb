// The int8 linears alone, for CPUs without AVX-512 VNNI (AVX2 + FMA): `int8.h` built for AVX2.
// parafork's row kernel (rowgemm.cpp) carries the same code built for AVX-512 VNNI.
#define PARAFORK_INT8_AVX2
#include "int8.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_int8", &int8k::pack_int8, "pack a [M, K] weight as int8 with per-channel scales");
  m.def("mm", &int8k::mm_int8, "x [N, K] times a pack_int8 blob");
  m.attr("int8_path") = int8k::kPath;
}
