"""Checkpoints: exact round trips, refusal of mismatched targets, resume, and no data loss.

The resume test trains half the steps here and saves; a child process (this file
run as a script) restores, trains the rest and saves; the result must equal this
process's uninterrupted run bit for bit, for float32, bfloat16 and int8 momentum.

The kill tests SIGKILL savers (children of the fork server in _checkpoint_saver.py)
at random moments and at every point of an overwrite; after each kill the newest
complete state must restore bit for bit and the next run must resume from it. The
corruption tests flip bytes in saved files and damage step folders.
"""

import collections
import concurrent.futures
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing

import _checkpoint_saver as saver
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lion_optax
from lion_optax._src.checkpoint import files as files_lib
from lion_optax._src.checkpoint import manifest as manifest_lib
from lion_optax._src.checkpoint import steps as steps_lib
from lion_optax.checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)

from _helpers import child_env

TOTAL_STEPS = 6
SPLIT_STEP = 3


def _assert_trees_bitwise_equal(a, b):
    paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
    paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            np.atleast_1d(np.asarray(x)).view(np.uint8),
            np.atleast_1d(np.asarray(y)).view(np.uint8),
            jax.tree_util.keystr(path),
        )


def _mixed_tree():
    rng = np.random.default_rng(0)
    return {
        'f32': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        'bf16': jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
        'int8': jnp.asarray(rng.integers(-127, 128, size=(2, 4)), jnp.int8),
        'count': jnp.int32(7),
        'nested': (jnp.float32(np.pi), {'key': jax.random.key(42)}),
    }


def test_round_trip_is_exact_for_every_dtype(tmp_path):
    tree = _mixed_tree()
    save_checkpoint(tmp_path, 5, tree)
    restored, step = restore_checkpoint(tmp_path, tree)
    assert step == 5
    _assert_trees_bitwise_equal(restored, tree)


def test_restore_into_abstract_target(tmp_path):
    tree = _mixed_tree()
    save_checkpoint(tmp_path, 1, tree)
    restored, _ = restore_checkpoint(tmp_path, jax.eval_shape(lambda: tree))
    _assert_trees_bitwise_equal(restored, tree)


def test_python_scalar_leaves_round_trip(tmp_path):
    save_checkpoint(tmp_path, 0, {'step': 3, 'lr': 0.5})
    restored, _ = restore_checkpoint(tmp_path, {'step': 0, 'lr': 0.0})
    assert int(restored['step']) == 3 and float(restored['lr']) == 0.5


def test_lion_state_round_trip(tmp_path):
    params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
    tx = lion_optax.lion(1e-2, weight_decay=0.1)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.sin, params)
    _, opt_state = tx.update(grads, opt_state, params)
    state = {'params': params, 'opt_state': opt_state}
    save_checkpoint(tmp_path, 1, state)
    fresh = {'params': params, 'opt_state': tx.init(params)}
    restored, _ = restore_checkpoint(tmp_path, fresh)
    _assert_trees_bitwise_equal(restored, state)


def test_dtype_mismatch_is_refused_with_the_leaf_named(tmp_path):
    params = {'w': jnp.ones((4, 2))}
    saved = {'params': params, 'opt_state': lion_optax.lion(1e-3).init(params)}
    save_checkpoint(tmp_path, 2, saved)
    bf16 = lion_optax.lion(1e-3, mu_dtype=jnp.bfloat16)
    target = {'params': params, 'opt_state': bf16.init(params)}
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, target)
    message = str(info.value)
    assert "mu['w']: checkpoint has float32[4,2], target expects bfloat16[4,2]" in message
    assert '1 difference' in message
    assert 'Nothing was restored' in message


def test_shape_mismatch_is_refused(tmp_path):
    save_checkpoint(tmp_path, 0, {'w': jnp.zeros((3, 2))})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"\['w'\]: checkpoint has float32\[3,2\], "
        r'target expects float32\[2,3\]',
    ):
        restore_checkpoint(tmp_path, {'w': jnp.zeros((2, 3))})


def test_other_optimizer_state_is_refused(tmp_path):
    params = {'w': jnp.ones(3)}
    save_checkpoint(tmp_path, 0, {'opt_state': lion_optax.lion(1e-3).init(params)})
    target = {'opt_state': lion_optax.skip_nonfinite(lion_optax.lion(1e-3)).init(params)}
    with pytest.raises(CheckpointMismatchError) as info:
        restore_checkpoint(tmp_path, target)
    message = str(info.value)
    assert 'in the checkpoint only' in message and 'in the target only' in message
    assert '.nonfinite_gradient_steps: in the target only, int32[]' in message


