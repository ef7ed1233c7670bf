"""Checkpoints of training state (params + optimizer state) on top of orbax.

Orbax restores into whatever target it is given and casts silently: a bfloat16
momentum saved by ``lion(mu_dtype=jnp.bfloat16)`` comes back as float32 when the
target was built by ``lion()``, and the run continues with a different optimizer
than the one that was checkpointed. These helpers write, next to the arrays, the
path, shape and dtype of every leaf, and :func:`restore_checkpoint` refuses a target
that differs in any of them, naming each difference, before restoring any array.

Guarantees (checkpoint format 2):

* **No lost step.** A save writes the new copy beside the old ones, in
  ``directory/<step>.lion_optax-saving``, and switches it in by renaming only once
  it is complete and checked; an overwrite first renames the old copy to
  ``<step>.lion_optax-replaced`` and deletes it only after the new copy is in place.
  Whatever instant a save is killed at, the newest previously saved state is on
  disk complete, and :func:`latest_step` and :func:`restore_checkpoint` find it
  (or the new state, if its save got as far as the switch) and restore it bit for
  bit. Files and renames are flushed with fsync before each switch, so this also
  holds across an operating-system crash or power loss on file systems that honour
  fsync; the tests check it by SIGKILL at random moments and at every rename.
* **No half-written step.** A step counts only once its manifest
  (``lion_optax_manifest.json``, written last, itself checksummed) exists and every
  file it lists is present with its recorded size. :func:`latest_step` returns only
  such steps; ``restore_checkpoint(step=None)`` falls back to the newest one (with a
  warning naming any newer step folder it passed over); asking for an incomplete
  step by number raises an error that says why it is incomplete. A manifest changed
  in any byte (unreadable, not UTF-8 JSON, failing its checksum, laid out otherwise,
  or with a field of the wrong type) makes its step damaged in the same way, never an
  exception from the reader. Leftover temporary folders of killed saves are ignored
  by readers and removed by the next save.
* **No silent corruption.** The manifest holds the SHA-256 of every file of the
  step. :func:`restore_checkpoint` recomputes them before using the files (one
  extra read of the checkpoint) and raises :class:`CheckpointCorruptError` naming
  each file that differs. Orbax has no such check of its own: OCDBT checksums
  its index (a flipped byte there is an error) but not the array bytes, and a
  flipped byte in an array data file restores silently as different numbers.
* **Failed saves leave nothing.** Leaves that cannot be stored are refused before
  anything is written; an error during the write removes the partial copy and
  leaves the earlier checkpoints as they were. Zero-size leaves are supported: they
  have no bytes, so only their shape and dtype are recorded and restore rebuilds
  them.

One process (one job) saves into a directory at a time. Other processes may
restore while it saves, except the very step being overwritten. In a multi-host
job every process calls :func:`save_checkpoint`; process 0 alone renames and
deletes folders, between barriers, and every process checks the files on restore.
Checkpoints of format 1 (lion_optax before manifests) are not restored: they
cannot be checked; restore them with the version that wrote them and save again.
A state field renamed since (``SkipNonfiniteState.skipped_steps``, now
``nonfinite_gradient_steps``) restores from a checkpoint that holds its old name.

Layout: ``directory/<step>/`` holds an orbax composite checkpoint with the items
``arrays`` (the leaves with at least one element, flattened; absent when there is
none) and ``lion_optax`` (a JSON description of the tree), plus the manifest.

Modules, one concept each; each imports only those above it:

* ``files``: durable file operations (fsync, atomic renames, deletion, SHA-256).
* ``manifest``: the format version and the manifest (write it, parse and check it
  without ever raising).
* ``tree``: how a pytree is stored (the description of its leaves, the array names).
* ``steps``: which steps a directory holds complete and where (incomplete, damaged
  and renamed-aside copies; the newest complete step; :func:`latest_step`).
* ``save``: :func:`save_checkpoint` (the staging copy, the switch by renames, the
  removal of what killed saves left).
* ``restore``: :func:`restore_checkpoint` and its errors (the checksums verified, the
  target compared with the saved description).

``lion_optax/checkpoint.py`` re-exports the public names; nothing else in lion_optax
imports these modules (the tests reach into ``manifest``, ``steps`` and ``files``).
"""
