// Thread indices for the kernel bodies (Metal). A simdgroup is 32 threads on Apple GPUs.
const uint3 tg_pos = threadgroup_position_in_grid;
const uint tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
