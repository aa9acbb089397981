// The sm90 MLA decode's narrow kernel (s_q * h_q / h_kv <= 32 rows; opt-in DSKERNELS_MLA_NARROW=1)
// for fp16 queries (caches of their type, or fp8 e4m3). Apart from the default kernel's files so the
// instantiations compile in parallel.
#define NDEBUG
#include "dskernels/sm90_mla_decode_narrow.cuh"

namespace dskernels::mla {

template cudaError_t launch_narrow_decode<__half, false>(const DecodeParams&, const CUtensorMap&, int, int, cudaStream_t);
template cudaError_t launch_narrow_decode<__half, true>(const DecodeParams&, const CUtensorMap&, int, int, cudaStream_t);

}  // namespace dskernels::mla
