#!/usr/bin/env bash
# The package as a user gets it. Usage: .ci/installed.sh DIR (after `make install`).
#   1. builds the sdist and, from it, the wheel into DIR/dist, and checks that both carry every
#      built-in config and spec;
#   2. installs the wheel (not editable) into a fresh venv DIR/venv with constraints.txt and
#      torch==2.13.0 (the CPU build); tests/test_readme.py then runs the README quick start
#      with it from a folder outside the repository (MEDANOMALY_INSTALLED_BIN=DIR/venv/bin);
#   3. on every other supported Python found here (pyenv or PATH), an import-and-CLI smoke
#      test of the wheel (without its dependencies: torch exists here as a CPU build for
#      Python 3.11 only, and PyPI's is a CUDA build of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: .ci/installed.sh DIR}
mkdir -p "$out"
start=$SECONDS

rm -rf "$out/dist"
.venv/bin/python -m build --no-isolation --outdir "$out/dist" . >"$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
wheel=$(ls "$out"/dist/medanomaly-*.whl)
sdist=$(ls "$out"/dist/medanomaly-*.tar.gz)
.venv/bin/python .ci/check_dist.py "$wheel" "$sdist"
echo "built the sdist and the wheel in $((SECONDS - start)) s"

start=$SECONDS
rm -rf "$out/venv"
python3 -m venv "$out/venv"
# --no-compile: pip byte-compiles torch's thousands of modules otherwise (a minute or two here)
install=("$out/venv/bin/pip" install -q --disable-pip-version-check --no-compile)
{ "${install[@]}" torch==2.13.0 && "${install[@]}" -c constraints.txt "$wheel[export]"; } >"$out/pip.log" 2>&1 \
  || { tail -30 "$out/pip.log"; exit 1; }
where=$(cd /tmp && "$out/venv/bin/python" -c "import medanomaly; print(medanomaly.__file__)")
case "$where" in
  "$out"/venv/*) ;;
  *) echo "the fresh venv imports medanomaly from $where, not from its own site-packages"; exit 1 ;;
esac
# what lives only in the package data: the built-in configs, found by name from anywhere
(cd /tmp && "$out/venv/bin/medanomaly" models cae | grep -q quickstart_phantoms_3d) \
  || { echo "the installed 'medanomaly models cae' names no built-in config"; exit 1; }
echo "installed the wheel into a fresh venv in $((SECONDS - start)) s"

start=$SECONDS
tested=()
n_configs=$(ls src/medanomaly/configs/*.yaml | wc -l)
for version in 3.10 3.12 3.13; do
  python=$(ls -d /root/.pyenv/versions/"$version".*/bin/python3 2>/dev/null | tail -1 || true)
  python=${python:-$(command -v "python$version" || true)}
  if [ -z "$python" ]; then
    echo "Python $version: not found here, not smoke-tested"
    continue
  fi
  echo "Python $version ($python): import + CLI smoke test"
  venv="$out/py$version"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/pip" install -q --disable-pip-version-check --no-compile)
  "${pip[@]}" --no-deps "$wheel" >>"$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 1; }
  # the command line imports numpy; constraints.txt pins releases that need Python >= 3.11
  # (pip's complaint about the other dependencies, absent on purpose, goes to the log)
  "${pip[@]}" -c constraints.txt numpy pyyaml >>"$out/pip.log" 2>&1 \
    || "${pip[@]}" numpy pyyaml >>"$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 1; }
  (
    cd /tmp
    package=$("$venv/bin/python" -c 'import medanomaly, os; print(os.path.dirname(medanomaly.__file__))')
    "$venv/bin/python" -m compileall -q "$package" >/dev/null
    "$venv/bin/python" -c "import medanomaly.cli, medanomaly.builtin"
    "$venv/bin/medanomaly" --help >/dev/null
    "$venv/bin/python" -m medanomaly --version
    test "$("$venv/bin/medanomaly" config list | wc -l)" -eq "$n_configs"
  )
  tested+=("$("$python" -c 'import platform; print(platform.python_version())')")
done
echo "smoke-tested import + CLI on Python ${tested[*]:-(none)} in $((SECONDS - start)) s"
