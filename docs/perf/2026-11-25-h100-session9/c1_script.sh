cd bench && OUT=$OUT timeout 560 python3 bench_grouped_gemm.py --tma --geometries olmoe,small  # (first version of the kernels: a176689^ working tree)
