#!/usr/bin/env bash
# Release artefacts, as a packager makes them: `maturin build --release` must give one
# manylinux abi3 wheel whose extension links no libpython; it must install and work on the
# oldest and newest CPython on this machine; the sdist must build with pip and work too.
# Called by .ci/run (maturin on PATH); PYTHON is the main interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PYTHON:-python3}
PYEXE=$("$PY" -c 'import sys; print(sys.executable)')
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "wheel_check: $*" >&2; exit 1; }
t0=$SECONDS

# 1. The wheel, with maturin's manylinux audit on. README's test command (next in .ci/run)
# has pip build the same release extension with `maturin pep517 build-wheel -i <the
# interpreter pip runs on>`; cargo reuses this build there only if that path (PYO3_PYTHON)
# is the same, so take it from pip's shebang (`python3.11`, not `python3`, under pyenv).
build_py=$PYEXE
if pip_exe=$(command -v pip 2>/dev/null) && read -r first <"$pip_exe"; then
    case "$first" in
        '#!/'*python*) shebang=${first#'#!'}; shebang=${shebang%% *} ;;
        *) shebang= ;;
    esac
    case "${shebang##*/}" in python*) [ -x "$shebang" ] && build_py=$shebang ;; esac
fi
maturin build --release -i "$build_py" --out "$work/dist"
shopt -s nullglob
wheels=("$work"/dist/*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one wheel, got: ${wheels[*]}"
whl=${wheels[0]}
name=$(basename "$whl")
case "$name" in
    smallgpt-*-cp39-abi3-manylinux_*_"$(uname -m)".whl) echo "wheel: $name" ;;
    *) fail "not a cp39-abi3 manylinux wheel: $name" ;;
esac
echo "[wheel_check +$((SECONDS - t0)) s]"
# README's first step of the GPU check: the wheel in wheelhouse/ (git-ignored), which
# `benches/gpu_check.sh --dry-run` (later in .ci/run) installs offline.
mkdir -p wheelhouse
rm -f wheelhouse/smallgpt-*.whl
cp "$whl" wheelhouse/

# 2. The extension must leave the Python C API to the interpreter that loads it.
"$PY" - "$whl" "$work/so" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    sos = [n for n in z.namelist() if n.endswith(".so")]
    assert sos == ["smallgpt/_bpe.abi3.so"], sos
    # Data files the package reads at run time: the quickstart text, presets, the playground.
    for name in ("smallgpt/assets/tinyshakespeare.txt", "smallgpt/presets/shakespeare-cpu.toml",
                 "smallgpt/serve/static/index.html"):
        assert name in z.namelist(), f"{name} is missing from the wheel"
    z.extract(sos[0], sys.argv[2])
EOF
so=$work/so/smallgpt/_bpe.abi3.so
needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
echo "NEEDED: $(echo $needed)"
if grep -qi 'libpython' <<<"$needed"; then fail "the extension links libpython"; fi
deps=$(ldd "$so")
echo "$deps"
if grep -qiE 'libpython|not found' <<<"$deps"; then fail "ldd: libpython or a missing library"; fi

# 3. Interpreters: the main one, pyenv's and python3.N on PATH; CPython >= 3.9 with the GIL
# (abi3 does not serve free-threaded builds). The oldest and the newest are tested.
candidates=("$PYEXE")
for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/*/bin/python3; do candidates+=("$p"); done
for n in $(seq 9 20); do
    p=$(command -v "python3.$n" 2>/dev/null) && candidates+=("$p")
done
probe='import sys, sysconfig
if sys.implementation.name == "cpython" and sys.version_info >= (3, 9) \
        and not sysconfig.get_config_var("Py_GIL_DISABLED"):
    print("%d %d %d" % sys.version_info[:3], sys.executable)'
mapfile -t found < <(
    for p in "${candidates[@]}"; do "$p" -c "$probe" 2>/dev/null || true; done |
        sort -n -k1,1 -k2,2 -k3,3 | sort -u -k4,4 | sort -n -k1,1 -k2,2 -k3,3
)
[ ${#found[@]} -ge 1 ] || fail "no CPython >= 3.9 found"
echo "interpreters found: $(printf '%s; ' "${found[@]}")"
pick=("${found[0]}")
[ ${#found[@]} -gt 1 ] && pick+=("${found[-1]}")

# A fresh venv with its own pip; where ensurepip is missing (Debian's python3 without
# python3-venv), a bare venv driven by the main interpreter's pip (`pip --python`).
new_venv() {  # exe dir
    if "$1" -m venv "$2" >/dev/null 2>&1; then
        vpip=("$2/bin/python" -m pip)
    else
        rm -rf "$2"
        "$1" -m venv --without-pip "$2"
        vpip=("$PYEXE" -m pip --python "$2/bin/python")
    fi
}
# Only what the smoke test imports: smallgpt without its dependencies (no torch, no numpy)
# and regex, the pure-Python reference's one import. Run outside the source tree.
install_and_smoke() {  # venv-dir wheel-or-sdist
    "${vpip[@]}" install -q "regex>=2022.1.18"
    "${vpip[@]}" install -q --no-deps "$2"
    (cd "$work" && "$1/bin/python" "$root/.ci/smoke_tokenizer.py")
    echo "[wheel_check +$((SECONDS - t0)) s]"
}

for line in "${pick[@]}"; do
    read -r major minor micro exe <<<"$line"
    v=$work/venv-$major.$minor
    new_venv "$exe" "$v"
    install_and_smoke "$v" "$whl"
done

# 4. The sdist: pip builds it from scratch (fresh cargo target), on the main interpreter.
maturin sdist --out "$work/sdist"
sdists=("$work"/sdist/*.tar.gz)
[ ${#sdists[@]} -eq 1 ] || fail "expected one sdist, got: ${sdists[*]}"
echo "sdist: $(basename "${sdists[0]}")"
new_venv "$PYEXE" "$work/venv-sdist"
install_and_smoke "$work/venv-sdist" "${sdists[0]}"

echo "wheel_check: ok in $((SECONDS - t0)) s"