@pytest.mark.parametrize('kwargs', [
    {},
    dict(b1=0.95, b2=0.98, weight_decay=0.3, mask={'w': True, 'b': False}),
    dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=optax.linear_schedule(0.1, 0.0, 10)),
])
def test_optax_lion_checkpoint_continues_in_lion_optax_and_back(tmp_path, kwargs):
    """The drop-in: optax.lion's state restores into lion_optax.lion (and back) and
    the run continues bit for bit (float32, finite gradients)."""
    kwargs = dict(dict(learning_rate=1e-2), **kwargs)
    rng = np.random.default_rng(0)
    params = {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
              'b': jnp.asarray(rng.normal(size=3), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(6)]
    theirs, ours = optax.lion(**kwargs), lion_optax.lion(**kwargs)

    def run(tx, params, state, gs):
        update = jax.jit(tx.update)
        for g in gs:
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    p_half, s_half = run(theirs, params, theirs.init(params), grads[:3])
    expected = run(theirs, p_half, s_half, grads[3:])
    save_checkpoint(tmp_path, 3, {'params': p_half, 'opt_state': s_half})
    target = {'params': params, 'opt_state': ours.init(params)}
    restored, _ = restore_checkpoint(tmp_path, target)
    continued = run(ours, restored['params'], restored['opt_state'], grads[3:])
    _assert_trees_bitwise_equal(continued, expected)
    # And back: a lion_optax state into optax.lion.
    save_checkpoint(tmp_path, 6, {'params': continued[0], 'opt_state': continued[1]})
    back, _ = restore_checkpoint(tmp_path, {'params': params, 'opt_state': theirs.init(params)})
    _assert_trees_bitwise_equal(back['opt_state'], expected[1])


class _SkipNonfiniteStateOf02(typing.NamedTuple):
    """SkipNonfiniteState as lion_optax 0.2 wrote it (its counter's old name)."""

    inner_state: typing.Any
    skipped_steps: jax.Array


def test_checkpoint_with_the_old_skipped_steps_name_restores_into_the_renamed_state(tmp_path):
    """A 0.2 checkpoint of skip_nonfinite's state (counter ``skipped_steps``) restores
    into this version's SkipNonfiniteState (``nonfinite_gradient_steps``); any other
    unknown name is still refused."""
    params = {'w': jnp.arange(3.0)}
    tx = lion_optax.skip_nonfinite(lion_optax.lion(1e-2))
    state = tx.init(params)
    old = _SkipNonfiniteStateOf02(state.inner_state, jnp.int32(4))
    save_checkpoint(tmp_path, 1, {'params': params, 'opt_state': old})
    restored, _ = restore_checkpoint(tmp_path, {'params': params, 'opt_state': state})
    assert isinstance(restored['opt_state'], lion_optax.SkipNonfiniteState)
    assert int(restored['opt_state'].nonfinite_gradient_steps) == 4
    _assert_trees_bitwise_equal(restored['opt_state'].inner_state, state.inner_state)

    class Other(typing.NamedTuple):
        inner_state: typing.Any
        other_counter: jax.Array

    with pytest.raises(CheckpointMismatchError, match='skipped_steps: in the checkpoint only'):
        restore_checkpoint(tmp_path, {'params': params, 'opt_state': Other(state.inner_state, 0)})


def test_same_leaves_in_another_tree_type_are_refused(tmp_path):
    save_checkpoint(tmp_path, 0, {'a': jnp.ones(2), 'b': jnp.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match='in the checkpoint only'):
        restore_checkpoint(tmp_path, (jnp.ones(2), jnp.zeros(2)))


def test_steps_latest_overwrite_and_missing(tmp_path):
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
        restore_checkpoint(tmp_path, {'x': jnp.zeros(())})
    for step in (1, 10, 2):
        save_checkpoint(tmp_path, step, {'x': jnp.float32(step)})
    assert latest_step(tmp_path) == 10
    restored, step = restore_checkpoint(tmp_path, {'x': jnp.float32(0)})
    assert (step, float(restored['x'])) == (10, 10.0)
    restored, step = restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)
    assert (step, float(restored['x'])) == (2, 2.0)
    with pytest.raises(FileNotFoundError, match='step 3'):
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=3)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        save_checkpoint(tmp_path, 2, {'x': jnp.float32(-1)})
    save_checkpoint(tmp_path, 2, {'x': jnp.float32(-1)}, overwrite=True)
    assert float(restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)[0]['x']) == -1.0


@pytest.mark.parametrize('bad', ['a string', object()])
def test_non_array_leaves_are_refused(tmp_path, bad):
    with pytest.raises(TypeError, match=r"Leaf \['name'\] is a"):
        save_checkpoint(tmp_path, 0, {'name': bad})


def test_bad_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match='step must be an int >= 0'):
        save_checkpoint(tmp_path, -1, {'x': jnp.zeros(())})


# ---------------------------------------------------------------------------
# Checkpoints that cannot lie: checksums, incomplete steps, failed saves.
# ---------------------------------------------------------------------------


def _flip_byte(path, offset=None):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _array_data_files(folder):
    return sorted(p for p in (folder / 'arrays').rglob('*') if p.is_file() and p.parent.name == 'd')


def test_flipped_byte_in_array_data_is_refused_naming_the_file(tmp_path):
    tree = _mixed_tree()
    folder = save_checkpoint(tmp_path, 4, tree)
    data_files = _array_data_files(folder)
    assert data_files, sorted(p.relative_to(folder) for p in folder.rglob('*'))
    for victim in data_files:
        original = victim.read_bytes()
        _flip_byte(victim)
        with pytest.raises(CheckpointCorruptError) as info:
            restore_checkpoint(tmp_path, tree)
        message = str(info.value)
        assert 'step 4' in message and 'is corrupt (1 file(s)' in message
        assert victim.relative_to(folder).as_posix() in message
        assert 'array data' in message and 'Nothing was restored' in message
        # Also when the step is named, and before the target is even compared.
        with pytest.raises(CheckpointCorruptError):
            restore_checkpoint(tmp_path, {'other': jnp.zeros(2)}, step=4)
        victim.write_bytes(original)
    _assert_trees_bitwise_equal(restore_checkpoint(tmp_path, tree)[0], tree)


