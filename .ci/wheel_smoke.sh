#!/usr/bin/env bash
# The wheel works as users get it: build it from the files a clean checkout has (tracked and
# untracked-but-not-ignored, so no stale build/ output can slip in), install it into a fresh
# virtual environment with its runtime dependencies from the package index, and from a folder
# outside the source tree import it and take one jitted step.
#
# PYTHON: an interpreter with `build` installed (the test extra); default .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
"$PYTHON" -m build --wheel --outdir "$tmp/dist" "$tmp/src" > "$tmp/build.log" 2>&1 \
  || { cat "$tmp/build.log"; exit 1; }
wheel=$(echo "$tmp"/dist/lion_optax-*.whl)
echo "wheel: $(basename "$wheel") ($(( $(date +%s) - start ))s)"

"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
echo "installed into a fresh venv ($(( $(date +%s) - start ))s)"

cd "$tmp"  # the source tree is not on the path: this imports the installed wheel
JAX_PLATFORMS=cpu "$tmp/venv/bin/python" -W error - "$tmp/venv" <<'EOF'
import importlib.metadata
import importlib.resources
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lion_optax
import lion_optax.checkpoint  # importable without the checkpoint extra (orbax is lazy)
import lion_optax.hlo

venv = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(lion_optax.__file__).resolve()
assert venv in where.parents, f'imported {where}, not the installed wheel under {venv}'
version = importlib.metadata.version('lion_optax')
assert lion_optax.__version__ == version, (lion_optax.__version__, version)
assert importlib.resources.files('lion_optax').joinpath('py.typed').is_file(), 'no py.typed'

params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
opt = lion_optax.lion(1e-2, weight_decay=0.1, mask={'w': True, 'b': False})
state = opt.init(params)


@jax.jit
def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


grads = {'w': jnp.full((3, 2), 0.5), 'b': jnp.full(2, -0.5)}
new_params, state = step(params, state, grads)
# theta - lr * (sign(c) + wd * theta), with c = (1 - b1) * g at the first step.
np.testing.assert_allclose(new_params['w'], 1.0 - 1e-2 * (1.0 + 0.1), rtol=1e-6)
np.testing.assert_allclose(new_params['b'], 1e-2, rtol=1e-6)
print(f'lion_optax {version} from {where.parent}: one jitted step OK')
EOF
echo "wheel smoke test: $(( $(date +%s) - start ))s"
