"""lion_optax's benchmarks, run from the repository root as ``python -m benchmarks.NAME``.

Each writes its report (a machine line, markdown tables, JSON and a PNG, by ``_output``)
into the folder ``--out`` names; ``--quick`` is a short run where a script has one.

* ``main_job`` (a subpackage): Lion against AdamW on real tasks, every optimizer tuned
  by the same protocol;
* ``step_speed``, ``compile_time``: one jitted step's time and memory, and its compile
  time, against ``optax.lion``;
* ``memory_at_scale``: the optimizer state's bytes per device of a 1B-parameter GPT;
* ``momentum_precision_digits``: float32, bfloat16 and int8 momentum on digits;
* ``distributed_lion``, ``slow_link``: Distributed Lion on simulated devices, and over a
  throttled link between processes;
* ``accelerator_step``: the step compiled ahead of time for TPU and GPU.

``benchmarks/reference/`` holds reference outputs. The package is not part of the
wheel (``pyproject.toml`` packages ``lion_optax`` only).
"""
