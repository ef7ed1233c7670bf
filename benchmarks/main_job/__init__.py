"""The main job: Lion against AdamW on real tasks, every optimizer tuned by the same protocol.

Run it from the repository root as ``python -m benchmarks.main_job`` (``--quick``: the
same protocol, smaller). ``job`` holds its sizes and command line; its helpers:

* ``_data``: the digits and the ``pydoc_data`` text, split for training, tuning and test;
* ``_models``: the models (Flax NNX) as pure parameter trees, their loss, the decay mask;
* ``_tasks``: the problems (data, model, budget, target);
* ``_optimizers``: the contestants and their hyperparameters;
* ``_training``: the jitted training loop;
* ``_protocol``: tuning, evaluation on paired seeds, batch-size sweeps;
* ``_report``: summaries, paired differences, tables and ``report.md``;
* ``_plots``: ``curves.png`` and ``batch_sweep.png``.

``_data`` and ``_models`` also serve the other benchmarks that train on digits.
Nothing is imported here, so that importing one helper does not import the job.
"""
