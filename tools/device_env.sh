# Sourced by the device-machine scripts (gpu_run.sh, ab.sh, ab_head.sh), from the repository root.
# Wheels missing there (platformdirs) travel in .whl/ (see README "Development") and are installed
# into /tmp/site; PYTHONPATH becomes this tree, then /tmp/site.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 LINGHE_CACHE_DIR=/tmp/linghe-cache
