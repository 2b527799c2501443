#!/usr/bin/env bash
# Prepare a bare GPU machine for megatron-rlhf's GPU tests and benchmarks, and say what it has.
#
#   tools/prepare_gpu.sh --download [DIR]              # on a machine WITH internet: wheels -> DIR (default .whl)
#   tools/prepare_gpu.sh [--wheels DIR] [--target SITE] # on the GPU machine (no internet needed)
#   tools/prepare_gpu.sh --check [--allow-cpu]          # only report; exit 1 if the BF16 path cannot run
#
# Install: every DIR/*.whl goes into SITE (default /tmp/megatron-rlhf-site) with
# `pip install --no-index --no-deps --target SITE`; then use it with
#   export PYTHONPATH=SITE:<this checkout>
# (bench/gpu_acceptance.sh does both). Then it checks: a CUDA device, torch with CUDA,
# megatron-core 0.16.x, the packages the project imports (pyyaml, sentencepiece, psutil, tqdm,
# tensorboard, matplotlib, transformers, safetensors, pytest), and reports Transformer Engine:
# with it the GPU path uses TE layers and FP8; without it the BF16 path alone runs (Megatron's
# local layers with our SDPA attention, torch's Adam) and TE/FP8 tests skip with the reason.
#
# Download: megatron-core 0.16.1 as a binary wheel for CPython $PYVER (default 3.12) on
# manylinux x86_64, which is what a CUDA image with torch usually lacks. Its own needs
# (torch, numpy, packaging) come with such images. Transformer Engine is NOT fetched: its
# PyTorch extension (transformer_engine_torch) is published as source only and must be
# compiled against the machine's torch and CUDA (`pip install --no-build-isolation
# 'transformer_engine[pytorch]'` on the GPU machine, with internet, 20+ minutes), and its core
# wheel (transformer_engine_cu12/cu13) is 180-730 MB. --download --te adds the core and meta
# wheels (for a machine that can build the extension offline from a source tarball you add).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
MCORE=${MCORE_VERSION:-0.16.1}
TE_VERSION=${TE_VERSION:-2.11.0}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

mode=install wheels=.whl site=/tmp/megatron-rlhf-site allow_cpu=0 te=0
while [ $# -gt 0 ]; do
  case $1 in
    --download) mode=download; if [ $# -gt 1 ] && [ "${2#-}" = "$2" ]; then wheels=$2; shift; fi ;;
    --wheels) wheels=$2; shift ;;
    --target) site=$2; shift ;;
    --check) mode=check ;;
    --allow-cpu) allow_cpu=1 ;;
    --te) te=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "prepare_gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = download ]; then
  mkdir -p "$wheels"
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
  done
  names="megatron-core==$MCORE"
  [ "$te" = 1 ] && names="$names transformer_engine==$TE_VERSION transformer_engine_cu13==$TE_VERSION"
  for name in $names; do
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $platforms \
        -d "$wheels" "$name" || { echo "prepare_gpu.sh: no binary wheel of $name for CPython $PYVER" >&2; exit 1; }
  done
  echo "wheels in $wheels:"; ls -la "$wheels"
  du -sh "$wheels"
  echo "keep them out of git (e.g. echo /$(basename "$wheels")/ >> .git/info/exclude); on the GPU machine: tools/prepare_gpu.sh --wheels $wheels"
  exit 0
fi

if [ "$mode" = install ]; then
  shopt -s nullglob
  files=("$wheels"/*.whl)
  if [ ${#files[@]} -gt 0 ]; then
    echo "installing ${#files[@]} wheel(s) from $wheels into $site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${files[@]}" || {
      echo "prepare_gpu.sh: pip could not install the wheels in $wheels (wrong Python version or platform?)" >&2; exit 1; }
    export PYTHONPATH="$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in $wheels: using what is installed"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  for f in "$wheels"/*.tar.gz; do echo "note: $f is a source archive; not built here (see --help)"; done
fi

ALLOW_CPU=$allow_cpu PYTHONWARNINGS=ignore "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, platform, sys

problems, notes = [], []
print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch
except ImportError:
    sys.exit("torch is not installed: use the machine's CUDA image or install a CUDA build of torch")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if cuda else '-'}")
if cuda:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
elif os.environ.get("ALLOW_CPU") == "1":
    notes.append("no CUDA device (allowed: dry run)")
else:
    problems.append("no CUDA device visible to torch (torch.cuda.is_available() is False)")
try:
    mcore = md.version("megatron-core")
    import megatron.core  # noqa: F401
    print(f"megatron-core {mcore}")
    if not mcore.startswith("0.16."):
        notes.append(f"megatron-core {mcore}: the project is tested on 0.16.1")
except Exception as exc:  # not installed, or broken against this torch
    problems.append(f"megatron-core is not importable ({exc}): tools/prepare_gpu.sh --download here, --wheels there")
for module, dist in (("yaml", "pyyaml"), ("sentencepiece", "sentencepiece"), ("psutil", "psutil"), ("tqdm", "tqdm"),
                     ("tensorboard", "tensorboard"), ("matplotlib", "matplotlib"), ("transformers", "transformers"),
                     ("safetensors", "safetensors"), ("pytest", "pytest")):
    try:
        importlib.import_module(module)
    except Exception as exc:
        problems.append(f"{dist} is missing ({exc}): add its wheel to the wheel folder")
try:
    import transformer_engine.pytorch  # noqa: F401
    te = md.version("transformer_engine") if any(d.metadata["Name"] == "transformer_engine" for d in md.distributions()) else "?"
    print(f"Transformer Engine {te}: TE layers and FP8 available")
except Exception as exc:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(f"Transformer Engine: not available ({first}): BF16 path only (local layers + SDPA); TE/FP8 tests skip")
for name in ("apex", "flash_attn"):
    try:
        importlib.import_module(name)
        print(f"{name}: installed")
    except Exception:
        if name == "flash_attn":
            print("flash_attn: not installed: ppo.rollout_engine=dynamic needs flash-attn >= 2.7.3 (and einops); its GPU tests skip")
import megatron_rlhf  # noqa: E402  (the checkout on PYTHONPATH)
print(f"megatron_rlhf from {os.path.dirname(megatron_rlhf.__file__)}")
for n in notes:
    print("note:", n)
for p in problems:
    print("MISSING:", p)
print("ready: " + ("no" if problems else "yes"))
sys.exit(1 if problems else 0)
EOF
status=$?
[ "$mode" = install ] && echo "export PYTHONPATH=$PYTHONPATH"
exit $status
