#!/usr/bin/env bash
# Runs the `--quick` benchmark suite once on a GPU machine without network access.
#
#   bash benchmarks/gpu_quick.sh          # from the repository root; files go to $OUT
#
# Steps (each runs whatever happened to the ones before it):
#   1. installs the wheels carried in .whl/ (folx, beartype) into /tmp/site, and puts
#      /tmp/site, src/ and the repository root on PYTHONPATH (fwdlap comes from src/);
#   2. prints the GPU, Python/JAX versions and jax.devices();
#   3. smoke-checks fwdlap against jnp.trace(jax.hessian(f)) (PASS/FAIL);
#   4. runs `python -m benchmarks.run --quick` into a separate folder and stem
#      (results_gpu_quick.*), so the committed CPU results are left alone, and copies
#      its markdown, JSON and plot into $OUT (flat).
#
# Files in $OUT: gpu_setup.log (steps 1-3), gpu_quick.log (step 4),
# results_gpu_quick.{md,json,png}, gpu_worker_logs.txt (the cells' stderr).
# The whole script stays within GPU_QUICK_TOTAL seconds (default 470) plus about
# 40 s for drawing the plot and copying files.
#
# Environment knobs:
#   GPU_QUICK_DRY=1      skip the pip step, use .venv/bin/python (local dry run)
#   GPU_QUICK_ARGS="..." extra arguments to benchmarks.run (e.g. "--models mlp")
#   GPU_QUICK_TOTAL=470  overall time budget in seconds
#   GPU_QUICK_RESULTS    results folder (default /tmp/gpu_quick_results)
#   GPU_QUICK_STEM       output stem (default results_gpu_quick)
#   BENCHMARKS_NO_CPU_XLA_FLAG  default 1 here: do not add the CPU-only XLA flag

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
START=$SECONDS

DRY=${GPU_QUICK_DRY:-0}
TOTAL=${GPU_QUICK_TOTAL:-470}
STEM=${GPU_QUICK_STEM:-results_gpu_quick}
RES=${GPU_QUICK_RESULTS:-/tmp/gpu_quick_results}
EXTRA_ARGS=${GPU_QUICK_ARGS:-}
OUT=${OUT:-$REPO/gpu_quick_out}
mkdir -p "$OUT" "$RES"
rm -rf "${RES:?}/$STEM".* "${RES:?}/logs"
SETUP_LOG=$OUT/gpu_setup.log
: >"$SETUP_LOG"

if [ "$DRY" = "1" ]; then
  PY=$REPO/.venv/bin/python
else
  PY=python3
fi

# The CPU-only flag of benchmarks/__init__.py is not needed on a GPU, and an XLA
# that does not know it aborts; step 2 turns it back on if JAX falls back to CPU.
export BENCHMARKS_NO_CPU_XLA_FLAG=${BENCHMARKS_NO_CPU_XLA_FLAG:-1}

say() { echo "== [$((SECONDS - START))s] $*"; }

# ---------------------------------------------------------------- 1. wheels
{
  say "step 1: wheels"
  if [ "$DRY" = "1" ]; then
    echo "dry run: pip step skipped, python is $PY"
  elif ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/ (was it carried?)"
  else
    ls -l .whl/
    if ! timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
      echo "pip failed; unpacking the (pure-Python) wheels by hand"
      timeout 60 python3 - <<'EOF'
import glob
import zipfile

for wheel in sorted(glob.glob(".whl/*.whl")):
    zipfile.ZipFile(wheel).extractall("/tmp/site")
    print("unpacked", wheel)
EOF
    fi
  fi
} 2>&1 | tee -a "$SETUP_LOG"
export PYTHONPATH=/tmp/site:$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}

# ---------------------------------------------------------------- 2. machine
{
  say "step 2: machine"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv
  else
    echo "nvidia-smi not found"
  fi
  echo "python: $PY -> $(command -v "$PY")"
  timeout 60 "$PY" - <<'EOF'
import importlib.metadata as md
import platform

print("python", platform.python_version(), platform.platform())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "numpy",
             "jaxtyping", "beartype", "folx", "matplotlib"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
import jax

print("jax.devices():", jax.devices())
print("default backend:", jax.default_backend())
print("device_kind:", jax.devices()[0].device_kind)
with open("/tmp/gpu_quick_backend", "w") as f:
    f.write(jax.default_backend())
EOF
  echo "exit code $?"
  # Does this XLA accept the CPU-only flag? (informational; the bench leaves it out)
  FLAG=--xla_cpu_enable_concurrency_optimized_scheduler=false
  if XLA_FLAGS="${XLA_FLAGS:-} $FLAG" timeout 60 "$PY" -c \
    "import jax; jax.numpy.ones(2).block_until_ready(); print(jax.devices())" \
    >/tmp/gpu_quick_flag.txt 2>&1; then
    echo "XLA accepts $FLAG"
    FLAG_OK=1
  else
    echo "XLA rejects $FLAG (or JAX failed):"
    tail -n 5 /tmp/gpu_quick_flag.txt
    FLAG_OK=0
  fi
  BACKEND=$(cat /tmp/gpu_quick_backend 2>/dev/null || echo unknown)
  if [ "$BACKEND" != "gpu" ] && [ "$FLAG_OK" = "1" ]; then
    echo "WARNING: JAX backend is '$BACKEND', not gpu: keeping the CPU-only flag"
    echo "export BENCHMARKS_NO_CPU_XLA_FLAG=0" >/tmp/gpu_quick_env
  else
    : >/tmp/gpu_quick_env
  fi
} 2>&1 | tee -a "$SETUP_LOG"
# shellcheck disable=SC1091
. /tmp/gpu_quick_env 2>/dev/null || true

