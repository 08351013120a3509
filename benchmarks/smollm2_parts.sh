#!/usr/bin/env bash
# Split a compressed SmolLM2-135M folder (ffnsplit demo's compressed/, ~158 MB) into three parts
# under out/s24m/{a,b,c} (git-ignored), each small enough to travel with one device call beside the
# working tree (64 MiB a call); gpu_checks.sh smol24 joins them on the GPU machine and checks the
# model file's sha256. Usage: bash benchmarks/smollm2_parts.sh ffnsplit-demo/compressed
set -euo pipefail
src=${1:?usage: smollm2_parts.sh COMPRESSED_FOLDER}
[ -f "$src/model.safetensors" ] || { echo "no model.safetensors in $src: run ffnsplit demo first" >&2; exit 1; }
rm -rf out/s24m && mkdir -p out/s24m/a out/s24m/b out/s24m/c
cp "$src"/*.json out/s24m/a/
cp "$src"/*.jinja out/s24m/a/ 2> /dev/null || true
(cd "$src" && sha256sum model.safetensors) > out/s24m/a/model.sha256
size=$(stat -c %s "$src/model.safetensors")
part=$(( (size + 2) / 3 ))
split -b "$part" -d -a 1 "$src/model.safetensors" out/s24m/part.
mv out/s24m/part.0 out/s24m/a/model.part
mv out/s24m/part.1 out/s24m/b/model.part
mv out/s24m/part.2 out/s24m/c/model.part
du -sh out/s24m/a out/s24m/b out/s24m/c