def test_flipped_byte_in_tree_description_or_manifest_is_refused(tmp_path):
    tree = {'w': jnp.arange(3.0)}
    folder = save_checkpoint(tmp_path, 0, tree)
    spec = folder / 'lion_optax' / 'metadata'
    original = spec.read_bytes()
    _flip_byte(spec, original.index(b'float32') + 5)  # 'float32' becomes 'floaT32'
    with pytest.raises(CheckpointCorruptError, match='lion_optax/metadata .the description'):
        restore_checkpoint(tmp_path, tree)
    spec.write_bytes(original)
    manifest = folder / 'lion_optax_manifest.json'
    text = manifest.read_text()
    manifest.write_text(text.replace('"step": 0', '"step": 1'))
    assert latest_step(tmp_path) is None
    with pytest.raises(CheckpointCorruptError, match='manifest .* is damaged'):
        restore_checkpoint(tmp_path, tree, step=0)


def test_step_without_its_arrays_is_skipped_explained_and_fallen_back_from(tmp_path):
    save_checkpoint(tmp_path, 1, {'x': jnp.float32(1)})
    save_checkpoint(tmp_path, 2, {'x': jnp.float32(2)})
    # What a format-1 save killed part-way left: the tree description, no arrays, no manifest.
    shutil.rmtree(tmp_path / '2' / 'arrays')
    (tmp_path / '2' / 'lion_optax_manifest.json').unlink()
    assert latest_step(tmp_path) == 1
    with pytest.warns(RuntimeWarning, match=r'step 2 .*no lion_optax_manifest.json') as record:
        restored, step = restore_checkpoint(tmp_path, {'x': jnp.float32(0)})
    assert (step, float(restored['x'])) == (1, 1.0)
    assert 'restores step 1' in str(record[0].message)
    with pytest.raises(FileNotFoundError) as info:
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)
    message = str(info.value)
    assert 'step 2' in message and 'is incomplete' in message and 'interrupted' in message
    assert 'Complete steps: 1.' in message
    # A committed step whose arrays were deleted afterwards: damaged, named, never restored.
    save_checkpoint(tmp_path, 3, {'x': jnp.float32(3)})
    shutil.rmtree(tmp_path / '3' / 'arrays')
    assert latest_step(tmp_path) == 1
    with pytest.raises(CheckpointCorruptError, match=r'step 3 .* is damaged: arrays/.*missing'):
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=3)
    with pytest.warns(RuntimeWarning, match='step 3'):
        assert restore_checkpoint(tmp_path, {'x': jnp.float32(0)})[1] == 1
    # Saving over the debris needs overwrite=True, and then works.
    with pytest.raises(FileExistsError, match='not a complete checkpoint'):
        save_checkpoint(tmp_path, 2, {'x': jnp.float32(-2)})
    save_checkpoint(tmp_path, 2, {'x': jnp.float32(-2)}, overwrite=True)
    assert float(restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)[0]['x']) == -2.0


def test_format_1_checkpoint_is_not_restored_and_says_why(tmp_path):
    folder = save_checkpoint(tmp_path, 8, {'x': jnp.float32(8)})
    # Format 1 had no manifest and said format_version 1 in the tree description.
    (folder / 'lion_optax_manifest.json').unlink()
    spec = folder / 'lion_optax' / 'metadata'
    spec.write_text(spec.read_text().replace('"format_version": 2', '"format_version": 1'))
    assert latest_step(tmp_path) is None
    with pytest.raises(CheckpointMismatchError, match=r'step 8 .* format 1.*save it again'):
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=8)
    with pytest.raises(FileNotFoundError, match=r'No checkpoint.*not complete:\n  step 8'):
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)})


