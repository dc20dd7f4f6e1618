#!/usr/bin/env bash
# The GPU check, one command: `scripts/gpu_check.sh` (GPU mode) or `scripts/gpu_check.sh cpu`.
#
# GPU mode, from a bare machine that has only the repository and a CUDA build of torch and
# torchvision (budget: under 10 minutes on one H200):
#   1. installs the project's pure-Python dependencies from ./.whl when they are missing
#      (fastapi, starlette, pydantic + pydantic-core + pydantic-settings, python-dotenv,
#      annotated-types, typing-inspection, typing-extensions, annotated-doc,
#      opentelemetry-api, redis, rq, croniter, python-dateutil, click, anyio, h11, idna,
#      orjson, uvicorn, python-multipart; README "GPU check" shows how to download them);
#   2. runs benchmarks/paper_scale.py at paper scale: 224 px synthetic RGB multi-label scenes
#      (20,000 database, 1,000 queries), a 64-bit ResNet-50 HashNet hasher, the UntargetedGAN
#      generator at the paper's shapes, then generator vs PGD-20 / DHTA-20 at 8/255 and 16/255
#      in fp32 and bf16: one table, and JSON under $OUT (default benchmarks/results/gpu_check;
#      the scenes and bundles go to $WORK, default /tmp/hashaudit-gpu-check);
#   3. runs `pytest -m gpu` over tests/.
# Stages (STAGES="hag service paper pytest" by default; name a subset to run only those):
#   hag      scripts/hag_device_check.py: the HAG attack on CPU and CUDA, batch sizes, TF32;
#   service  benchmarks/service.py on CUDA with 1, 4 and 16 server processes (Redis needed:
#            from PATH, or unpacked from ./.gpu_debs);
#   attacks  benchmarks/attacks.py on CUDA (worst_case, the frontier), batch 1,000;
#   harden   benchmarks/harden.py on CUDA (only when named: its bar is a CPU run);
#   paper    step 2 above; pytest  step 3.
# The scenes' Fashion-MNIST items come from the IDX files when installed, else from the
# shipped default bundle (its 20,000 train and 1,000 test images), so nothing else is needed.
# CPU mode runs the same benchmark at 64 px with small counts (what the test suite runs).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-gpu}"
DEST="${OUT:-benchmarks/results/gpu_check}"   # reports (small)
WORK="${WORK:-/tmp/hashaudit-gpu-check}"       # scenes and bundles (gigabytes at 224 px)
mkdir -p "$DEST" "$WORK"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"

if ! "$PY" -c "import fastapi, pydantic_settings, rq, redis, multipart" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/hashaudit-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/hashaudit-site:${PYTHONPATH:-}"
  else
    echo "missing Python packages and no ./.whl folder to install them from" >&2
    exit 1
  fi
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
"$PY" - <<'EOF'
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
EOF

status=0
if [ "$MODE" = "cpu" ]; then
  "$PY" benchmarks/paper_scale.py --device cpu --size 64 --database 300 --train 200 \
    --query 40 --arch small_cnn --arch-kwargs '{"width": 8}' --bits 16 --epochs 2 \
    --batch-size 50 --gen-epochs 1 --gen-batch-size 50 --gen-width 8 --proto-steps 60 \
    --steps 3 --workers 2 \
    --attack-batch 40 --eps 8/255 --precision fp32 bf16 --out "$WORK/cpu" \
    --json "$DEST/paper_scale_cpu.json" || status=1
  exit $status
fi

# GPU mode: the stages named in $STAGES, in this order (default: all of them)
STAGES="${STAGES:-hag service attacks paper pytest}"
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
t0=$(date +%s)

if has hag && [ -f scripts/hag_device_check.py ]; then
  t1=$(date +%s)
  timeout "${HAG_TIMEOUT:-300}" "$PY" scripts/hag_device_check.py "$DEST/hag_device.json" 2>&1 \
    | tee "$DEST/hag_device.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "hag device check: $(( $(date +%s) - t1 )) s"
fi

