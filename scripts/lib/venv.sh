# Sourced by scripts/test from the repository's root: makes sure the virtual environment
# (K8S_SQL_VENV, default ./.venv) exists and holds k8s-sql, editable, with its test
# extras at exactly the versions pinned in constraints.txt, then puts it first on PATH,
# so that python3, pytest, ruff, mypy, cog, k8s-sql, bench/run and conformance/storage/run.sh
# all run from it. Nothing is installed into the system's Python.
#
# pip runs only when constraints.txt or pyproject.toml changed since the last install
# (a stamp in the environment records their hash), so the fast loop pays nothing for it.
# pip's downloads stay cached in its usual place (~/.cache/pip).

venv="${K8S_SQL_VENV:-$PWD/.venv}"
pip_quiet=(--quiet --disable-pip-version-check)

# A venv whose interpreter is gone (the Python it was made from was removed or upgraded)
# is made again.
if ! "$venv/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "== creating the virtual environment $venv" >&2
  python3 -c 'import sys; assert sys.version_info >= (3, 11), "k8s-sql needs Python >= 3.11"'
  python3 -m venv --clear "$venv"
fi

stamp="$venv/.k8s-sql-installed"
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1) $PWD"
# The editable install must point at this checkout (README's quick start installs
# k8s-sql alone, editable, into the same environment).
editable=$(ls "$venv"/lib/python3*/site-packages/__editable__*k8s_sql*.pth 2>/dev/null || true)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ -z "$editable" ] || ! grep -qsF "$PWD/src" $editable; then
  echo "== installing k8s-sql and its test tools into $venv (versions from constraints.txt)" >&2
  # setuptools first, pinned, so that k8s-sql builds with it (--no-build-isolation)
  # rather than with whatever setuptools an isolated build would fetch.
  "$venv/bin/python" -m pip install "${pip_quiet[@]}" -c constraints.txt setuptools
  "$venv/bin/python" -m pip install "${pip_quiet[@]}" --no-build-isolation -c constraints.txt -e '.[test,envoy]'
  echo "$want" >"$stamp"
fi

export VIRTUAL_ENV="$venv"
export PATH="$venv/bin:$PATH"
hash -r
