#!/usr/bin/env bash
# GPU checks and benchmarks in stages that each fit one device call (<= 10 minutes), everything
# written under $OUT (logs, JSON). Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_checks.sh tests      # GPU tests: kernels, profiler, whole model, bench (~4 min)
#   bash benchmarks/gpu_checks.sh decode     # GEMV configs at M = 1, 2, 4 + profiler batch 8 / 16 (~4 min)
#   bash benchmarks/gpu_checks.sh bench      # ffnsplit bench: layer over M + Llama-3-8B end to end (~3 min)
#   bash benchmarks/gpu_checks.sh pdl        # decode-path GPU tests, then the layer at M = 1, 4 and
#                                            # the 8B decode with programmatic dependent launch on
#                                            # and off (FFNSPLIT_PDL), same machine (~8 min)
#   bash benchmarks/gpu_checks.sh profile32k # profiler tests + 32k-token overhead against the copy
#                                            # of the package in out/bl_head (carry it) (~3 min)
#   atomic (GEMV tests + M = 1, 4 and 8B decode with atomic GEMV candidates on/off/on),
#   final (decode-path GPU tests + the full bench),
#   gemv (GEMV tests), floor (bytes-only read kernel), half2 (benchmarks/proto_half2.py),
#   mma (the Gluon decode tier: tests + benchmarks/bench_mma.py), prefill (dequant path variants
#   at M = 1024-4096: heavy rows in the scratch or not, 128 and 256 MiB chunks), decodeops (decoder op tests), trace
#   profprefill (benchmarks/prof_prefill.py + probe_cublas.py), odd (717 heavy neurons),
#   swap (benchmarks/proto_swap.py), swaptier (the W-as-A form: tests + bench_mma), pdlmma,
#   next14 (session 13's open questions), fused15 (the one-launch FFN), verify15, next16, s16ab, ncu16, proj, floor17 (ran in 17), finish17, trace17, ab17, ab18, ticket18, decoder18, trace18, slices18, trig19 (ran in 19), mid19, big20 (prepared), wg20 (branch s20-wgmma,
#   ran in 20), attn20, attn21 (ran in 21), tune21 (branch s21-prepared, ran in 21), next22, fin22 (branch s22-prepared; both ran in 22), warps22, chunks22, split22, persm22 (ran in 22), gen23, wg23, ptr23, pf24, smol24, smolerr24, wga25, ka25, ring25, wgp25, wgb25, fin25, w4a826 and w4a826b (prepared in 26), oracle, padheavy, s14, final14, swap16, verify14, final13, graphs (tests/test_graphs.py), eager (benchmarks/bench_eager.py),
#   (benchmarks/trace_decode.py), decode8b (M = 1, 4 + 8B decode once)
# Several stages in one call: bash benchmarks/gpu_checks.sh gemv trace decode8b
# Each step has its own time limit, so one slow step cannot take the whole call.
set -uo pipefail
export PYTHONPATH=.
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
stages=("${@:-tests}")  # several stages run in order: gpu_checks.sh pdl trace

run() {  # run LIMIT NAME CMD...: log to $OUT/NAME.log, print its tail
    local limit=$1 name=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: rc=$? ($(date -u +%H:%M:%S))"
    # a timed-out pytest -n leaves xdist workers on the GPU: they would spoil later timings
    pkill -f 'm pytes[t]' 2> /dev/null
    tail -n 3 "$OUT/$name.log"
}

