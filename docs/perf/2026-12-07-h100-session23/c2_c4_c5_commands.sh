# session 23, calls 2, 4 and 5 as run (one line each, on the machine held from the call before; no carry)
# c2 (after c1, session 22's code): FP8 forward+backward's kernel table, weights quantized per call
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; date -u; timeout 300 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8 --profile > $OUT/fp8_profile.log 2>&1; echo rc $?; grep -E "tok/s" $OUT/fp8_profile.log | tail -2; ls $OUT; date -u
# c4 (after c3, commit e4900a0): the cached FP8 run's kernel table
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; date -u; timeout 300 python3 bench/bench_model.py --mb 2 --systems megamoe-compile-fp8-cached --profile > $OUT/fp8c_profile.log 2>&1; echo rc $?; grep -E "tok/s|quantized in" $OUT/fp8c_profile.log | tail -3; head -30 $OUT/profile_megamoe-compile-fp8-cached.txt | cut -c1-150; date -u
# c5 (same code): inductor's generated code, to name the quantizing kernels (output_code.log.gz)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; date -u; TORCH_LOGS=output_code timeout 200 python3 bench/bench_model.py --mb 2 --warmup 1 --iters 2 --systems megamoe-compile-fp8-cached > $OUT/run.log 2> $OUT/output_code.log; echo rc $?; ls -la $OUT; grep -c "def triton" $OUT/output_code.log; date -u