# ---------------------------------------------------------------- 3. smoke check
{
  say "step 3: smoke check"
  timeout 60 "$PY" - <<'EOF'
import time

start = time.perf_counter()
import jax
import jax.numpy as jnp

import fwdlap

print("fwdlap from", fwdlap.__file__)
w = jax.random.normal(jax.random.PRNGKey(0), (4, 4)) / 2


def f(x):
    h = jnp.tanh(x.reshape(3, 4) @ w)
    m = h.T @ h + jnp.eye(4)
    return jnp.sum(h**2) + jnp.sin(x).prod() + jnp.linalg.slogdet(m)[1]


xs = jax.random.normal(jax.random.PRNGKey(2), (4, 12))
ok = True
with jax.default_matmul_precision("highest"):
    ref = jax.vmap(lambda x: jnp.trace(jax.hessian(f)(x)))(xs)
    checks = {
        "laplacian": jax.jit(jax.vmap(fwdlap.laplacian(f)))(xs),
        "laplacian(chunk_size=5)": jax.jit(
            jax.vmap(fwdlap.laplacian(f, chunk_size=5))
        )(xs),
    }

    def lap_direct(x):
        eye = jnp.eye(x.size, dtype=x.dtype)
        zero = fwdlap.zero_tangent_from_primal(x)
        return fwdlap.lap(f, (x,), (eye,), (zero,))[2]

    checks["lap"] = jax.jit(jax.vmap(lap_direct))(xs)
for name, got in checks.items():
    err = float(jnp.max(jnp.abs(got - ref) / (jnp.abs(ref) + 1e-3)))
    good = err < 1e-3
    ok &= good
    print(f"  {name}: max rel err {err:.2e} {'ok' if good else 'BAD'}")
print("device:", ref.devices())
print(f"SMOKE {'PASS' if ok else 'FAIL'} ({time.perf_counter() - start:.1f}s)")
EOF
  rc=$?
  [ $rc -ne 0 ] && echo "SMOKE FAIL (exit code $rc)"
} 2>&1 | tee -a "$SETUP_LOG"

# ---------------------------------------------------------------- 4. benchmarks
LEFT=$((TOTAL - (SECONDS - START)))
BENCH_TIMEOUT=$((LEFT < 420 ? LEFT : 420))
[ "$BENCH_TIMEOUT" -lt 60 ] && BENCH_TIMEOUT=60
say "step 4: benchmarks.run --quick (timeout ${BENCH_TIMEOUT}s), into $RES/$STEM.*" |
  tee "$OUT/gpu_quick.log"
# shellcheck disable=SC2086
timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m benchmarks.run --quick --out-dir "$RES" \
  --stem "$STEM" $EXTRA_ARGS 2>&1 | tee -a "$OUT/gpu_quick.log"
rc=${PIPESTATUS[0]}
say "benchmarks.run exit code $rc (124 = timed out)" | tee -a "$OUT/gpu_quick.log"

if [ -f "$RES/$STEM.json" ] && [ ! -f "$RES/$STEM.png" ]; then
  # A run cut short leaves the JSON and markdown of the cells it finished.
  say "drawing the report from the partial JSON" | tee -a "$OUT/gpu_quick.log"
  timeout 30 "$PY" -m benchmarks.run --report-only --out-dir "$RES" \
    --stem "$STEM" >>"$OUT/gpu_quick.log" 2>&1 ||
    echo "report-only failed" | tee -a "$OUT/gpu_quick.log"
fi

for ext in md json png; do
  cp "$RES/$STEM.$ext" "$OUT/" 2>/dev/null || echo "missing $RES/$STEM.$ext"
done
if ls "$RES"/logs/*.log >/dev/null 2>&1; then
  for log in "$RES"/logs/*.log; do
    echo "===== $(basename "$log") ($(wc -c <"$log") bytes, last 100 kB)"
    tail -c 100000 "$log"
  done | head -c 4000000 >"$OUT/gpu_worker_logs.txt"
fi

say "done; files in $OUT:"
ls -l "$OUT"
if [ -f "$RES/$STEM.md" ]; then
  echo
  cat "$RES/$STEM.md"
fi
grep -h "SMOKE" "$SETUP_LOG" || true
exit 0