if has service; then
  # benchmarks/service.py on CUDA at 1, 4 and 16 server processes (several processes need
  # Redis: a local redis-server from PATH, or one unpacked from ./.gpu_debs, see README)
  t1=$(date +%s)
  export HASHAUDIT_REDIS_URL="${HASHAUDIT_REDIS_URL:-redis://127.0.0.1:6379/0}"
  if ! "$PY" -c "import redis,sys; redis.Redis.from_url(sys.argv[1]).ping()" \
      "$HASHAUDIT_REDIS_URL" 2>/dev/null; then
    REDIS_BIN="$(command -v redis-server || true)"
    if [ -z "$REDIS_BIN" ] && ls .gpu_debs/*.deb >/dev/null 2>&1; then
      for f in .gpu_debs/*.deb; do dpkg -x "$f" "$WORK/redis-root"; done
      ln -sf redis-check-rdb "$WORK/redis-root/usr/bin/redis-server"
      REDIS_BIN="$WORK/redis-root/usr/bin/redis-server"
      export LD_LIBRARY_PATH="$WORK/redis-root/usr/lib/x86_64-linux-gnu:$WORK/redis-root/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    if [ -n "$REDIS_BIN" ]; then
      "$REDIS_BIN" --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        > "$DEST/redis.txt" 2>&1 || echo "redis-server did not start" >&2
      sleep 1
    fi
    unset LD_LIBRARY_PATH
  fi
  timeout 200 "$PY" benchmarks/service.py --device cuda --workers 1 --clients 1 32 64 \
    --methods untargeted_gan pgd --max-batch 64 --seconds "${SERVICE_SECONDS:-5}" --warmup 1 \
    --port 8790 --out "$DEST/service_w1.json" 2>&1 | tail -n 12 | tee "$DEST/service_w1.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  for w in 4 16; do
    timeout 150 "$PY" benchmarks/service.py --device cuda --workers "$w" --clients 64 256 \
      --methods untargeted_gan --max-batch 64 --seconds "${SERVICE_SECONDS:-5}" --warmup 1 \
      --no-in-process --port $((8790 + w)) --out "$DEST/service_w$w.json" 2>&1 \
      | tail -n 8 | tee "$DEST/service_w$w.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  echo "service benchmark: $(( $(date +%s) - t1 )) s"
fi

if has attacks; then
  # the attack benchmark on CUDA: every untargeted method (worst_case included) at 8/255 and
  # 16/255 on all queries, batch 1,000, and the strength-vs-time frontier
  t1=$(date +%s)
  timeout "${ATTACKS_TIMEOUT:-600}" "$PY" benchmarks/attacks.py --device cuda --batch-size 1000 \
    --eps 8/255 16/255 --out "$DEST/attacks_cuda.json" 2>&1 | tail -n 40 | tee "$DEST/attacks_cuda.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  cp benchmarks/results/attacks_cuda*.png "$DEST/" 2>/dev/null
  echo "attack benchmark: $(( $(date +%s) - t1 )) s"
fi

if has harden; then
  # the harden benchmark on CUDA (not in the default stages: its bar is a CPU run)
  t1=$(date +%s)
  timeout "${HARDEN_TIMEOUT:-600}" "$PY" benchmarks/harden.py --device cuda --name harden_cuda \
    --artifacts "$WORK/harden" 2>&1 | tail -n 60 | tee "$DEST/harden_cuda.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  cp benchmarks/results/harden_cuda* "$DEST/" 2>/dev/null
  echo "harden benchmark: $(( $(date +%s) - t1 )) s"
fi

if has paper; then
  t1=$(date +%s)
  "$PY" benchmarks/paper_scale.py --device cuda --size 224 --database 20000 --train 10000 \
    --query 1000 --arch resnet50 --bits 64 --loss hashnet --epochs "${EPOCHS:-10}" \
    --batch-size 128 --lr 1e-3 --gen-epochs "${GEN_EPOCHS:-2}" --gen-batch-size 64 \
    --gen-width 64 --steps 20 --attack-batch 250 --eps 8/255 16/255 --precision fp32 bf16 \
    --train-precision bf16 --workers 16 --out "$WORK/gpu" --json "$DEST/paper_scale.json" \
    2>&1 | tee "$DEST/paper_scale.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "paper scale: $(( $(date +%s) - t1 )) s"
fi

if has pytest; then
  t1=$(date +%s)
  timeout "${PYTEST_TIMEOUT:-600}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 \
    | tee "$DEST/pytest_gpu.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "pytest -m gpu: $(( $(date +%s) - t1 )) s"
fi
echo "gpu check: $(( $(date +%s) - t0 )) s, status $status"
exit $status