SMOL=/tmp/smollm2_compressed
smol_join() {  # the compressed SmolLM2 folder from its three carried parts (smollm2_parts.sh)
    mkdir -p $SMOL && cp out/s24m/a/*.json out/s24m/a/*.jinja "$SMOL"/ 2> /dev/null
    cat out/s24m/a/model.part out/s24m/b/model.part out/s24m/c/model.part > "$SMOL/model.safetensors"
    (cd "$SMOL" && sha256sum -c /dev/stdin <<< "$(cat "$OLDPWD/out/s24m/a/model.sha256")")
}

ab_mma_runs() {  # this tree against the package in out/base (carry out; git archive BASE
    # ffnsplit benchmarks/bench_decode.py | tar -x -C out/base): new / base / new / base
    local abs_out name
    abs_out=$(cd "$OUT" && pwd)
    for name in a_new b_base c_new d_base; do
        if [ "${name#*_}" = base ]; then
            (cd out/base && OUT=$abs_out run 90 "ab_$name" env FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. \
                python3 ../../benchmarks/ab_mma.py "$name")
        else
            run 90 "ab_$name" env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/ab_mma.py "$name"
        fi
    done
}

mma_tests18() {  # the Gluon tier's GPU tests, the ticket's graph-replay stress test first
    run 240 test_mma18 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -x -n 8 \
        tests/test_mma_decode.py -k "ticket or swap_configs or every_config or quant_matmul or row_tiles"
}

for stage in "${stages[@]}"; do
case "$stage" in
tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    run 150 test_kernels env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x -n 8 \
        tests/test_kernels.py -k "gemv or large_split or cuda_graph or bf16 or every_config"
    run 60 test_profile python3 -m pytest -q -x tests/test_profile.py -k "kernel or partials or cuda"
    run 150 test_modules env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x tests/test_modules.py -k whole
    run 90 test_bench env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x tests/test_bench.py tests/test_decode_ops.py
    ;;
decode)
    run 200 bench_decode python3 benchmarks/bench_decode.py --m 1,2,4 --fast-only \
        --out "$OUT/bench_decode.json"
    for bs in 8 16; do
        run 90 "bench_profile_b$bs" python3 benchmarks/bench_profile.py --tokens 65536 \
            --batch-size "$bs" --skip-large --out "$OUT/bench_profile_b$bs.json"
    done
    ;;
bench)
    run 400 bench python3 -m ffnsplit.cli bench --shape 4096x14336 --e2e-shape llama3-8b \
        --json "$OUT/bench.json"
    ;;
pdl)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    run 150 test_gemv env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x -n 8 tests/test_kernels.py \
        -k "gemv or cuda_graph"
    run 100 test_decode env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x -n 4 \
        tests/test_decode_ops.py tests/test_bench.py
    for name in a_on b_off c_on; do  # on, off, on again: the machine's drift shows
        pdl=1
        [ "$name" = b_off ] && pdl=0
        run 120 "bench_pdl_$name" env FFNSPLIT_PDL=$pdl python3 -m ffnsplit.cli bench \
            --shape 4096x14336 --m 1,4 --e2e-shape llama3-8b --json "$OUT/bench_pdl_$name.json"
    done
    ;;
gemv)  # the GEMV decode path's GPU tests (every candidate config alone, fp16 and bf16); a cold
    # Triton cache needs more than 180 s
    run 300 test_gemv env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x -n 8 tests/test_kernels.py \
        -k "gemv or cuda_graph"
    ;;
floor)  # what a kernel that only reads the split FFN's bytes costs (benchmarks/bench_floor.py)
    run 150 bench_floor python3 benchmarks/bench_floor.py --out "$OUT/floor.json"
    ;;
prefill)  # large M: dequant path with heavy rows in the scratch or not, 128 and 256 MiB chunks,
    # after its GPU tests (~4 min)
    run 120 test_dequant env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_kernels.py -k "dequant or large_split"
    for mib in 128 256; do
        run 150 "bench_prefill_$mib" python3 benchmarks/bench_prefill.py --ms 1024,2048,4096 \
            --paths dense,dequant,dequant_fold --chunk-mib "$mib" --out "$OUT/bench_prefill_$mib.json"
    done
    ;;
mma)  # the Gluon decode tier (ffnsplit/kernels/mma_decode.py): its GPU tests, then every path
    # and config at M = 1, 2, 4, 8, 16 (benchmarks/bench_mma.py) (~5 min)
    run 240 test_mma env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 tests/test_mma_decode.py \
        tests/test_kernels.py tests/test_bench.py -k "mma or cuda_graph or static_decoder or e2e"
    run 280 bench_mma python3 benchmarks/bench_mma.py --out "$OUT/bench_mma.json"
    # row tiles (branch mma-next): path="mma" at 32 and 64 rows against the tl small tier
    run 150 bench_mma_rows python3 benchmarks/bench_mma.py --m 32,64 --paths small,mma \
        --out "$OUT/bench_mma_rows.json"
    ;;
profprefill)  # where an eager 512-token prefill goes (4 layers, torch profiler) and which
    # cuBLAS kernels kernel A's GEMM shapes get (~1 min)
    run 120 prof_prefill python3 benchmarks/prof_prefill.py
    run 60 probe_cublas python3 benchmarks/probe_cublas.py
    ;;
odd)  # the layer with ceil(5%) = 717 heavy neurons, what `compress` and the e2e model make (the
    # layer tables use 720): decode paths at M = 1-32, then the large-M paths (~5 min)
    run 240 bench_mma_717 python3 benchmarks/bench_mma.py --heavy 717 --m 1,4,16 \
        --out "$OUT/bench_mma_717.json"
    run 100 bench_mma_717_rows python3 benchmarks/bench_mma.py --heavy 717 --m 32 \
        --paths small,mma --out "$OUT/bench_mma_717_rows.json"
    run 120 bench_prefill_717 python3 benchmarks/bench_prefill.py --heavy 717 \
        --ms 64,256,512,2048 --paths dense,auto --out "$OUT/bench_prefill_717.json"
    ;;
half2)  # the packed-half2 prototype of kernel B's loop against gemv's kernel B
    run 200 proto_half2 python3 benchmarks/proto_half2.py --out "$OUT/proto_half2.json"
    ;;
swap)  # the W-as-A tensor-core prototype (M <= 8) against gemv's kernel B (session 12: not run)
    run 240 proto_swap python3 benchmarks/proto_swap.py --out "$OUT/proto_swap.json"
    ;;
swaptier)  # the W-as-A form of the Gluon tier (MmaConfig.swap): its GPU tests and the x-as-A
    # tier's, then every config alone at M = 1, 4, 8, 16 against the GEMV path (~9 min)
    run 300 test_swaptier env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_mma_decode.py
    run 380 bench_swaptier python3 benchmarks/bench_mma.py --m "${SWAP_MS:-1,4,8,16}" --paths gemv,mma \
        --out "$OUT/bench_swaptier.json"
    ;;
final13)  # session 13: the full bench (layer over M + Llama-3-8B end to end), then the layer
    # at M = 1, 4 and the 8B decode with "auto" taking the Gluon tier at M = 1 too (~8 min)
    run 330 bench python3 -m ffnsplit.cli bench --shape 4096x14336 --e2e-shape llama3-8b \
        --json "$OUT/bench.json"
    run 170 bench_min1 env FFNSPLIT_MMA_MIN_M=1 python3 -m ffnsplit.cli bench --shape 4096x14336 \
        --m 1,4 --e2e-shape llama3-8b --json "$OUT/bench_min1.json"
    ;;
pdlmma)  # the Gluon tier as PDL launches: its GPU tests, then the layer at M = 1, 4 and the
    # 8B decode with "auto" taking the Gluon tier at M = 1 (FFNSPLIT_MMA_MIN_M=1) and not (~5 min)
    run 150 test_pdlmma env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_mma_decode.py
    for min_m in 1 2; do
        run 100 "bench_pdl_min$min_m" env FFNSPLIT_MMA_MIN_M=$min_m python3 -m ffnsplit.cli bench \
            --shape 4096x14336 --m 1,4 --e2e-shape llama3-8b --json "$OUT/bench_pdl_min$min_m.json"
    done
    ;;
next14)  # session 13's open questions in one call (~7 min): the pdlmma stage (GPU tests with
    # the padded heavy_down rows, then M = 1, 4 and the 8B decode with the Gluon tier at M = 1
    # and without), then every Gluon config alone at M = 16 and 32 (the 2-row candidates)
    bash "$0" pdlmma
    run 200 bench_mma_16_32 python3 benchmarks/bench_mma.py --m 16,32 --paths mma \
        --out "$OUT/bench_mma_16_32.json"
    ;;
padheavy)  # the first CUDA call pads the heavy part to a multiple of 8 neurons (format.pad_heavy)
    run 120 test_padheavy env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf tests/test_graphs.py \
        -k pads_the_heavy
    ;;
s14)  # session 14: the padded heavy part's GPU tests (Gluon tier, GEMV, whole model), then the
    # layer at M = 1, 4 and the 8B decode with the Gluon tier at M = 1 and without (~6 min)
    run 200 test_s14 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 tests/test_mma_decode.py \
        tests/test_kernels.py tests/test_modules.py -k "mma or strided or whole or gemv"
    for min_m in 1 2; do
        run 150 "dec_min$min_m" env FFNSPLIT_MMA_MIN_M=$min_m python3 -m ffnsplit.cli bench \
            --shape 4096x14336 --m 1,4 --e2e-shape llama3-8b --json "$OUT/dec_min$min_m.json"
    done
    ;;
final14)  # session 14's defaults ("auto" takes the Gluon tier at M = 1): the tests that name
    # the path a bench row took, the padded heavy part's, then the full bench (~7 min)
    run 150 test_final14 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 tests/test_bench.py \
        tests/test_graphs.py tests/test_mma_decode.py -k "every_method or kernel_path or pads or e2e"
    run 330 bench python3 -m ffnsplit.cli bench --shape 4096x14336 --e2e-shape llama3-8b \
        --json "$OUT/bench.json"
    ;;
swap16)  # the W-as-A configs at 16 rows with the register counts the sm_90 AOT gives there
    # (kernel A's ring 127, so 4 an SM; the others resized), then the 8B decode trace (~6 min)
    run 150 test_swap16 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 tests/test_bench.py \
        tests/test_graphs.py tests/test_mma_decode.py -k "every_method or kernel_path or pads or swap"
    run 200 bench_swap16 python3 benchmarks/bench_mma.py --m 8,16 --paths mma --swap-max-m 16 \
        --extra-up "MmaConfig(4, 1, resident=3, fused=True, swap=True)" \
        --extra-down "MmaConfig(4, 1, resident=4, swap=True, fused=True, maxnreg=128);
            MmaConfig(4, 1, resident=2, swap=True, fused=True, depth=2)" \
        --out "$OUT/bench_swap16.json"
    run 170 trace_decode python3 benchmarks/trace_decode.py --out "$OUT/trace_decode.json"
    ;;
verify14)  # session 14's GPU tests of the decode paths, whole models and graphs with the padded
    # heavy part (~7 min on a cold Triton cache)
    run 480 test_verify14 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_kernels.py tests/test_bench.py tests/test_modules.py tests/test_mma_decode.py \
        tests/test_graphs.py \
        -k "gemv or mma or cuda_graph or static_decoder or e2e or whole or strided or pad or graph"
    ;;
fused15)  # session 15: the one-launch split FFN's GPU tests, then bench_fused at M = 1-4
    # (each config alone) (~6 min on a cold Triton cache)
    run 240 test_fused15 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_kernels.py -k "fused or cuda_graph or auto_path"
    run 300 bench_fused python3 benchmarks/bench_fused.py --m 1,2,4 --out "$OUT/fused.json"
    ;;
verify15)  # session 15's final GPU check: every one-launch config (fp16, bf16), the bench rows'
    # paths, graphs of split_ffn; then bench_fused with the final configs, tuned (~7 min)
    run 330 test_verify15 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_kernels.py tests/test_bench.py tests/test_mma_decode.py \
        -k "fused or cuda_graph or auto_path or every_method or kernel_path"
    run 200 bench_fused python3 benchmarks/bench_fused.py --m 1,2,4 --no-configs \
        --out "$OUT/fused.json"
    ;;
next16)  # for session 16: more programs an SM for the Gluon tier at M = 1-4 (ncu, session 15:
    # ~3.5 warps a scheduler in both kernels): W-as-A configs with 5-6 resident programs under
    # register caps (sm_90 AOT, Triton 3.6: kernel A ring 96 registers 40/48 bytes of spills,
    # 80 registers 144/92; kernel B 96 registers 256/248), each alone against the tier's (~4 min;
    # run in session 16, slower: results/bench_mma_h200_s16_resident.json)
    run 330 bench_mma_next16 python3 benchmarks/bench_mma.py --m 1,4 --paths mma \
        --extra-up "MmaConfig(4, 1, resident=5, fused=True, swap=True, depth=3, maxnreg=96); MmaConfig(4, 1, resident=6, fused=True, swap=True, depth=3, maxnreg=80)" \
        --extra-down "MmaConfig(4, 2, resident=5, swap=True, fused=True, maxnreg=96)" \
        --out "$OUT/bench_mma_next16.json"
    ;;
s16ab)  # session 16: this tree against the package in out/base (carry it: git archive of the
    # commit compared against), GPU tests of the Gluon tier first, then the layer at M = 1, 4,
    # 8, 16, new / base / new on one machine (~7 min)
    run 200 test_mma env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_mma_decode.py -k "swap_configs or every_config or quant_matmul or row_tiles"
    for name in a_new b_base c_new; do
        path=.
        [ "$name" = b_base ] && path=out/base
        run 130 "bench_$name" env -C "$path" python3 -m ffnsplit.cli bench \
            --shape 4096x14336 --m 1,4,8,16 --json "$OUT/bench_$name.json"
    done
    ;;
ncu16)  # session 16: why the Gluon tier's warps wait at M = 1 (every stall reason per issued
    # instruction, kernel A and B of the second call, the tier's first configs; ~2 min). Session
    # 16 ran it with the tuner on, whose trial launches made both captured kernels kernel A;
    # FFNSPLIT_AUTOTUNE=0 (added after) makes each call one kernel A and one kernel B
    run 240 ncu_stalls env FFNSPLIT_AUTOTUNE=0 /usr/local/cuda/bin/ncu --clock-control none \
        -k "regex:_up_kernel|_down_kernel" --launch-skip 2 \
        --launch-count 2 --section SchedulerStats --section WarpStateStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python3 benchmarks/ncu_decode.py --m 1 --path auto
    ;;
floor17)  # for session 17 (prepared in 16, not run): the one-launch floor with B's items waiting
    # only for their share of A (per-item flags) against waiting for all of A and against two
    # PDL launches (benchmarks/bench_floor.py, A's and B's byte counts; ~3 min)
    run 300 bench_floor17 python3 benchmarks/bench_floor.py --mb 35.6,71.1 --out "$OUT/floor17.json"
    ;;
finish17)  # session 17: what the split-K tile finish costs kernel A and B at M = 1, 4, 8
    # (fused against partials only; benchmarks/bench_finish.py, ~1 min)
    run 200 bench_finish env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/bench_finish.py \
        --out "$OUT/finish.json"
    ;;
trace17)  # session 17: per-program %globaltimer stamps of kernel A and B at M = 1, 4 in a graph
    # replay of the layer (benchmarks/trace_tiles.py; a script copy of it ran in session 17)
    run 200 trace_tiles env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/trace_tiles.py \
        --out "$OUT/trace.json"
    ;;
ab17)  # session 17: this tree against the package in out/base (carry out; git archive BASE
    # ffnsplit benchmarks/bench_decode.py | tar -x -C out/base), new / base / new / base, then
    # the Gluon tier's GPU tests (~3 min)
    ab_mma_runs
    run 200 test_mma env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 \
        tests/test_mma_decode.py -k "swap_configs or every_config or quant_matmul"
    ;;
ab18)  # session 18: the ticket without the per-thread fence: its GPU tests (the graph-replay
    # stress test first), then this tree against out/base as in ab17 (~4 min)
    mma_tests18
    ab_mma_runs
    ;;
ticket18)  # session 18: the ticket's GPU tests alone (the graph-replay stress test first)
    mma_tests18
    ;;
decoder18)  # session 18: the bench's decoder (projections through split_linear) on the GPU
    run 200 test_decoder18 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -x -n 4 \
        tests/test_bench.py tests/test_decode_ops.py
    ;;
trace18)  # session 18: the decode_ops GPU tests, then the decode step traced with cuBLAS
    # projections (FFNSPLIT_DECODER_PROJ=torch; ran on branch s18-rope-attention)
    run 120 test_decodeops18 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -x -n 4 \
        tests/test_decode_ops.py
    run 170 trace18 env FFNSPLIT_DECODER_PROJ=torch python3 benchmarks/trace_decode.py \
        --out "$OUT/trace18.json"
    ;;
slices18)  # kernel B's packed / dense K-slice share-out: DENSE_SLICE_WEIGHT 1.0, 0.75, 0.5 at
    # the Llama-3-8B FFN, then 1.0 against 0.75 at three other FFN shapes (~4 min)
    run 120 slices_down env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/slices_down.py
    for shape in 4096x11008 3584x18944 2048x8192; do
        run 90 "slices_down_$shape" env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/slices_down.py \
            --shape "$shape" --weights 1.0,0.75
    done
    ;;
trig19)  # prepared in session 18 (branch s19-prepared, not run): dense-only split_linear calls
    # (the decoder's projections) without the early PDL trigger (FFNSPLIT_DENSE_TRIGGER=0).
    # GPU tests of the tier and the decoder, then the oracle with the trigger on and off: look at
    # own_proj against full in each (~5 min)
    run 200 test_trig19 env FFNSPLIT_AUTOTUNE=0 FFNSPLIT_DENSE_TRIGGER=0 python3 -m pytest -q \
        -rf -x -n 8 tests/test_mma_decode.py tests/test_bench.py -k "quant_matmul or ticket or \
        projections or static_decoder or e2e"
    run 150 oracle_trigger_on python3 benchmarks/oracle_decode.py --out "$OUT/oracle_on.json"
    run 150 oracle_trigger_off env FFNSPLIT_DENSE_TRIGGER=0 python3 benchmarks/oracle_decode.py \
        --out "$OUT/oracle_off.json"
    ;;
mid19)  # session 19: the tl small / prefill tiers at 64-512 rows: the W-as-A configs against
    # the x @ W^T ones with forced K-splits (sweep_small.py), the prefill / dequant crossover
    # (sweep_mid.py), their GPU tests (~4 min)
    run 200 test_mid19 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -x -n 8 \
        tests/test_kernels.py -k "weights_as_the_a_operand or split_linear or small or prefill"
    run 200 sweep64 env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/sweep_small.py --m 64 \
        --up a64x64w4,a64x64wa,a64x128wa_w8 --up-splits 1,2 \
        --down b64x128w8,b64x64w4,b64x64wa,b64x128wa_w8 --down-splits 2,4,6,8,9 \
        --out "$OUT/sweep64.json"
    run 120 sweep256 env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/sweep_small.py --m 256 \
        --up a128x128wa_w8 --up-splits 1 --down b128x128wa_w8 --down-splits 1,2,4 \
        --out "$OUT/sweep256.json"
    run 120 crossover env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/sweep_mid.py \
        --m 64,128,256,384,512 --paths small,prefill,dequant --out "$OUT/crossover.json"
    ;;
warps22)  # session 22: rope_attention's warps picked by the grid (4 up to two programs an
    # SM, 2 beyond): its GPU tests, then the 8B step at caches of 1,056, 1,312 and 2,016 keys
    # with the pick against forced 4 and 2 warps (~5 min)
    run 240 test_attn22 python3 -m pytest -q -rf -x -n 4 tests/test_decode_ops.py -k "rope_attention or warps"
    for prompt in 1024 1280 1984; do
        run 150 "oracle_warps$prompt" python3 benchmarks/oracle_decode.py --prompt $prompt --rounds 2 \
            --variants full,attn_n32w4,attn_n32w2 --out "$OUT/oracle_warps$prompt.json"
    done
    ;;
chunks22)  # session 22: rope_attention's keys a program (chunk) by cache length, 32 keys a
    # block, 2 and 4 warps, with a GEMV before each layer (~3 min)
    for len in 640 4096 8192; do
        run 150 "chunks22_$len" python3 benchmarks/bench_attention.py --length $len \
            --position $((len - 40)) --with-proj --forms fused,empty --block-n 32 --warps 2,4 \
            --chunks 0,64,128,256 --out "$OUT/chunks22_$len.json"
    done
    ;;
split22)  # session 22: split attention's chunks for about two programs an SM (was: at most
    # 128 chunks). The decode_ops GPU tests, then each attention form alone at 640 / 4,096 /
    # 8,192 keys under the new and the old chunks, then the 8B step with the new chunks (full)
    # against the old (attn_n32p0) at 640 / 2,112 / 4,096-key caches (~6 min)
    run 240 test_split22 python3 -m pytest -q -rf -x -n 4 tests/test_decode_ops.py
    for len in 640 4096 8192; do
        for p in 2 0; do
            run 100 "split22_${len}_p$p" env FFNSPLIT_ATTENTION_PROGRAMS_PER_SM=$p python3 \
                benchmarks/bench_attention.py --length $len --position $((len - 40)) --with-proj \
                --forms fused,unfused,empty --block-n 32 --warps 0 --out "$OUT/split22_${len}_p$p.json"
        done
    done
    for prompt in 512 1984 3968; do
        run 150 "oracle_split$prompt" python3 benchmarks/oracle_decode.py --prompt $prompt --rounds 2 \
            --variants full,attn_n32p0 --out "$OUT/oracle_split$prompt.json"
    done
    ;;
ptr23)  # session 23 (ran on branch s23-ptrs, dropped; out/base = dd561ea): kernel B's words through pointer tensors with N a compile-time constant
    # (immediate offsets; sm_90 light loop 320 -> 255 instructions a chunk at M = 1, 318 -> 210
    # at 16): the Gluon tier's GPU tests, the decoder ops (their projections are split_linear),
    # then this tree against out/base (carry out) as in ab17 (~5 min)
    mma_tests18
    run 150 test_decodeops23 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -x -n 8 -m 'not slow' \
        tests/test_decode_ops.py tests/test_generate.py
    ab_mma_runs
    ;;
wga25)  # session 24 (ran at M = 256 only): proto_wgmma.kernel_a, the whole kernel A (heavy fp16
    # rows and light int4 words, x by TMA) in one launch: its checks and the x_tma ones, then
    # M = 128, 256, 512 against the tl tiers and the light-only kernels (~3 min)
    run 400 wga25 python3 benchmarks/bench_wgmma.py --tma 128,256,512 --out "$OUT/wga25.json"
    ;;
ka25)  # session 25: proto_wgmma.kernel_a per (num_warps, bt) (two warpgroups of 64 neurons sharing
    # each x stage: half the L2 reads of x), its checks, then M = 64-1024 against the tl kernel A
    # and cuBLAS (bench_wgmma.py --ka); then ncu of the 4 x 128 and 8 x 128 forms at M = 256 (~5 min)
    run 300 ka25 python3 benchmarks/bench_wgmma.py --ka 64,128,256,512,1024 --out "$OUT/ka25.json"
    for v in "4 128" "8 128"; do
        set -- $v
        run 150 "ncu_ka25_$1_$2" /usr/local/cuda/bin/ncu --clock-control none -k regex:_w4_up_kernel \
            --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy \
            --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
            --metrics "regex:sm__pipe_tensor_op.*pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
            python3 benchmarks/ncu_wgmma.py --m 256 --num-warps $1 --bt $2
    done
    ;;
ring25)  # session 25: kernel_a's light words, scales and zeros through a cp.async ring (ring 3-8
    # stages) against the register sets (0): checks, M = 128-1024 (bench_wgmma.py --ka), then ncu
    # of ring 4 at M = 256 (~4 min)
    run 330 ring25 python3 benchmarks/bench_wgmma.py --ka 128,256,512,1024 --out "$OUT/ring25.json"
    run 150 ncu_ring25 /usr/local/cuda/bin/ncu --clock-control none -k regex:_w4_up_kernel \
        --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy \
        --section SchedulerStats --section WarpStateStats \
        --metrics "regex:sm__pipe_tensor_op_hmma_cycles_active.avg.pct.*,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python3 benchmarks/ncu_wgmma.py --m 256 --ring 4
    ;;
wgp25)  # session 25: the package's Hopper prefill kernel A (ffnsplit/kernels/wgmma_prefill.py):
    # its GPU tests, then the layer by `ffnsplit bench` with it on for 128-1024 rows against off
    # (the tl prefill tier / dequant path), twice each, to set MIN_M / MAX_M (~6 min)
    run 240 test_wgp25 python3 -m pytest -q -rf -x tests/test_wgmma_prefill.py
    for round in 1 2; do
        for on in 1 0; do
            run 150 "wgp25_${on}_$round" env FFNSPLIT_WGMMA=$on FFNSPLIT_WGMMA_MIN_M=128 \
                FFNSPLIT_WGMMA_MAX_M=1024 python3 -m ffnsplit.cli bench --shape 4096x14336 \
                --m 128,192,256,384,512,768,1024 --json "$OUT/wgp25_${on}_$round.json"
        done
    done
    ;;
wgb25)  # session 25: the package's Hopper prefill kernel B too (wgmma_prefill.split_linear): the
    # GPU tests of both kernels and the large split FFN at every tier, then the layer with kernel
    # B on (up to 1024 rows) against off, kernel A on in both (~5 min)
    run 300 test_wgb25 python3 -m pytest -q -rf -x tests/test_wgmma_prefill.py \
        tests/test_kernels.py -k "wgmma or kernel_a or kernel_b or auto_takes or large_split_ffn"
    for on in 1 0; do
        run 150 "wgb25_$on" env FFNSPLIT_WGMMA_DOWN=$on FFNSPLIT_WGMMA_DOWN_MAX_M=1024 \
            python3 -m ffnsplit.cli bench --shape 4096x14336 --m 192,256,384,512,768 \
            --json "$OUT/wgb25_$on.json"
    done
    ;;
w4a826)  # session 26 (prepared, not run): the W4A8 split FFN (kernels/w4a8.py) GPU tests (fp16,
    # fp32, bf16), then its timings against dense and the fp16 split FFN over M, every config at
    # 16 and 256 rows (~6 min)
    run 200 test_w4a826 python3 -m pytest -q -rf -x tests/test_w4a8.py
    run 240 w4a826 python3 benchmarks/bench_w4a8.py --out "$OUT/w4a826.json"
    run 150 w4a826_all python3 benchmarks/bench_w4a8.py --m 16,256 --configs all \
        --out "$OUT/w4a826_all.json"
    ;;
w4a826b)  # session 26 (prepared): ffnsplit bench's table with the W4A8 rows, the Hopper kernels
    # on and off (~4 min)
    for on in 1 0; do
        run 120 "w4a826b_$on" env FFNSPLIT_W4A8_WGMMA=$on python3 -m ffnsplit.cli bench \
            --shape 4096x14336 --m 1,16,64,256,2048 --light-act int8 --json "$OUT/w4a826b_$on.json"
    done
    ;;
fin25)  # session 25's last call: the GPU tests of both Hopper prefill kernels (kernel A writing
    # kernel B's x in place), then the layer with kernel B on against off (~5 min)
    run 270 test_fin25 python3 -m pytest -q -rf -x tests/test_wgmma_prefill.py
    for on in 1 0; do
        run 100 "fin25_$on" env FFNSPLIT_WGMMA_DOWN=$on python3 -m ffnsplit.cli bench \
            --shape 4096x14336 --m 192,256,384,512 --json "$OUT/fin25_$on.json"
    done
    ;;
smol24)  # session 24: the real compressed SmolLM2-135M (ffnsplit demo's compressed/ folder, made on
    # the CPU) through the kernels against the fp32 reference on real text. 158 MB cannot travel
    # in one call: benchmarks/smollm2_parts.sh split puts it in out/s24m/{a,b,c}, each carried by
    # its own call while the machine stays warm (30 s); this stage, in the last, joins them
    smol_join || exit 1
    run 400 test_smol24 env FFNSPLIT_SMOLLM2_DIR=$SMOL python3 -m pytest -q -rf -s \
        tests/test_modules.py -k whole_compressed
    grep "SmolLM2" "$OUT/test_smol24.log"
    ;;
smolerr24)  # session 24: smol24's folder (carried the same way), each FFN per kernel path against
    # the fp32 reference on its own real inputs (benchmarks/smollm2_ffn_error.py, ~3 min)
    smol_join || exit 1
    run 400 smolerr24 python3 benchmarks/smollm2_ffn_error.py --dir $SMOL \
        --out "$OUT/smollm2_ffn_error.json"
    grep "^worst" "$OUT/smolerr24.log"
    ;;
pf24)  # session 24 (branch s24-prefetch-down; ran, dropped): kernel A's bulk L2 requests of kernel B's weights (FFNSPLIT_PREFETCH_DOWN
    # 0 / 1 / 2): GPU tests, then the layer at M = 1, 4, 16 per mode, interleaved (~5 min)
    run 200 test_pf24 env FFNSPLIT_PREFETCH_DOWN=2 python3 -m pytest -q -rf -x -n 4 \
        tests/test_mma_decode.py -k "down_weights or ticket or swap_configs"
    for round in 1 2; do
        for mode in 0 1 2; do
            run 120 "pf24_${mode}_$round" env FFNSPLIT_PREFETCH_DOWN=$mode python3 -m ffnsplit.cli \
                bench --shape 4096x14336 --m 1,4,16 --json "$OUT/pf24_${mode}_$round.json"
        done
    done
    ;;
wg23)  # session 23 (ran): the Hopper wgmma int4 GEMM prototype (benchmarks/proto_wgmma.py):
    # correctness on odd shapes (fp16, bf16), then the 8B FFN's light parts at M = 128-2048
    # against the tl tiers and cuBLAS (~3 min)
    run 300 wg23 python3 benchmarks/bench_wgmma.py --out "$OUT/wgmma_s23.json"
    ;;
gen23)  # prepared in session 22 (not run): ffnsplit generate's GPU test (the static decoder's
    # CUDA-graph steps against the model's own greedy generate) and the decode_ops tests (~2 min)
    run 200 test_gen23 python3 -m pytest -q -rf -x -n 4 -m 'not slow' tests/test_generate.py tests/test_decode_ops.py
    ;;
persm22)  # session 22: the StaticDecoder / e2e GPU tests, then split attention's programs an
    # SM (1-4) at long caches, alone and in the 8B step (~4 min)
    run 150 test_bench22 env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -x -n 8 tests/test_bench.py \
        -k "static_decoder or e2e or cuda_graph"
    for len in 4096 8192; do
        for p in 1 3 4; do
            run 60 "persm22_${len}_p$p" env FFNSPLIT_ATTENTION_PROGRAMS_PER_SM=$p python3 \
                benchmarks/bench_attention.py --length $len --position $((len - 40)) --with-proj \
                --forms fused --block-n 32 --warps 0 --out "$OUT/persm22_${len}_p$p.json"
        done
    done
    run 150 oracle_persm22 python3 benchmarks/oracle_decode.py --prompt 3968 --rounds 2 \
        --variants full,attn_n32p1,attn_n32p3,attn_n32p4 --out "$OUT/oracle_persm22.json"
    ;;
next22)  # prepared in session 21 (not run): the decode attention's keys a program at a long
    # cache (the 8B step at a 3,968-token prompt: 4,096 keys) and alone with a GEMV before each
    # layer at 640 and 4,096 keys, then big20's M = 256 tiles (~6 min)
    run 200 oracle_long22 python3 benchmarks/oracle_decode.py --prompt 3968 --steps 32 --rounds 2 \
        --variants full,attn_n16w2,attn_n64w4,attn_n32w8 --out "$OUT/oracle_long22.json"
    for len in 640 4096; do
        run 90 "attn22_$len" python3 benchmarks/bench_attention.py --length $len \
            --position $((len - 40)) --with-proj --forms fused,empty --block-n 16,32,64 \
            --warps 2,4,8 --out "$OUT/attn22_$len.json"
    done
    run 150 sweep256b env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/sweep_small.py --m 256 \
        --up a128x128wa_w8,a128x128wa_w8_s2,a128x64wa_w8,a64x128wa_w8 --up-splits 1,2 \
        --down b128x128wa_w8,b128x128wa_w8_s2,b128x64wa_w8,b64x128wa_w8 --down-splits 1,2,4 \
        --out "$OUT/sweep256b.json"
    ;;
big20)  # prepared in session 19 (not run): larger W-as-A tiles for M = 256 (the layer is at
    # 0.65x dense there), each with forced K-splits (~1 min)
    run 150 sweep256b env FFNSPLIT_AUTOTUNE=0 python3 benchmarks/sweep_small.py --m 256 \
        --up a128x128wa_w8,a128x128wa_w8_s2,a128x64wa_w8,a64x128wa_w8 --up-splits 1,2 \
        --down b128x128wa_w8,b128x128wa_w8_s2,b128x64wa_w8,b64x128wa_w8 --down-splits 1,2,4 \
        --out "$OUT/sweep256b.json"
    ;;
attn20)  # session 20: the decode step's parts, the o projection's L2 requests and the one-launch
    # attention (oracle_decode.py, three interleaved rounds), then the 8B decode in `ffnsplit
    # bench` under the four settings on one machine (~7 min)
    run 300 oracle_attn20 python3 benchmarks/oracle_decode.py --rounds 3 --out "$OUT/oracle_attn20.json" \
        --variants full,no_core,no_o,no_qkv,no_prefetch,o_prefetch,attn_unfused,attn_ticket
    for v in on:1:fused off:0:fused on_unf:1:unfused off_unf:0:unfused; do
        set -- ${v//:/ }
        run 100 "e2e_$1" env FFNSPLIT_DENSE_PREFETCH=$2 FFNSPLIT_DECODE_ATTENTION=$3 python3 -m \
            ffnsplit.cli bench --shape 4096x14336 --m 1 --e2e-shape llama3-8b --json "$OUT/e2e_$1.json"
    done
    ;;
attn21)  # prepared in session 20 (not run): the decode attention chain alone, 32 layers' caches
    # in one graph (benchmarks/bench_attention.py: one launch + combine and ticket at 32-128 keys
    # a block and 1-8 warps, three launches, attention alone, rotary alone, an empty kernel a
    # layer; then with a q/k/v-sized GEMV before
    # each), then every stall reason of the one-launch kernel and its combine (ncu; ~3 min)
    run 120 bench_attention python3 benchmarks/bench_attention.py --block-n 32,64,128 \
        --warps 1,2,4,8 --out "$OUT/attention.json"
    run 120 bench_attention_proj python3 benchmarks/bench_attention.py --with-proj \
        --out "$OUT/attention_proj.json"
    run 240 ncu_attention env FFNSPLIT_AUTOTUNE=0 /usr/local/cuda/bin/ncu --clock-control none \
        -k "regex:_rope_attention_kernel|_combine_all_kernel" --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python3 benchmarks/bench_attention.py --forms fused --layers 2 --reps 1 \
        --out "$OUT/attention_ncu.json"
    ;;
oracle)  # what-if timings of the 8B decode step: without the post-attention norm, the FFN, the
    # attention (benchmarks/oracle_decode.py, ~3 min)
    run 300 oracle python3 benchmarks/oracle_decode.py --out "$OUT/oracle.json"
    ;;
proj)  # the decoder's dense projections at M = 1, 2, 4: cuBLAS against the dense-only GEMV and
    # Gluon paths (benchmarks/bench_proj.py, ~2 min)
    run 240 bench_proj python3 benchmarks/bench_proj.py --out "$OUT/proj.json"
    ;;
graphs)  # the CUDA-graph replay of eager SplitFFN calls (ffnsplit/graphs.py): its GPU tests
    run 200 test_graphs env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf tests/test_graphs.py
    ;;
eager)  # eager calls: one FFN call and HF generate, dense / split / split + CUDA graphs
    run 240 bench_eager python3 benchmarks/bench_eager.py --out "$OUT/eager.json"
    ;;
trace)  # where a decode step of the 8B shape goes, kernel by kernel, dense and split
    run 170 trace_decode python3 benchmarks/trace_decode.py --out "$OUT/trace_decode.json"
    ;;
decode8b)  # the layer at M = 1, 4 and the 8B decode, once
    run 170 bench_decode8b python3 -m ffnsplit.cli bench --shape 4096x14336 --m 1,4 \
        --e2e-shape llama3-8b --json "$OUT/bench_decode8b.json"
    ;;
decodeops)  # the decoder's Triton ops on the GPU (norms, rotary, attention, projections, argmax)
    run 50 test_decodeops env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -x -n 4 \
        tests/test_decode_ops.py
    ;;
atomic)  # GEMV tests, then the layer at M = 1, 4 and the 8B decode with the atomic candidates
    # on / off / on (FFNSPLIT_GEMV_ATOMIC)
    run 240 test_gemv env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 tests/test_kernels.py \
        tests/test_bench.py -k "gemv or cuda_graph or static_decoder or e2e"
    for name in a_on b_off c_on; do
        atomic=1
        [ "$name" = b_off ] && atomic=0
        run 150 "bench_atomic_$name" env FFNSPLIT_GEMV_ATOMIC=$atomic python3 -m ffnsplit.cli \
            bench --shape 4096x14336 --m 1,4 --e2e-shape llama3-8b --json "$OUT/bench_atomic_$name.json"
    done
    ;;
final)  # the decode path's GPU tests (every GEMV config alone, decoders, whole model), then the
    # full bench: layer over M + Llama-3-8B end to end (~8 min; the tests took more than 240 s
    # on a cold Triton cache in session 11, the bench ~120 s)
    run 340 test_final env FFNSPLIT_AUTOTUNE=0 python3 -m pytest -q -rf -n 8 tests/test_kernels.py \
        tests/test_bench.py tests/test_modules.py tests/test_mma_decode.py \
        -k "gemv or mma or cuda_graph or static_decoder or e2e or whole"
    run 230 bench python3 -m ffnsplit.cli bench --shape 4096x14336 --e2e-shape llama3-8b \
        --json "$OUT/bench.json"
    ;;
profile_final)  # SmolLM2 shape at 32k tokens and the 8B shape sequentially (16k tokens)
    run 60 test_profile python3 -m pytest -q -x tests/test_profile.py -k "kernel or partials or cuda"
    run 230 bench_profile python3 benchmarks/bench_profile.py --tokens 32768 --tokens-large 16384 \
        --batch-size 16 --repeats 7 --out "$OUT/bench_profile.json"
    ;;
profile32k)
    run 60 test_profile python3 -m pytest -q -x tests/test_profile.py -k "kernel or partials or cuda"
    run 300 bench_profile32k python3 benchmarks/bench_profile.py --tokens 32768 --batch-size 16 \
        --skip-large --repeats 21 --baseline out/bl_head --out "$OUT/bench_profile32k.json"
    ;;
*)
    echo "unknown stage $stage: tests, decode, bench, pdl, gemv, floor, half2, gluon, decodeops, trace," \
        "decode8b, atomic, final, profprefill, odd, profile_final or profile32k" >&2
    exit 2
    ;;
esac
done
