// The ISAs in the order `kernels.native` names them: 0 portable, 1 avx2, 2 avx512, 3 avx512_vnni.
#pragma once
#include <cstdint>

namespace glmserve {

// Whether this CPU runs code built for `isa` (ops.cpp). Check it before calling anything from that ISA's
// translation unit, a function that only builds its kernel table included: the compiler may use the ISA there too.
bool cpu_runs_isa(int64_t isa);

}  // namespace glmserve
