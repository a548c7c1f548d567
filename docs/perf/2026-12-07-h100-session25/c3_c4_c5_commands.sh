# session 25, calls 3-5 on c1/c2's machine (warm), each one command line as run:
# c3: the FP8 and CUDA tests (c1's pytest line had timed out at 150 s before printing its summary)
date -u; PYTHONPATH=$PWD timeout 420 python3 -m pytest -q tests/test_fp8_fused.py tests/test_grouped_gemm.py tests/test_experts.py tests/test_kernels.py -k "fp8 or cuda" --durations=8 2>&1 | grep -E "^E  |FAILED|passed|failed|s call" | cut -c1-250 | tail -20; date -u
# c4 (a first try from bench/ failed at once: no PYTHONPATH): bf16 against FP8 with the weights cached
date -u; export PYTHONPATH=$PWD; timeout 200 python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile,megamoe-compile-fp8-cached > $OUT/bm.log 2>&1; echo rc $?; grep -E " mb=2 median|quantized in" $OUT/bm.log; tail -3 $OUT/bm.log | cut -c1-200; date -u
# c5: the kernel table and idle gaps of FP8 with the weights cached
date -u; export PYTHONPATH=$PWD; mkdir -p $OUT/prof; OUT=$OUT/prof timeout 200 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8-cached --profile > $OUT/prof/run.log 2>&1; echo rc $?; grep -E " mb=2 median" $OUT/prof/run.log; head -28 $OUT/prof/profile_megamoe-compile-fp8-cached.txt | cut -c1-110; date -u