def _file_damages(raw):
    """``(what, new bytes or None for deleted)``: flips at several places, truncations, deletion."""
    n = len(raw)
    for where in sorted({0, n // 2, n - 1}):
        flipped = bytearray(raw)
        flipped[where] ^= 0x01
        yield f'byte {where} of {n} flipped', bytes(flipped)
    run = bytearray(raw)  # eight bytes at once: what made the manifest non-UTF-8 (issue 18)
    for where in range(n // 2, min(n, n // 2 + 8)):
        run[where] ^= 0xFF
    yield f'bytes {n // 2}..{n // 2 + 7} of {n} flipped', bytes(run)
    yield f'truncated to {n // 2} of {n} bytes', raw[: n // 2]
    yield 'deleted', None


def test_every_byte_of_every_file_is_covered_flipped_truncated_or_deleted(tmp_path):
    """Damage each file a real save writes (orbax's files and the manifest) in turn.

    Each damage must end in a fallback to step 1 (a step whose manifest is damaged,
    or whose files lack bytes, is not complete) or, for a same-size change that only
    the SHA-256 sees, a CheckpointCorruptError naming the file: never another
    exception, never data other than what the restored step saved.
    """
    old = {'w': jnp.arange(6.0).reshape(2, 3), 'n': jnp.int32(1), 'm': jnp.ones(3, jnp.bfloat16)}
    new = jax.tree.map(lambda x: x + 1, old)
    save_checkpoint(tmp_path, 1, old)
    folder = save_checkpoint(tmp_path, 2, new)
    manifest_name = manifest_lib.FILENAME
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    listed = set(json.loads((folder / manifest_name).read_text())['files'])
    assert listed == set(names) - {manifest_name}, 'a file the save wrote is not checksummed'
    assert manifest_name in names and any('/d/' in name for name in names), names
    corrupt = 'step 2 .* is corrupt'
    failures = []
    for name in names:
        victim = folder / name
        original = victim.read_bytes()
        for what, damaged in _file_damages(original):
            if damaged is None:
                victim.unlink()
            else:
                victim.write_bytes(damaged)
            label = f'{name} {what}'
            try:
                # Sizes are checked without reading data; only the SHA-256 sees a same-size edit.
                if name == manifest_name and damaged is None:
                    refusal, why = FileNotFoundError, 'is incomplete: it has no lion_optax_manifest'
                elif name == manifest_name:
                    refusal, why = CheckpointCorruptError, 'is damaged: its manifest .* is damaged'
                elif damaged is None:
                    refusal, why = CheckpointCorruptError, f'is damaged: {name}, listed .* missing'
                elif len(damaged) != len(original):
                    refusal, why = CheckpointCorruptError, f'is damaged: {name} has {len(damaged)}'
                else:
                    refusal, why = None, None
                if refusal is not None:
                    assert latest_step(tmp_path) == 1, label
                    with pytest.warns(RuntimeWarning, match='\n  step 2 .*: ') as record:
                        restored, step = restore_checkpoint(tmp_path, old)
                    assert step == 1 and len(record) == 1, label
                    _assert_trees_bitwise_equal(restored, old)
                    with pytest.raises(refusal, match=f'step 2 at .* {why}'):
                        restore_checkpoint(tmp_path, new, step=2)
                else:
                    assert latest_step(tmp_path) == 2, label
                    for step in (None, 2):
                        with pytest.raises(CheckpointCorruptError, match=corrupt) as info:
                            restore_checkpoint(tmp_path, new, step=step)
                        assert f'\n  {name} (' in str(info.value), label
                    _assert_trees_bitwise_equal(restore_checkpoint(tmp_path, old, step=1)[0], old)
            except (Exception, pytest.fail.Exception) as error:  # collect every case
                failures.append(f'{label}: {type(error).__name__}: {error}')
            victim.write_bytes(original)
    assert not failures, '\n'.join(failures)
    _assert_trees_bitwise_equal(restore_checkpoint(tmp_path, new)[0], new)


def _write_manifest_like_a_save(folder, manifest):
    """Writes ``manifest`` with the checksum and layout a save gives it, whatever its contents."""
    if isinstance(manifest, dict):
        body = {k: v for k, v in manifest.items() if k != 'sha256'}
        canonical = json.dumps(body, sort_keys=True, separators=(',', ':'))
        manifest = dict(body, sha256=hashlib.sha256(canonical.encode()).hexdigest())
    (folder / 'lion_optax_manifest.json').write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _manifest_edits(good):
    """Manifests that are valid JSON with a matching checksum but not what a save writes."""
    name, entry = next(iter(good['files'].items()))
    files = lambda **changes: dict(good, files=dict(good['files'], **changes))  # noqa: E731
    return {
        'a list': [good],
        'files a list': dict(good, files=list(good['files'].items())),
        'files missing': {k: v for k, v in good.items() if k != 'files'},
        'an extra key': dict(good, comment='hi'),
        'step a str': dict(good, step=str(good['step'])),
        'step a bool': dict(good, step=True),
        'format_version a str': dict(good, format_version='2'),
        'size a str': files(**{name: [str(entry[0]), entry[1]]}),
        'size a bool': files(**{name: [True, entry[1]]}),
        'size negative': files(**{name: [-1, entry[1]]}),
        'entry of one field': files(**{name: [entry[0]]}),
        'entry an object': files(**{name: {'size': entry[0], 'sha256': entry[1]}}),
        'checksum not hex': files(**{name: [entry[0], 'z' * 64]}),
        'a path out of the step': files(**{'../1/' + name: entry}),
        'an absolute path': files(**{'/' + name: entry}),
    }


def test_manifest_of_wrong_types_or_layout_is_damaged_not_a_crash(tmp_path):
    save_checkpoint(tmp_path, 1, {'x': jnp.float32(1)})
    folder = save_checkpoint(tmp_path, 2, {'x': jnp.float32(2)})
    manifest = folder / 'lion_optax_manifest.json'
    original = manifest.read_text()
    good = json.loads(original)
    edits = _manifest_edits(good)
    # Same contents, other whitespace: JSON ignores it, the check must not.
    edits['re-indented'] = None
    failures = []
    for what, edited in edits.items():
        if edited is None:
            manifest.write_text(json.dumps(good, indent=2, sort_keys=True))
        else:
            _write_manifest_like_a_save(folder, edited)
        try:
            assert latest_step(tmp_path) == 1
            damaged = r'step 2 .* manifest .* is damaged \('
            with pytest.raises(CheckpointCorruptError, match=damaged):
                restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)
        except (Exception, pytest.fail.Exception) as error:  # collect every case
            failures.append(f'{what}: {type(error).__name__}: {error}')
    assert not failures, '\n'.join(failures)
    _write_manifest_like_a_save(folder, good)  # the test's writer is the save's: intact again
    assert manifest.read_text() == original
    assert restore_checkpoint(tmp_path, {'x': jnp.float32(0)})[1] == 2


def test_manifest_parser_never_raises_and_accepts_only_the_bytes_a_save_wrote(tmp_path):
    """The manifest's parser on its own: every flipped byte and truncation is a status
    with a reason, never an exception, and so is JSON nested too deep for the decoder (a
    RecursionError). A flip can only make the step damaged, or (in its format_version)
    of another format."""
    folder = save_checkpoint(tmp_path, 1, {'x': jnp.float32(1)})
    raw = (folder / manifest_lib.FILENAME).read_bytes()
    assert manifest_lib.parse(raw)[0] == 'complete'
    damaged = [bytes(raw[:n]) for n in range(len(raw))]
    for where in range(len(raw)):
        for bit in (0x01, 0x80):  # 0x80: no longer UTF-8
            flipped = bytearray(raw)
            flipped[where] ^= bit
            damaged.append(bytes(flipped))
    damaged.append(b'[' * 100_000 + b']' * 100_000)
    for edited in damaged:
        status, why = manifest_lib.parse(edited)
        assert status in ('damaged', 'in another format') and why, (edited, status, why)


def test_manifest_of_another_format_is_refused_as_a_mismatch(tmp_path):
    save_checkpoint(tmp_path, 1, {'x': jnp.float32(1)})
    folder = save_checkpoint(tmp_path, 2, {'x': jnp.float32(2)})
    manifest = json.loads((folder / manifest_lib.FILENAME).read_text())
    _write_manifest_like_a_save(folder, dict(manifest, format_version=3))
    assert latest_step(tmp_path) == 1
    with pytest.raises(CheckpointMismatchError, match=r'step 2 .* in another format: .*format 3'):
        restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=2)
    with pytest.warns(RuntimeWarning, match='step 2 .*format 3'):
        assert restore_checkpoint(tmp_path, {'x': jnp.float32(0)})[1] == 1


def test_files_are_hashed_alike_one_by_one_and_in_the_pool(tmp_path):
    """Checkpoints of 8 MiB and more are hashed by a thread pool on restore (and every
    save with several files flushes in one): same sizes and SHA-256 as hashlib's."""
    rng = np.random.default_rng(0)
    names = ['a', 'b/c', 'b/d']
    (tmp_path / 'b').mkdir()
    for name, size in zip(names, [5 << 20, 4 << 20, 0]):
        (tmp_path / name).write_bytes(rng.bytes(size))
    expected = {
        name: ((tmp_path / name).stat().st_size,
               hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
        for name in names
    }
    assert files_lib.hash_files(tmp_path, names) == expected  # 9 MiB: the pool
    assert files_lib.hash_files(tmp_path, names, flush=True) == expected
    assert files_lib.hash_files(tmp_path, names[1:]) == {n: expected[n] for n in names[1:]}
    with pytest.raises(FileNotFoundError):
        files_lib.hash_files(tmp_path, names + ['missing'])


def test_zero_size_leaves_round_trip(tmp_path):
    tree = {
        'empty': jnp.zeros((0, 3), jnp.bfloat16),
        'keys': jax.random.split(jax.random.key(1), 0),
        'full': jnp.arange(4, dtype=jnp.int8),
    }
    save_checkpoint(tmp_path, 0, tree)
    restored, _ = restore_checkpoint(tmp_path, jax.eval_shape(lambda: tree))
    _assert_trees_bitwise_equal(restored, tree)
    restored, _ = restore_checkpoint(tmp_path, tree)  # onto the leaves' shardings
    _assert_trees_bitwise_equal(restored, tree)
    assert restored['empty'].sharding.is_equivalent_to(tree['empty'].sharding, 2)
    # Nothing but zero-size leaves, and no leaves at all.
    save_checkpoint(tmp_path, 1, {'e': jnp.zeros((2, 0))})
    restored, _ = restore_checkpoint(tmp_path, {'e': jnp.zeros((2, 0))}, step=1)
    _assert_trees_bitwise_equal(restored, {'e': jnp.zeros((2, 0))})
    save_checkpoint(tmp_path, 2, {})
    assert restore_checkpoint(tmp_path, {}, step=2) == ({}, 2)
    assert sorted(os.listdir(tmp_path)) == ['0', '1', '2']


def test_unstorable_leaf_is_refused_before_anything_is_written(tmp_path):
    save_checkpoint(tmp_path, 1, {'x': jnp.ones(2)})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    bad = {'x': jnp.ones(2), 'packed': jnp.ones(4, jnp.uint4)}
    with pytest.raises(TypeError, match=r"Leaf \['packed'\] has dtype uint4.*nothing was saved"):
        save_checkpoint(tmp_path, 2, bad)
    with pytest.raises(TypeError, match='uint4'):
        save_checkpoint(tmp_path, 1, bad, overwrite=True)
    # Without jax_enable_x64, JAX would turn 2**40 into 0 on the way to orbax.
    wide = {'x': jnp.ones(2), 'counter': np.array([2**40], np.uint64)}
    with pytest.raises(TypeError, match=r"\['counter'\] is a NumPy uint64 array.*narrow to uint32"):
        save_checkpoint(tmp_path, 2, wide)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before


def test_failed_save_leaves_nothing_and_keeps_the_old_copy(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {'x': jnp.ones(2)})

    def disk_full(folder, step):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(manifest_lib, 'write', disk_full)
    for step in (1, 2):  # an overwrite and a new step
        with pytest.raises(OSError, match='No space left'):
            save_checkpoint(tmp_path, step, {'x': jnp.zeros(2)}, overwrite=True)
        assert os.listdir(tmp_path) == ['1']
    restored, step = restore_checkpoint(tmp_path, {'x': jnp.zeros(2)})
    assert step == 1 and restored['x'].tolist() == [1.0, 1.0]


def test_leftovers_of_killed_saves_are_ignored_and_removed_by_the_next_save(tmp_path):
    folder, elsewhere = tmp_path / 'run', tmp_path / 'elsewhere'
    save_checkpoint(folder, 1, {'x': jnp.float32(1)})
    # Leftovers: orbax's temporary folder from format 1, a half-written staging copy, a
    # complete staging copy that was never switched in, and the old copy of step 1 that an
    # overwrite renamed aside and was killed before deleting.
    (folder / '5.orbax-checkpoint-tmp-1234' / 'arrays').mkdir(parents=True)
    (folder / '6.lion_optax-saving.orbax-checkpoint-tmp').mkdir()
    os.rename(save_checkpoint(elsewhere, 7, {'x': jnp.float32(7)}), folder / '7.lion_optax-saving')
    old = save_checkpoint(elsewhere, 1, {'x': jnp.float32(-1)})
    os.rename(old, folder / '1.lion_optax-replaced')
    assert latest_step(folder) == 1
    assert float(restore_checkpoint(folder, {'x': jnp.float32(0)})[0]['x']) == 1.0
    save_checkpoint(folder, 2, {'x': jnp.float32(2)})
    assert sorted(os.listdir(folder)) == ['1', '2']
    assert float(restore_checkpoint(folder, {'x': jnp.float32(0)}, step=1)[0]['x']) == 1.0


def test_overwrite_killed_between_its_renames_keeps_the_old_copy(tmp_path):
    save_checkpoint(tmp_path, 3, {'x': jnp.float32(3)})
    os.rename(tmp_path / '3', tmp_path / '3.lion_optax-replaced')  # the state after rename 1
    assert latest_step(tmp_path) == 3
    assert restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=3)[1] == 3
    with pytest.raises(FileExistsError, match='interrupted overwrite'):
        save_checkpoint(tmp_path, 3, {'x': jnp.float32(-3)})
    save_checkpoint(tmp_path, 4, {'x': jnp.float32(4)})  # cleans up: puts 3 back
    assert sorted(os.listdir(tmp_path)) == ['3', '4']
    assert float(restore_checkpoint(tmp_path, {'x': jnp.float32(0)}, step=3)[0]['x']) == 3.0


# ---------------------------------------------------------------------------
# Resume in a new process, bit for bit.
# ---------------------------------------------------------------------------


def _variants():
    variants = {
        'float32': (jnp.float32, dict()),
        'bfloat16': (jnp.bfloat16, dict(mu_dtype=jnp.bfloat16)),
    }
    if hasattr(lion_optax, 'Int8Momentum'):
        # Small blocks and no size threshold so that every leaf is quantised.
        int8 = lion_optax.Int8Momentum(block_size=16, min_quantized_size=0)
        variants['int8'] = (jnp.float32, dict(mu_dtype=int8))
    return variants


def _setup(variant):
    dtype, options = _variants()[variant]
    rng = np.random.default_rng(1)
    params = {
        'w1': jnp.asarray(rng.normal(size=(8, 32)) / 3, dtype),
        'b1': jnp.zeros((32,), dtype),
        'w2': jnp.asarray(rng.normal(size=(32, 1)) / 6, dtype),
    }
    tx = lion_optax.lion(
        optax.schedules.warmup_cosine_decay_schedule(0.0, 3e-2, TOTAL_STEPS // 20, TOTAL_STEPS,
                                                     3e-3),
        weight_decay=0.1, **options
    )
    return params, tx


def _batch(step):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (16, 8))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


@functools.cache
def _step_fn(variant):
    _, tx = _setup(variant)

    @jax.jit
    def step_fn(state):
        x, y = _batch(state['step'])

        def loss(params):
            hidden = jnp.tanh(x.astype(params['w1'].dtype) @ params['w1'] + params['b1'][None, :])
            return jnp.mean((hidden @ params['w2'] - y) ** 2)

        grads = jax.grad(loss)(state['params'])
        updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
        return {
            'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state,
            'step': state['step'] + 1,
        }

    return step_fn


def _train(variant, state, steps):
    for _ in range(steps):
        state = _step_fn(variant)(state)
    return state


def _fresh_state(variant):
    params, tx = _setup(variant)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}


