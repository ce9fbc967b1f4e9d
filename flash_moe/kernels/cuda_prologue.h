// Thread indices for the kernel bodies (CUDA). A warp is 32 threads.
const uint3 tg_pos = blockIdx;
const uint tid = threadIdx.x;
const uint lane = threadIdx.x & 31u;
const uint warp = threadIdx.x >> 5;
