"""Savers to be SIGKILLed, for the kill tests in tests/test_checkpoint.py.

Imported as a module, this file defines the training run that both sides agree on: the
state after ``i`` steps is a deterministic function of ``i`` (a tiny Lion run with
bfloat16 momentum, carrying a PRNG key and a zero-size leaf), and it is saved at step
``label(i) = i // 2``, so every odd save overwrites the step that the save before it
created.

Run as a script, it is a fork server. Each kill trial needs a process of its own, and
importing JAX, orbax and lion_optax costs about 2 s of CPU; the server pays that once, before
any JAX backend starts (a started backend has threads, which fork does not copy), then forks
one child per trial. Commands arrive on stdin, one per line; replies and events leave on
stdout, one line each, written with a single ``os.write`` so that concurrent children's
lines never interleave:

* ``run TRIAL FOLDER MAX_SAVES FAULT`` replies ``TRIAL pid PID``. The child resumes from the
  newest complete step in FOLDER (or starts afresh), prints ``TRIAL resumed I`` (the index
  of the restored state, -1 when fresh), then saves states I+1, I+2, ... printing
  ``TRIAL saved J`` after each save returns. It exits after MAX_SAVES saves unless killed
  first. FAULT is ``-`` (the parent kills it at a random moment) or ``WHERE:N``: the
  child SIGKILLs itself at the N-th time its save reaches WHERE (see ``_FAULTS``).
* ``wait TRIAL`` waits for that child to end and replies ``TRIAL exit signal=S`` or
  ``TRIAL exit code=C``. Every line the child printed comes before this reply.
* ``quit`` (or the end of stdin) ends the server.

The server announces itself with ``server ready``. Its children have two CPU devices: they
save the params sharded over both, and check that a restore puts every array back on the
sharding of its target (the test process, with one device, restores the same files).

A child that raises prints ``TRIAL error MESSAGE`` (the traceback goes to stderr) and exits 1.
"""

import os
import signal
import sys
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint  # noqa: F401 - imported here once, not in every child

import lion_optax
from lion_optax import checkpoint
from lion_optax._src.checkpoint import files, manifest


def label(i):
    """The checkpoint step under which save ``i`` is written."""
    return i // 2


def _tx():
    return lion_optax.lion(1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16)


def _initial_values():
    params = {
        'w': jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(2, 3), jnp.float32),
        'b': jnp.zeros((3,), jnp.float32),
    }
    return {
        'params': params,
        'opt_state': _tx().init(params),
        'key': jax.random.key(0),
        'empty': jnp.zeros((0, 2), jnp.float32),
        'i': jnp.int32(0),
    }


def _shardings(tree):
    """The params' first axis (and the momentum's) split over every device, the rest replicated."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('d',))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: rows if x.shape == (2, 3) else replicated, tree)


def initial_state():
    """State 0, sharded by ``_shardings`` (over two devices in the children)."""
    state = _initial_values()
    # Committed like advance's outputs and restored arrays, so that advance compiles once.
    return jax.device_put(state, _shardings(state))


def abstract_state():
    """Shapes, dtypes and shardings of every state, without computing one (cheaper)."""
    shapes = jax.eval_shape(_initial_values)
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        _shardings(shapes),
    )


@jax.jit
def advance(state):
    """One training step, with gradients that depend on the params and the step."""
    grads = jax.tree.map(
        lambda p: jnp.sin(3.0 * p + state['i'].astype(p.dtype)), state['params'])
    updates, opt_state = _tx().update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return dict(state, params=params, opt_state=opt_state, i=state['i'] + 1)


# ---------------------------------------------------------------------------
# The fork server and its children.
# ---------------------------------------------------------------------------


def _restore_onto(folder, target):
    """Restores the newest complete state; every array must come back on the target's sharding."""
    state, _ = checkpoint.restore_checkpoint(folder, target)
    restored, _ = jax.tree_util.tree_flatten_with_path(state)
    for (path, got), wanted in zip(restored, jax.tree.leaves(target)):
        if not got.sharding.is_equivalent_to(wanted.sharding, got.ndim):
            where = jax.tree_util.keystr(path)
            raise AssertionError(f'{where} restored on {got.sharding}, not {wanted.sharding}')
    return state


def _emit(line):
    os.write(1, (line + '\n').encode())


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _remove_half(path):
    """Deletes every other file of ``path``, as an rmtree killed half-way would leave it."""
    files = sorted(p for p in path.rglob('*') if p.is_file())
    for p in files[::2]:
        p.unlink()


# Where a save can be made to kill itself. Each entry wraps one function of a checkpoint
# module (the save calls them through their modules, so one wrapper sees every call):
# (module, name, run the original first?, what to do at the N-th call instead of returning).
_FAULTS = {
    # Orbax has written the new copy; its manifest is not written yet.
    'before-manifest': (manifest, 'write', False, None),
    # The new copy is complete (manifest written) but not switched in.
    'after-manifest': (manifest, 'write', True, None),
    # After the N-th rename (a new step's switch, or either rename of an overwrite).
    'after-rename': (files, 'rename', True, None),
    # Half-way through deleting the N-th folder that gets deleted (old copies, leftovers).
    'remove-half': (files, 'remove_tree', False, _remove_half),
}


def _install_fault(fault):
    if fault == '-':
        return
    where, n = fault.split(':')
    module, name, original_first, partial = _FAULTS[where]
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args):
        calls[0] += 1
        if calls[0] != int(n):
            return original(*args)
        if original_first:
            original(*args)
        elif partial is not None:
            partial(*args)
        _die()

    setattr(module, name, wrapper)


def _child(trial, folder, max_saves, fault):
    # Falling back past an incomplete step folder must never be needed: a killed save
    # leaves none.
    warnings.filterwarnings('error', message='restore_checkpoint', category=RuntimeWarning)
    _install_fault(fault)
    if checkpoint.latest_step(folder) is None:
        state, resumed = initial_state(), -1
    else:
        state = _restore_onto(folder, abstract_state())
        resumed = int(state['i'])
        state = advance(state)
    _emit(f'{trial} resumed {resumed}')
    for i in range(resumed + 1, resumed + 1 + max_saves):
        checkpoint.save_checkpoint(folder, label(i), state, overwrite=i % 2 == 1)
        _emit(f'{trial} saved {i}')
        state = advance(state)


def _serve():
    # Two CPU devices, so that the children save sharded arrays and restore onto a sharding.
    jax.config.update('jax_num_cpu_devices', 2)
    children = {}
    _emit('server ready')
    for line in sys.stdin:
        command, *args = line.split()
        if command == 'run':
            trial, folder, max_saves, fault = args
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _child(trial, folder, int(max_saves), fault)
                except BaseException as error:  # noqa: B036 - report anything, then exit
                    traceback.print_exc()
                    _emit(f'{trial} error {type(error).__name__}: {error}'.replace('\n', ' | '))
                    code = 1
                finally:
                    os._exit(code)
            children[trial] = pid
            _emit(f'{trial} pid {pid}')
        elif command == 'wait':
            (trial,) = args
            _, status = os.waitpid(children.pop(trial), 0)
            if os.WIFSIGNALED(status):
                _emit(f'{trial} exit signal={os.WTERMSIG(status)}')
            else:
                _emit(f'{trial} exit code={os.WEXITSTATUS(status)}')
        elif command == 'quit':
            break
    for pid in children.values():  # Only if the parent left early: do not leave savers running.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == '__main__':
    _serve()