def _resume_in_child(directory):
    """Runs in a new process: restores each variant's half-way checkpoint, finishes, saves."""
    for variant in _variants():
        folder = os.path.join(directory, variant)
        state, step = restore_checkpoint(folder, _fresh_state(variant))
        assert step == SPLIT_STEP == int(state['step'])
        save_checkpoint(folder, TOTAL_STEPS, _train(variant, state, TOTAL_STEPS - step))


@pytest.mark.slow  # a second Python process
@pytest.mark.optax_promotion  # optax's schedules: 0.1 * count, count int32
def test_resume_in_new_process_is_bitwise_identical(tmp_path):
    references = {}
    for variant in _variants():
        state = _train(variant, _fresh_state(variant), SPLIT_STEP)
        save_checkpoint(tmp_path / variant, SPLIT_STEP, state)
        references[variant] = _train(variant, state, TOTAL_STEPS - SPLIT_STEP)
    subprocess.run(
        [sys.executable, __file__, str(tmp_path)], check=True, env=child_env(), timeout=300
    )
    for variant, reference in references.items():
        resumed, step = restore_checkpoint(tmp_path / variant, _fresh_state(variant))
        assert step == TOTAL_STEPS
        _assert_trees_bitwise_equal(resumed, reference)
        # The run really moved: a resume that restored nothing could not match.
        assert not np.array_equal(resumed['params']['w1'], _fresh_state(variant)['params']['w1'])


