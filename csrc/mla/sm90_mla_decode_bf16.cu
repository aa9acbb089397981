// The sm90 MLA decode and combine kernels for bf16 queries (bf16 and fp8 caches). One file
// per element type so that the two heavy instantiations compile in parallel.
#define NDEBUG
#include "dskernels/sm90_mla_decode.cuh"

namespace dskernels::mla {

template cudaError_t launch_decode<__nv_bfloat16, false>(const DecodeParams&, const CUtensorMap&, int, int, cudaStream_t);
template cudaError_t launch_decode<__nv_bfloat16, true>(const DecodeParams&, const CUtensorMap&, int, int, cudaStream_t);
template cudaError_t launch_combine<__nv_bfloat16>(const CombineParams&, int, cudaStream_t);

}  // namespace dskernels::mla
