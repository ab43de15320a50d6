# Sourced by ./run: creates (once) or reuses the virtualenv keyed by the dependency pins, and activates it.
# The venv lives outside the clone, in $BTARD_VENV_ROOT (default ~/.cache/lightning-btard), so fresh clones
# and CI reuse it; a change of the locks (requirements/lock.txt, dev.txt) or of the Python version makes a new one.
py="${BTARD_PYTHON:-$(command -v python3.11 || command -v python3)}"
root="${BTARD_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-btard}"
key="$( { cat requirements/lock.txt requirements/dev.txt; "$py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)"
venv="$root/venv-$key"
mkdir -p "$root"
(
  flock 9
  if [ ! -f "$venv/.complete" ]; then
    echo "[setup] creating virtualenv $venv (torch and friends: a few minutes, once)" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
    "$venv/bin/pip" install -q -r requirements/lock.txt -r requirements/dev.txt >&2
    touch "$venv/.complete"
  fi
) 9>"$root/.lock"
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
# The project itself: editable, pointing at this checkout (cheap; redone when another clone used the venv).
if [ "$(cd / && python -c 'import lightning_btard, os; print(os.path.dirname(os.path.dirname(os.path.abspath(lightning_btard.__file__))))' 2>/dev/null)" != "$here" ] \
   || ! command -v btard >/dev/null; then
  (flock 9; pip install -q --no-deps --no-build-isolation -e "$here" >&2) 9>"$root/.lock"
fi
