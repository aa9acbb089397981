// The sm90 MLA decode and combine kernels for fp16 queries (fp16 and fp8 caches). One file
// per element type so that the two heavy instantiations compile in parallel.
#define NDEBUG
#include "dskernels/sm90_mla_decode.cuh"

namespace dskernels::mla {

template cudaError_t launch_decode<__half, false>(const DecodeParams&, const CUtensorMap&, int, int, cudaStream_t);
template cudaError_t launch_decode<__half, true>(const DecodeParams&, const CUtensorMap&, int, int, cudaStream_t);
template cudaError_t launch_combine<__half>(const CombineParams&, int, cudaStream_t);

}  // namespace dskernels::mla