if __name__ == '__main__':
    _resume_in_child(sys.argv[1])


# ---------------------------------------------------------------------------
# Savers killed with SIGKILL: at random moments, and at each point of an overwrite.
# ---------------------------------------------------------------------------

KILL_SEED = 20261203
KILL_CHAINS = 4  # independent folders, run concurrently
KILLS_PER_CHAIN = 5  # each kill ends one child; the next child resumes from what is left
_STEP_NAME = re.compile(r'^(\d+|\d+\.(lion_optax-saving|lion_optax-replaced)(\..*)?)$')


class _SaverServer:
    """Drives the fork server of _checkpoint_saver.py from several threads."""

    def __init__(self, cache_dir):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_checkpoint_saver.py')
        env = child_env(
            # One BLAS thread: the server then has a single thread when it forks.
            OPENBLAS_NUM_THREADS='1',
            # The first children compile; the others load their executables (~0.15 s each).
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
        )
        self._process = subprocess.Popen(
            [sys.executable, script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self._events = collections.defaultdict(queue.Queue)
        self._pids = {}
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.expect('server', 'ready', timeout=120)

    def _read(self):
        for line in self._process.stdout:
            trial, kind, value = (line.rstrip('\n').split(' ', 2) + ['', ''])[:3]
            self._events[trial].put((kind, value))
        self._events['server'].put(('gone', 'the fork server ended'))

    def _send(self, line):
        with self._write_lock:
            self._process.stdin.write(line + '\n')
            self._process.stdin.flush()

    def expect(self, trial, kind, timeout=60):
        try:
            got, value = self._events[trial].get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f'{trial}: no "{kind}" line within {timeout} s')
        if got != kind:
            pytest.fail(f'{trial}: expected "{kind}", got "{got} {value}"')
        return value

    def run(self, trial, folder, max_saves=40, fault='-'):
        self._send(f'run {trial} {folder} {max_saves} {fault}')
        self._pids[trial] = int(self.expect(trial, 'pid'))
        return int(self.expect(trial, 'resumed', timeout=120))

    def kill(self, trial):
        # The child is not reaped before `wait`, so its pid cannot have been reused.
        os.kill(self._pids[trial], signal.SIGKILL)

    def wait(self, trial):
        """Waits for the child to end; returns its exit and the indices it reported saved."""
        self._send(f'wait {trial}')
        saved = []
        while True:
            kind, value = self._events[trial].get(timeout=60)
            if kind == 'exit':
                del self._pids[trial]
                return value, saved
            if kind == 'error':
                pytest.fail(f'{trial} failed: {value}')
            assert kind == 'saved', (kind, value)
            saved.append(int(value))

    def close(self):
        for pid in self._pids.values():  # left running only if a test failed
            os.kill(pid, signal.SIGKILL)
        try:
            self._send('quit')
            self._process.stdin.close()
            self._process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=30)
        self._process.stdout.close()


