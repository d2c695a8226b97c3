#!/usr/bin/env bash
# Builds the sdist and the wheel (CUDA kernels compiled in for FUSED_ADAMW_CUDA_ARCHS, default:
# the full default list of setup.py), repairs the wheel to a manylinux tag and checks both.
# Used by .ci/run here and by .github/workflows/wheels.yml (cibuildwheel's before-build and
# repair steps run the same commands).
#   .ci/build_wheel.sh OUTDIR
set -euo pipefail
out=${1:?usage: build_wheel.sh OUTDIR}
mkdir -p "$out/raw" "$out/wheelhouse"

python -m build --sdist --wheel --outdir "$out/raw" .
sdist=$(ls "$out"/raw/*.tar.gz)
wheel=$(ls "$out"/raw/*.whl)

# The sdist must hold everything a source build needs.
listing=$(tar -tzf "$sdist")
for need in setup.py pyproject.toml README.md kernels/adamw_math.cuh kernels/adamw_params.h \
            kernels/adamw_kernel.cu csrc/bindings.cpp csrc/cpu_adamw.cpp \
            python/fused_adamw/__init__.py python/fused_adamw/_version.py; do
  grep -q "/$need\$" <<<"$listing" || { echo "sdist lacks $need" >&2; exit 1; }
done

auditwheel show "$wheel"
auditwheel repair --strip --wheel-dir "$out/wheelhouse" "$wheel"  # --strip: no debug symbols
repaired=$(ls "$out"/wheelhouse/*.whl)

# Contents and size, and nothing stray: no tests, caches or object files.
python - "$repaired" <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as z:
    infos = z.infolist()
    for i in infos:
        print(f"{i.file_size:>12,d}  {i.filename}")
    names = [i.filename for i in infos]
stray = [n for n in names if n.endswith((".o", ".pyc", ".cu", ".cpp")) or "__pycache__" in n
         or n.startswith("tests/") or "/tests/" in n]
if stray:
    sys.exit(f"stray files in the wheel: {stray}")
if not any("/_C." in n or n.startswith("fused_adamw/_C") for n in names):
    sys.exit("the wheel has no compiled fused_adamw._C")
import os
print(f"{os.path.basename(path)}: {os.path.getsize(path) / 2**20:.2f} MiB, {len(names)} files")
PY
