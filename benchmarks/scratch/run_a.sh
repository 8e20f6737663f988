mkdir -p /tmp/p && ln -sfn $PWD/kernels /tmp/p/psa_kernels; export PYTHONPATH=/tmp/p:$PWD
timeout 120 python benchmarks/gluon_psa.py --check --lengths 8192 --regs 240/24 > $OUT/1_check.txt 2>&1; grep -v Warn $OUT/1_check.txt | grep -v "^ *cpu = "
if grep -q MISMATCH $OUT/1_check.txt || ! grep -q "L 8192" $OUT/1_check.txt; then echo "CHECK FAILED"; exit 1; fi
timeout 200 python tests/gpu/check_kernels.py --quick --sections accuracy,graph,batch,memory --memory-length 65536 --out $OUT/ck > $OUT/2_ck.txt 2>&1; grep -v Warn $OUT/2_ck.txt | tail -34
timeout 200 python benchmarks/attention.py --lengths 8192,12288,16384,32768,65536 --shapes text-causal --kinds video-like --presets video_mme --out $OUT/bench > $OUT/3_bench.txt 2>&1; tail -40 $OUT/3_bench.txt
python benchmarks/report.py $OUT/bench/attention.json > $OUT/4_report.txt 2>&1
timeout 60 python benchmarks/level1_vs_sdpa.py --lengths 16384,32768,65536 > $OUT/5_level1.txt 2>&1; tail -4 $OUT/5_level1.txt
timeout 100 python benchmarks/gluon_psa.py --lengths 16384,65536 --regs 240/24,232/40 --stages 2,3 > $OUT/6_forms.txt 2>&1; grep "^L " $OUT/6_forms.txt