@pytest.fixture(scope='module')
def saver_server(tmp_path_factory):
    server = _SaverServer(tmp_path_factory.mktemp('jax_cache'))
    try:
        # Two runs that are not killed fill JAX's compilation cache, so that no entry is
        # written while another child reads it, or left truncated by a kill.
        warm_up = tmp_path_factory.mktemp('warm_up')
        for trial in ('warm-up', 'warm-up.resumed'):
            server.run(trial, warm_up, max_saves=1)
            assert server.wait(trial)[0] == 'code=0', trial
        yield server
    finally:
        server.close()


class _Run:
    """The uninterrupted run, computed here, and the checks made after every kill."""

    def __init__(self):
        self.lock = threading.Lock()
        self.states = [saver.initial_state()]

    def state(self, i):
        while len(self.states) <= i:
            self.states.append(saver.advance(self.states[-1]))
        return self.states[i]

    def check_after_kill(self, folder, newest, context):
        """The newest complete state restores bit for bit; returns its index (-1: none).

        ``newest`` is the newest index the killed child reported saved (or resumed from):
        that state, or the next one if its save got as far as the switch, must restore.
        """
        with self.lock:
            names = os.listdir(folder) if os.path.isdir(folder) else []
            assert all(_STEP_NAME.match(n) for n in names), (context, names)
            step = latest_step(folder)
            if step is None:
                assert newest == -1, (context, names)
                return -1
            restored, restored_step = restore_checkpoint(folder, self.state(0))
            i = int(restored['i'])
            assert restored_step == step == saver.label(i), (context, i, names)
            assert newest <= i <= newest + 1, (context, newest, i, names)
            _assert_trees_bitwise_equal(restored, self.state(i))
            # Every older step is still there and complete.
            assert steps_lib.complete_steps(folder) == list(range(step + 1)), (context, names)
            return i

    def resume_here(self, folder, context):
        """A later run resumes, saves once, and so removes every leftover."""
        with self.lock:
            restored, _ = restore_checkpoint(folder, self.state(0))
            i = int(restored['i']) + 1
            save_checkpoint(folder, saver.label(i), saver.advance(restored), overwrite=i % 2 == 1)
            names = sorted(os.listdir(folder))
            assert names == sorted(str(s) for s in range(saver.label(i) + 1)), (context, names)
            _assert_trees_bitwise_equal(restore_checkpoint(folder, self.state(0))[0], self.state(i))


def _kill_chain(server, run, folder, name, rng):
    """Children that resume from ``folder`` and are killed at random moments, one by one."""
    for k in range(KILLS_PER_CHAIN):
        trial = f'{name}.{k}'
        resumed = server.run(trial, folder)
        saves = int(rng.integers(0, 3))
        delay = float(rng.uniform(0.0, 0.15))
        context = f'{trial}: killed {1000 * delay:.0f} ms after {saves} save(s) (seed {KILL_SEED})'
        reported = [int(server.expect(trial, 'saved')) for _ in range(saves)]
        time.sleep(delay)
        server.kill(trial)
        exit_status, more = server.wait(trial)
        assert exit_status == 'signal=9', f'{context}: ended with {exit_status} before the kill'
        run.check_after_kill(folder, max([resumed, *reported, *more]), context)
    run.resume_here(folder, name)


def test_saves_killed_at_random_moments_lose_nothing(saver_server, tmp_path):
    run = _Run()
    run.state(KILLS_PER_CHAIN * 4)  # compile and compute here before the children start
    with concurrent.futures.ThreadPoolExecutor(KILL_CHAINS) as pool:
        chains = [
            pool.submit(
                _kill_chain,
                saver_server,
                run,
                tmp_path / f'chain{c}',
                f'chain{c}',
                np.random.default_rng([KILL_SEED, c]),
            )
            for c in range(KILL_CHAINS)
        ]
        for chain in chains:
            chain.result()


# Saves 0-3 of a fresh run are: step 0 (new), step 0 (overwrite), step 1, step 1 (overwrite).
# Each fault kills save 3, the overwrite of step 1 (whose old copy holds state 2), at one point.
_OVERWRITE_KILLS = {
    'before-manifest:4': 2,  # orbax wrote the new copy; no manifest yet
    'after-manifest:4': 2,  # the new copy is complete, not switched in
    'after-rename:5': 2,  # the old copy renamed aside; '1' does not exist
    'after-rename:6': 3,  # the new copy switched in; the old one not deleted
    'remove-half:2': 3,  # the old copy half deleted
}


def _kill_at(server, run, folder, fault, expected):
    trial = f'fault.{fault.replace(":", "_")}'
    server.run(trial, folder, fault=fault)
    exit_status, saved = server.wait(trial)
    assert exit_status == 'signal=9', f'{trial}: never reached {fault} ({exit_status})'
    assert saved == list(range(3)), (trial, saved)
    assert run.check_after_kill(folder, 2, trial) == expected
    # The next run is killed in turn, in the middle of removing the first leftover (or the
    # old copy of its own overwrite), and still nothing is lost.
    trial += '.again'
    resumed = server.run(trial, folder, fault='remove-half:1')
    assert resumed == expected
    exit_status, saved = server.wait(trial)
    assert exit_status == 'signal=9', f'{trial}: never reached remove-half:1 ({exit_status})'
    run.check_after_kill(folder, max([resumed, *saved]), trial)
    run.resume_here(folder, trial)


def test_kill_at_each_point_of_an_overwrite_keeps_a_complete_copy(saver_server, tmp_path):
    run = _Run()
    run.state(8)
    with concurrent.futures.ThreadPoolExecutor(len(_OVERWRITE_KILLS)) as pool:
        trials = [
            pool.submit(_kill_at, saver_server, run, tmp_path / str(n), fault, expected)
            for n, (fault, expected) in enumerate(_OVERWRITE_KILLS.items())
        ]
        for trial in trials:
            trial.result()
