"""Distributed Lion where it pays: wall-clock over a throttled link between processes.

Starts 2 processes (``--processes 4`` where the machine has the cores), one CPU
device each, joined by ``jax.distributed`` over loopback with gloo collectives,
inside a private network namespace that this script creates (``unshare -n``):
its loopback is the only link, set to ``mtu 1500`` and throttled with
``tc qdisc ... tbf rate R burst 256kb`` (both directions share that one
queue; ``netem`` is not needed). No traffic leaves the namespace.

At every link rate (100 Mbit/s, 1 Gbit/s, 10 Gbit/s and unthrottled), four
ways of training the same model on the same batches, their steps interleaved
(every method's step t, then every method's step t + 1), so a change of load
on the machine hits all of them alike:

* ``lion (all-reduce)``: data-parallel ``lion_optax.lion``, the gradient
  averaged with a float32 all-reduce (``jax.lax.pmean``);
* ``distributed lion (vote)`` and ``(average)``: ``lion_optax.distributed_lion``,
  a momentum per worker and only packed signs on the wire;
* ``adamw (all-reduce)``: ``optax.adamw`` with the same all-reduce;

and a ``gradient only (no communication)`` step (the model's forward and
backward pass and an SGD update, nothing sent): the floor under every step.

Models: the main job's digits MLP (scikit-learn's digits, LayerNorm, GELU)
made wide enough that communication matters: 8M parameters for the
end-to-end runs (validation loss against wall-clock seconds, and the seconds
to a fixed target loss, 0.2) and 32M for step times only (without AdamW).
Hyperparameters: AdamW peak lr 3e-4, decay 1e-2; Lion
``lion_optax.adamw_to_lion`` of them with factor 10; a warmup-cosine
schedule over the step budget. Per step: wall time
(median and quartiles of every timed step), bytes through the link (read
from the namespace's ``/proc/net/dev``: both directions, headers included)
and bytes sent per device (from the compiled HLO). A step's time excludes
the evaluations.

Slow cells are cut short: a method stops at a rate once its steps there have
taken a model's time cap (40 s for the 8M model, after at least 8 steps; 30 s
and 3 steps for the 32M one). The numbers do not
depend on the rate (the runs are bit for bit the same at every rate; the
benchmark checks it), so a cut run's seconds to the target are projected from
its loss curve at a rate where it ran to the end and its mean step time at
this rate, and marked as projected.

Run (as root, or where unprivileged user namespaces are allowed)::

    python -m benchmarks.slow_link             # about 14 minutes on 2 cores
    python -m benchmarks.slow_link --quick     # 8M only, 1 Gbit/s and free, under 2 minutes

Writes ``slow_link.json``, ``slow_link.md``, ``slow_link_loss.png`` (loss
against seconds, one panel per rate) and ``slow_link_step_time.png`` (step
time against rate) into ``--out`` (default ``results/slow_link/``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from . import _output

# The repository root: the processes this module starts (``python -m benchmarks.slow_link
# --namespace`` and ``--worker``) import it from there.
ROOT = pathlib.Path(__file__).resolve().parent.parent

ALL_REDUCE_LION = 'lion (all-reduce)'
VOTE = 'distributed lion (vote)'
AVERAGE = 'distributed lion (average)'
ADAMW = 'adamw (all-reduce)'
FLOOR = 'gradient only (no communication)'
METHODS = (ALL_REDUCE_LION, VOTE, AVERAGE, ADAMW)
RATES = ('100mbit', '1gbit', '10gbit', 'free')

# AdamW's peak learning rate and decay; Lion's are lion_optax.adamw_to_lion of them with
# factor 10 (Lion's lr 10x smaller, its decay 10x larger). Picked on the validation split
# for the 8M model and 150 steps: with AdamW lr 1e-3 or Lion factor 3 the 8M model
# overfits the 1078 training images within 50 steps (validation loss rising again).
ADAMW_LR, ADAMW_WD, LION_FACTOR = 3e-4, 1e-2, 10.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the run.

    Attributes:
      name: its name in tables and plots.
      hidden: the MLP's width (64-hidden-hidden-10).
      steps: the training budget (the schedule's length).
      end_to_end: evaluate on the validation split every ``eval_every`` steps
        (loss against seconds, seconds to the target); else step times only.
      floor_steps: timed steps of the gradient-only step at each rate (0: none).
      cap_seconds: a method stops at a rate once its steps there took this long...
      min_steps: ...but not before this many steps.
      methods: the methods to run (None: the config's).
    """

    name: str
    hidden: int
    steps: int
    end_to_end: bool
    floor_steps: int = 20
    cap_seconds: float = 40.0
    min_steps: int = 8
    methods: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; travels to the worker processes as JSON."""

    models: tuple[ModelSpec, ...]
    rates: tuple[str, ...] = RATES
    methods: tuple[str, ...] = METHODS
    processes: int = 2
    per_worker: int = 64
    eval_every: int = 5
    target_loss: float = 0.2
    burst: str = '256kb'
    mtu: int = 1500
    seed: int = 0
    progress: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw = json.loads(text)
        raw['models'] = tuple(
            ModelSpec(**{**m, 'methods': m['methods'] and tuple(m['methods'])})
            for m in raw['models']
        )
        for key in ('rates', 'methods'):
            raw[key] = tuple(raw[key])
        return cls(**raw)


def full_config(processes: int = 2) -> Config:
    """The full run (about 14 minutes on 2 cores)."""
    return Config(
        models=(
            ModelSpec('digits MLP, 8M params', 2800, steps=150, end_to_end=True),
            # Step times only, and without AdamW: its traffic is the same all-reduce as
            # Lion's (the 8M model has it), and at 100 Mbit/s each such step takes 20 s.
            ModelSpec(
                'digits MLP, 32M params',
                5600,
                steps=10,
                end_to_end=False,
                floor_steps=8,
                cap_seconds=30.0,
                min_steps=3,
                methods=(ALL_REDUCE_LION, VOTE, AVERAGE),
            ),
        ),
        processes=processes,
    )


def quick_config(processes: int = 2) -> Config:
    """The quick run (under 2 minutes on 2 cores): the 8M model at 1 Gbit/s and free."""
    return Config(
        models=(
            ModelSpec(
                'digits MLP, 8M params',
                2800,
                steps=40,
                end_to_end=True,
                floor_steps=10,
                cap_seconds=12.0,
                min_steps=6,
            ),
        ),
        rates=('1gbit', 'free'),
        processes=processes,
        target_loss=0.7,
    )


# ---------------------------------------------------------------------------
# The private network namespace.


def _unshare_command() -> list[str] | None:
    """``unshare -n`` as root, ``unshare -rn`` (a user namespace) otherwise."""
    if shutil.which('unshare') is None:
        return None
    return ['unshare', '-n'] if os.geteuid() == 0 else ['unshare', '-rn']


def namespace_problem() -> str | None:
    """None if a private network namespace with a throttled loopback can be made here.

    Returns:
      None, or a sentence saying what is missing and how to get it.
    """
    unshare = _unshare_command()
    missing = [tool for tool in ('unshare', 'ip', 'tc') if shutil.which(tool) is None]
    if unshare is None or missing:
        return (
            f'{", ".join(missing) or "unshare"} not found: the benchmark needs util-linux '
            '(unshare) and iproute2 (ip, tc), e.g. apt-get install util-linux iproute2.'
        )
    probe = 'ip link set lo up && ip link set lo mtu 1500 && tc qdisc add dev lo root tbf rate 1mbit burst 32kb latency 50ms'
    try:
        result = subprocess.run(
            [*unshare, 'sh', '-c', probe], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f'{" ".join(unshare)} could not run ({error}).'
    if result.returncode != 0:
        return (
            f'`{" ".join(unshare)}` with a tbf qdisc on its loopback failed '
            f'({(result.stderr or result.stdout).strip()[-300:]}): it needs root, or '
            'unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) and the '
            'sch_tbf kernel module.'
        )
    return None


def _link_bytes() -> int:
    """Bytes through this namespace's loopback so far (its only link; rx == tx)."""
    with open('/proc/net/dev') as f:
        for line in f:
            name, _, counters = line.partition(':')
            if name.strip() == 'lo':
                return int(counters.split()[0])
    raise RuntimeError('no loopback device in /proc/net/dev')


def _set_rate(rate: str, burst: str) -> None:
    """Throttles the loopback to ``rate`` (a tc rate such as ``1gbit``) or frees it."""
    subprocess.run(['tc', 'qdisc', 'del', 'dev', 'lo', 'root'], capture_output=True, check=False)
    if rate != 'free':
        subprocess.run(
            ['tc', 'qdisc', 'add', 'dev', 'lo', 'root', 'tbf', 'rate', rate, 'burst', burst]
            + ['latency', '50ms'],
            check=True,
            capture_output=True,
        )


def rate_bits_per_second(rate: str) -> float | None:
    """``'100mbit'`` -> 1e8; ``'free'`` -> None."""
    if rate == 'free':
        return None
    units = {'kbit': 1e3, 'mbit': 1e6, 'gbit': 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f'rate {rate!r}: expected a number with kbit, mbit or gbit, or "free".')


# ---------------------------------------------------------------------------
# The launcher: namespace -> processes -> raw results.


def run(config: Config, raw_path: pathlib.Path, timeout: float = 1800) -> dict[str, Any]:
    """Runs ``config`` in a new private network namespace; returns the raw results.

    Args:
      config: what to run.
      raw_path: where process 0 writes the raw results (JSON).
      timeout: seconds before the processes are killed.

    Returns:
      The raw results (``raw_path``'s contents).
    """
    problem = namespace_problem()
    if problem:
        raise RuntimeError(problem)
    raw_path = pathlib.Path(raw_path).resolve()
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.unlink(missing_ok=True)
    config_path = raw_path.with_suffix('.config.json')
    config_path.write_text(config.to_json())
    command = [*(_unshare_command() or []), *_this_module('--namespace')]
    # The workers inherit this environment, through the namespace's process.
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
    env['JAX_PLATFORMS'] = 'cpu'
    # A session of its own, so that a timeout ends the workers too (they share its group).
    namespace = subprocess.Popen(
        [*command, str(config_path), str(raw_path)], env=env, start_new_session=True
    )
    try:
        code = namespace.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(namespace.pid, signal.SIGKILL)
        namespace.wait()
        raise RuntimeError(
            f'the benchmark processes took more than {timeout:g} s and were stopped; '
            'see slow_link_process*.log next to the results.'
        ) from None
    if code != 0 or not raw_path.exists():
        raise RuntimeError(
            f'the benchmark processes failed (exit code {code}); process 0 printed its error '
            f'above, the others\' logs are {raw_path.parent}/slow_link_process*.log.'
        )
    return json.loads(raw_path.read_text())


def _this_module(*args: str) -> list[str]:
    """The command that runs this module with ``args`` in a new Python process."""
    return [sys.executable, '-m', __spec__.name, *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _in_namespace(config_path: str, raw_path: str) -> int:
    """Inside the new namespace: bring up its loopback, start the processes, wait."""
    config = Config.from_json(pathlib.Path(config_path).read_text())
    subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)
    subprocess.run(['ip', 'link', 'set', 'lo', 'mtu', str(config.mtu)], check=True)
    port = _free_port()
    logs, procs = [], []
    log_dir = pathlib.Path(raw_path).parent
    try:
        for pid in range(config.processes):
            log = open(log_dir / f'slow_link_process{pid}.log', 'w')  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    _this_module('--worker', config_path, raw_path, str(pid), str(port)),
                    stdout=None if pid == 0 else log,
                    stderr=None if pid == 0 else subprocess.STDOUT,
                )
            )
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if any(codes):
        for pid in range(1, config.processes):
            tail = (log_dir / f'slow_link_process{pid}.log').read_text()[-3000:]
            print(f'--- process {pid} (exit code {codes[pid]}) ---\n{tail}', file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# A worker process.


def _worker(config_path: str, raw_path: str, pid: int, port: int) -> None:
    config = Config.from_json(pathlib.Path(config_path).read_text())
    import jax

    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', 1)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=f'127.0.0.1:{port}',
        num_processes=config.processes,
        process_id=pid,
        initialization_timeout=120,
    )
    try:
        raw = _Worker(config, pid).run()
    finally:
        jax.distributed.shutdown()
    if pid == 0:
        pathlib.Path(raw_path).write_text(json.dumps(raw))


class _Worker:
    """The experiments one process runs (every process runs the same program)."""

    def __init__(self, config: Config, pid: int):
        import jax
        import numpy as np

        from .main_job import _data

        self.config, self.pid = config, pid
        self.mesh = jax.make_mesh((jax.device_count(),), ('data',))
        splits = _data.load_digits_splits()
        self.train = splits['train']
        self.val = tuple(jax.device_put(a, jax.local_devices()[0]) for a in splits['val'])
        self.np = np
        self.bar = None

    # --- building blocks ----------------------------------------------------

    def _sample(self, step: int, seed: int):
        """This process's batch of ``step``: the same on every rate and method."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        np = self.np
        x, y = self.train
        batch = self.config.per_worker * self.config.processes
        idx = np.random.default_rng([seed, step]).choice(len(y), size=batch, replace=False)
        mine = idx[self.pid * self.config.per_worker : (self.pid + 1) * self.config.per_worker]
        sharding = NamedSharding(self.mesh, P('data'))
        return (
            jax.make_array_from_process_local_data(sharding, x[mine]),
            jax.make_array_from_process_local_data(sharding, y[mine]),
        )

    def _optimizer(self, method: str, steps: int):
        import optax

        import lion_optax

        from .main_job import _models, _optimizers

        lion_lr, lion_wd = lion_optax.adamw_to_lion(ADAMW_LR, ADAMW_WD, factor=LION_FACTOR)
        shape = _optimizers.schedule_shape(steps)

        def schedule(peak):
            return lambda count: peak * shape(count)

        mask = _models.decay_mask
        if method == ADAMW:
            return optax.adamw(schedule(ADAMW_LR), weight_decay=ADAMW_WD, mask=mask)
        if method == ALL_REDUCE_LION:
            return lion_optax.lion(schedule(lion_lr), weight_decay=lion_wd, mask=mask)
        kind = {VOTE: 'vote', AVERAGE: 'average'}[method]
        return lion_optax.distributed_lion(
            schedule(lion_lr), weight_decay=lion_wd, mask=mask, axis_name='data', method=kind
        )

    def _build(self, method: str, spec: ModelSpec, graphdef, host, params0):
        """(compiled step, a maker of its initial state, HLO bytes per device) of ``method``."""
        import jax
        import optax
        from jax.sharding import PartitionSpec as P

        import lion_optax

        from .main_job import _models

        np = self.np
        if method == FLOOR:
            return self._build_floor(graphdef, params0)

        loss_fn = functools.partial(_models.loss, graphdef)
        tx = self._optimizer(method, spec.steps)
        if method in (VOTE, AVERAGE):

            def fresh_state():
                return lion_optax.distributed_init(tx, params0, self.mesh)[0]

            specs = lion_optax.distributed_init(tx, params0, self.mesh)[1]
        else:
            host_state = jax.device_get(tx.init(jax.tree.map(np.asarray, host)))

            def fresh_state():
                return self._replicate(host_state)

            specs = jax.tree.map(lambda _: P(), host_state)
        all_reduce = method in (ALL_REDUCE_LION, ADAMW)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        @functools.partial(
            jax.shard_map,
            mesh=self.mesh,
            in_specs=(P(), specs, P('data'), P('data')),
            out_specs=(P(), specs, P('data')),
        )
        def step(params, state, x, y):
            local = jax.lax.pcast(params, 'data', to='varying')
            loss, grads = jax.value_and_grad(loss_fn)(local, x, y)
            if all_reduce:
                grads = jax.lax.pmean(grads, 'data')  # the float32 gradient all-reduce
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss[None]

        x, y = self._sample(0, self.config.seed)
        compiled = step.lower(params0, fresh_state(), x, y).compile()
        return compiled, fresh_state, lion_optax.hlo.bytes_sent_per_device(compiled)

    def _build_floor(self, graphdef, params0):
        """The gradient and an SGD-like update per worker, no collective at all."""
        import jax
        from jax.sharding import PartitionSpec as P

        from .main_job import _models

        loss_fn = functools.partial(_models.loss, graphdef)
        specs = jax.tree.map(lambda _: P('data'), params0)

        @functools.partial(jax.jit, donate_argnums=(0,))
        @functools.partial(
            jax.shard_map,
            mesh=self.mesh,
            in_specs=(specs, P(), P('data'), P('data')),
            out_specs=(specs, P('data')),
        )
        def step(params, lr, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss[None]

        import lion_optax

        x, y = self._sample(0, self.config.seed)
        compiled = step.lower(self._per_worker_copy(params0), self.np.float32(0.0), x, y).compile()
        return compiled, None, lion_optax.hlo.bytes_sent_per_device(compiled)

    def _per_worker_copy(self, params):
        """Each worker's own copy of ``params``, stacked along the data axis."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        np = self.np
        n = self.config.processes

        def stack(leaf):
            local = np.asarray(leaf.addressable_data(0))
            return jax.make_array_from_process_local_data(
                NamedSharding(self.mesh, P('data')), local, (n * local.shape[0], *local.shape[1:])
            )

        return jax.tree.map(stack, params)

    def _params0(self, spec: ModelSpec):
        """The initial parameters (from the seed), replicated on every device."""
        import jax

        from .main_job import _models

        make = functools.partial(_models.MLP, spec.hidden, 10)
        graphdef = _models.graph_definition(make)
        init = jax.jit(functools.partial(_models.init_params, make))  # on this process's device
        host = jax.device_get(init(jax.random.key(self.config.seed)))
        return graphdef, host, self._replicate(host)

    def _replicate(self, host_tree):
        """Host arrays as global arrays replicated on every device."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(
                self.np.shape(a), sharding, lambda i, a=a: self.np.asarray(a)[i]
            ),
            host_tree,
        )

    def _evaluator(self, graphdef):
        import jax

        from .main_job import _models

        return jax.jit(functools.partial(_models.loss_and_accuracy, graphdef))

    def _fresh(self, host_params, fresh_state):
        """Fresh replicated parameters and initial state (every step donates them)."""
        return self._replicate(host_params), fresh_state()

    def _digest(self, params) -> str:
        h = hashlib.sha256()
        for leaf in __import__('jax').tree.leaves(params):
            h.update(self.np.asarray(leaf.addressable_data(0)).tobytes())
        return h.hexdigest()[:16]

    def _agree(self, flags: list[bool]) -> list[bool]:
        """Process 0's decisions, on every process (so all run the same collectives)."""
        from jax.experimental import multihost_utils

        return [bool(v) for v in multihost_utils.broadcast_one_to_all(self.np.asarray(flags))]

    def _barrier(self, name: str) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

    # --- the experiment -------------------------------------------------------

    def _methods(self, spec: ModelSpec) -> tuple[str, ...]:
        methods = spec.methods or self.config.methods
        return (*methods, FLOOR) if spec.floor_steps else methods

    def run(self) -> dict[str, Any]:
        import jax

        config = self.config
        raw: dict[str, Any] = {
            'config': dataclasses.asdict(config),
            'machine': _output.machine(),
            'processes': jax.process_count(),
            'devices': jax.device_count(),
            'date': time.strftime('%Y-%m-%d %H:%M %Z'),
            'models': [],
        }
        if self.pid == 0 and config.progress:
            from tqdm import tqdm

            total = sum(
                len(config.rates) * (len(m.methods or config.methods) * m.steps + m.floor_steps)
                for m in config.models
            )
            self.bar = tqdm(
                total=total, unit='step', desc='slow link', file=sys.stderr, mininterval=2.0
            )
        start = time.perf_counter()
        for spec in config.models:
            raw['models'].append(self._model(spec))
        raw['wall_seconds'] = time.perf_counter() - start
        raw['load_average_at_end'] = _output.load_average()
        if self.bar is not None:
            self.bar.close()
        return raw

    def _model(self, spec: ModelSpec) -> dict[str, Any]:
        import jax

        config, np = self.config, self.np
        graphdef, host, params0 = self._params0(spec)
        evaluate = self._evaluator(graphdef)
        num_params = int(sum(a.size for a in jax.tree.leaves(host)))
        built = {}
        for method in self._methods(spec):
            built[method] = self._build(method, spec, graphdef, host, params0)
        model: dict[str, Any] = {
            'spec': dataclasses.asdict(spec),
            'num_params': num_params,
            'hlo_bytes_per_device': {m: b[2] for m, b in built.items()},
            'cells': [],
        }
        # One untimed step of each method first: first calls set up buffers and connections.
        for method, (step, state0, _) in built.items():
            x, y = self._sample(0, config.seed)
            if method == FLOOR:
                out = step(self._per_worker_copy(params0), np.float32(0.0), x, y)
            else:
                out = step(*self._fresh(host, state0), x, y)
            jax.block_until_ready(out)
        for rate in config.rates:
            if self.pid == 0:
                _set_rate(rate, config.burst)
            self._barrier(f'{spec.name} {rate}')
            model['cells'] += self._rate(spec, rate, built, host, params0, evaluate)
        return model

    def _rate(self, spec, rate, built, host, params0, evaluate) -> list[dict[str, Any]]:
        import jax

        config, np = self.config, self.np
        cells = {}
        for method in self._methods(spec):
            step, state0, _ = built[method]
            if method == FLOOR:
                params, state = self._per_worker_copy(params0), None
            else:
                params, state = self._fresh(host, state0)
            cells[method] = {
                'method': method,
                'rate': rate,
                'params': params,
                'state': state,
                'step': step,
                'planned': spec.floor_steps if method == FLOOR else spec.steps,
                'seconds': [],
                'link_bytes': [],
                'eval_steps': [],
                'val_loss': [],
                'val_accuracy': [],
                'train_loss': [],
                'cut': False,
            }
        active = list(cells)
        t = 0
        while active:
            for method in active:
                cell = cells[method]
                x, y = self._sample(t, config.seed)
                before = _link_bytes()
                start = time.perf_counter()
                if method == FLOOR:
                    cell['params'], loss = cell['step'](cell['params'], np.float32(0.0), x, y)
                else:
                    cell['params'], cell['state'], loss = cell['step'](
                        cell['params'], cell['state'], x, y
                    )
                jax.block_until_ready(cell['params'])
                cell['seconds'].append(time.perf_counter() - start)
                cell['link_bytes'].append(_link_bytes() - before)
                cell['train_loss'].append(float(np.asarray(loss.addressable_data(0))[0]))
                done = t + 1
                if spec.end_to_end and method != FLOOR:
                    if done % config.eval_every == 0 or done == cell['planned']:
                        local = jax.tree.map(lambda a: a.addressable_data(0), cell['params'])
                        loss_val, acc = evaluate(local, *self.val)
                        cell['eval_steps'].append(done)
                        cell['val_loss'].append(float(loss_val))
                        cell['val_accuracy'].append(float(acc))
            # Which methods stop now: process 0 decides, every process follows.
            stop = []
            for method in active:
                cell = cells[method]
                n = len(cell['seconds'])
                over = sum(cell['seconds']) > spec.cap_seconds and n >= spec.min_steps
                stop.append(n >= cell['planned'] or over)
            stop = self._agree(stop)
            for method, finished in zip(list(active), stop):
                if finished:
                    cell = cells[method]
                    cell['cut'] = len(cell['seconds']) < cell['planned']
                    if self.bar is not None:
                        self.bar.update(cell['planned'] - len(cell['seconds']))
                    active.remove(method)
            if self.bar is not None:
                self.bar.update(len(active) + sum(stop))
                self.bar.set_postfix_str(f'{spec.name}, {rate}', refresh=False)
            t += 1
        out = []
        for method, cell in cells.items():
            digest = self._digest(cell['params']) if method != FLOOR else ''
            for key in ('params', 'state', 'step'):
                del cell[key]
            cell['params_digest'] = digest
            out.append(cell)
        return out


# ---------------------------------------------------------------------------
# The report: summary, table, plots.


def _first_reached(cell: dict[str, Any], target: float) -> int | None:
    """The first evaluated step at which the validation loss is at most ``target``."""
    for step, loss in zip(cell['eval_steps'], cell['val_loss']):
        if loss <= target:
            return step
    return None


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per model, rate and method: step time, bytes, seconds to the target; the goals.

    Args:
      raw: the workers' results (:func:`run`).

    Returns:
      A summary: ``models`` (one table of cells each) and ``goals``.
    """
    import numpy as np

    config = raw['config']
    target = config['target_loss']
    summary: dict[str, Any] = {'target_loss': target, 'models': []}
    for model in raw['models']:
        cells = model['cells']
        by = {(c['rate'], c['method']): c for c in cells}
        # Steps to the target from a run that was not cut (the same numbers at every rate).
        steps_to_target: dict[str, int | None] = {}
        identical: dict[str, bool] = {}
        for method in model['spec']['methods'] or config['methods']:
            full = [c for c in cells if c['method'] == method and not c['cut']]
            steps_to_target[method] = _first_reached(full[0], target) if full else None
            digests = {c['params_digest'] for c in full}
            curves = [c for c in cells if c['method'] == method]
            same_prefix = all(
                c['val_loss'] == curves[0]['val_loss'][: len(c['val_loss'])]
                or curves[0]['val_loss'] == c['val_loss'][: len(curves[0]['val_loss'])]
                for c in curves
            )
            identical[method] = len(digests) <= 1 and same_prefix
        rows = []
        for cell in cells:
            median, q1, q3 = _output.quartiles(cell['seconds'])
            seconds = float(np.sum(cell['seconds']))
            link = float(np.sum(cell['link_bytes']))
            row = {
                'rate': cell['rate'],
                'method': cell['method'],
                'steps': len(cell['seconds']),
                'cut': cell['cut'],
                'step_ms': 1e3 * median,
                'step_ms_q1': 1e3 * q1,
                'step_ms_q3': 1e3 * q3,
                'hlo_bytes_per_device': model['hlo_bytes_per_device'][cell['method']],
                'link_bytes_per_step': link / len(cell['seconds']),
                'link_megabits_per_second': 8 * link / seconds / 1e6,
            }
            if model['spec']['end_to_end'] and cell['method'] != FLOOR:
                reached = _first_reached(cell, target)
                if reached is not None:
                    row['seconds_to_target'] = float(np.sum(cell['seconds'][:reached]))
                    row['steps_to_target'] = reached
                    row['projected'] = False
                elif steps_to_target[cell['method']] is not None:
                    steps = steps_to_target[cell['method']]
                    row['seconds_to_target'] = steps * seconds / len(cell['seconds'])
                    row['steps_to_target'] = steps
                    row['projected'] = True
                final = [c for c in cells if c['method'] == cell['method'] and not c['cut']]
                if final:
                    row['final_val_loss'] = final[0]['val_loss'][-1]
                    row['final_val_accuracy'] = final[0]['val_accuracy'][-1]
            rows.append(row)
        for row in rows:
            base = by.get((row['rate'], ALL_REDUCE_LION))
            mine = by[(row['rate'], row['method'])]
            if base is not None:
                # Round by round (step t of every method ran back to back), then the
                # median: robust to the machine's load changing during the run.
                rounds = min(len(base['seconds']), len(mine['seconds']))
                ratios = np.asarray(base['seconds'][:rounds]) / np.asarray(mine['seconds'][:rounds])
                median, q1, q3 = _output.quartiles(ratios)
                row['speedup_vs_all_reduce_lion'] = median
                row['speedup_q1'], row['speedup_q3'] = q1, q3
        summary['models'].append(
            {
                'name': model['spec']['name'],
                'num_params': model['num_params'],
                'end_to_end': model['spec']['end_to_end'],
                'steps': model['spec']['steps'],
                'cap_seconds': model['spec']['cap_seconds'],
                'min_steps': model['spec']['min_steps'],
                'identical_across_rates': identical,
                'steps_to_target': steps_to_target,
                'rows': rows,
            }
        )
    summary['goals'] = _goals(summary)
    return summary


def _goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's goals for the vote, each with its numbers and whether it holds."""
    goals = []
    for model in summary['models']:
        row = {(r['rate'], r['method']): r for r in model['rows']}

        def get(rate, method, key, row=row):
            return row.get((rate, method), {}).get(key)

        name = model['name']
        vote_free, lion_free = get('free', VOTE, 'step_ms'), get('free', ALL_REDUCE_LION, 'step_ms')
        if vote_free and lion_free:
            goals.append(
                {
                    'model': name,
                    'goal': 'free link: the vote step no slower than the all-reduce Lion step',
                    'value': f'{vote_free:.0f} vs {lion_free:.0f} ms',
                    'holds': vote_free <= lion_free,
                }
            )
        vote_1g, lion_1g = get('1gbit', VOTE, 'step_ms'), get('1gbit', ALL_REDUCE_LION, 'step_ms')
        speedup = get('1gbit', VOTE, 'speedup_vs_all_reduce_lion')
        if vote_1g and lion_1g and speedup:
            goals.append(
                {
                    'model': name,
                    'goal': '1 Gbit/s: the vote step at least 5x faster than the all-reduce Lion',
                    'value': f'{speedup:.1f}x [{get("1gbit", VOTE, "speedup_q1"):.1f}, '
                    f'{get("1gbit", VOTE, "speedup_q3"):.1f}] per round (medians {vote_1g:.0f} '
                    f'vs {lion_1g:.0f} ms)',
                    'holds': speedup >= 5,
                }
            )
        if vote_1g and lion_free:
            goals.append(
                {
                    'model': name,
                    'goal': '1 Gbit/s: the vote step within 1.2x of the free-link all-reduce Lion step',
                    'value': f'{vote_1g / lion_free:.2f}x ({vote_1g:.0f} vs {lion_free:.0f} ms)',
                    'holds': vote_1g <= 1.2 * lion_free,
                }
            )
        vote_t, lion_t = (
            get('1gbit', VOTE, 'seconds_to_target'),
            get('1gbit', ALL_REDUCE_LION, 'seconds_to_target'),
        )
        if model['end_to_end'] and ('1gbit', VOTE) in row:
            projected = get('1gbit', ALL_REDUCE_LION, 'projected')
            goals.append(
                {
                    'model': name,
                    'goal': '1 Gbit/s end to end: the vote reaches the target in at least 3x less '
                    'wall-clock than the all-reduce Lion',
                    'value': (
                        f'{lion_t / vote_t:.1f}x ({vote_t:.1f} vs {lion_t:.1f} s'
                        f'{", all-reduce projected" if projected else ""})'
                        if vote_t and lion_t
                        else f'not reached (vote: {vote_t}, all-reduce Lion: {lion_t})'
                    ),
                    'holds': bool(vote_t and lion_t and lion_t >= 3 * vote_t),
                }
            )
    return goals


def _rate_label(rate: str) -> str:
    return {'100mbit': '100 Mbit/s', '1gbit': '1 Gbit/s', '10gbit': '10 Gbit/s'}.get(
        rate, 'unthrottled' if rate == 'free' else rate
    )


def _speed(row: dict[str, Any]) -> str:
    return (
        f'{row["speedup_vs_all_reduce_lion"]:.2f}x [{row["speedup_q1"]:.2f}, '
        f'{row["speedup_q3"]:.2f}]'
    )


def markdown(raw: dict[str, Any], summary: dict[str, Any], command: str) -> str:
    """The report as markdown: the machine, the command, one table per model, the goals."""
    config = raw['config']
    blocks = [
        '# Distributed Lion on a slow link',
        f'{_output.machine_line(raw["machine"])} Load average at the end: '
        f'{tuple(round(x, 2) for x in raw["load_average_at_end"])}. Date: {raw["date"]}.',
        f'Command: `{command}` ({raw["wall_seconds"] / 60:.1f} minutes). '
        f'{raw["processes"]} processes, one CPU device each, `jax.distributed` over the '
        f'loopback of a private network namespace (gloo collectives), `mtu {config["mtu"]}`, '
        f'throttled with `tc tbf rate R burst {config["burst"]} latency 50ms` (both directions '
        f'share the one queue). {config["per_worker"]} examples per worker and step. Step time: '
        'median [quartiles] of every timed step, methods interleaved step by step; '
        '"link MB/step" is what went through the link (both directions, headers included), '
        '"HLO MB/device" what the compiled step sends per device. A method stops at a rate '
        'after a time cap (below, per model) once it has run a minimum of steps; '
        '"projected" seconds to the target are its steps to the target (the same at every '
        'rate: the runs are bit for bit identical) times its mean step time at that rate.',
    ]
    for model in summary['models']:
        e2e = model['end_to_end']
        header = ['rate', 'method', 'steps', 'ms/step [quartiles]']
        header += ['speed-up vs all-reduce Lion, per round [quartiles]', 'link MB/step']
        header += ['link Mbit/s', 'HLO MB/device']
        if e2e:
            header += [f's to val loss {summary["target_loss"]:g}', 'final val loss']
        rows = []
        for r in model['rows']:
            speed = r.get('speedup_vs_all_reduce_lion')
            row = [
                _rate_label(r['rate']),
                r['method'],
                f'{r["steps"]}{" (cut)" if r["cut"] else ""}',
                f'{r["step_ms"]:.0f} [{r["step_ms_q1"]:.0f}, {r["step_ms_q3"]:.0f}]',
                '' if speed is None or r['method'] == FLOOR else _speed(r),
                f'{r["link_bytes_per_step"] / 1e6:.2f}',
                f'{r["link_megabits_per_second"]:.0f}',
                f'{r["hlo_bytes_per_device"] / 1e6:.2f}',
            ]
            if e2e:
                if 'seconds_to_target' in r:
                    seconds = f'{r["seconds_to_target"]:.1f} ({r["steps_to_target"]} steps'
                    seconds += ', projected)' if r['projected'] else ')'
                else:
                    seconds = '' if r['method'] == FLOOR else 'not reached'
                final = r.get('final_val_loss')
                row += [seconds, '' if final is None else f'{final:.3f}']
            rows.append(row)
        same = all(model['identical_across_rates'].values())
        blocks += [
            f'## {model["name"]} ({model["num_params"]:,} parameters, '
            f'{model["steps"]} steps{"" if e2e else ", step time only"})',
            f'Cap: {model["cap_seconds"]:g} s of steps per method and rate, at least '
            f'{model["min_steps"]} steps.',
            _output.markdown_table(header, rows),
            f'Identical numbers at every rate (final parameters and loss curves): {same}.',
        ]
    goals = [
        [g['model'], g['goal'], g['value'], 'yes' if g['holds'] else 'no'] for g in summary['goals']
    ]
    blocks += [
        '## Goals (issue 19)',
        _output.markdown_table(['model', 'goal', 'measured', 'holds'], goals),
    ]
    return _output.document(*blocks)


STYLES = {
    ALL_REDUCE_LION: dict(color='tab:blue', marker='o', linestyle='-'),
    VOTE: dict(color='tab:orange', marker='^', linestyle='-'),
    AVERAGE: dict(color='tab:green', marker='v', linestyle='-.'),
    ADAMW: dict(color='black', marker='s', linestyle='--'),
    FLOOR: dict(color='tab:gray', marker='.', linestyle=':'),
}


def plot_loss(raw: dict[str, Any], summary: dict[str, Any]) -> Any:
    """Validation loss against training seconds, one panel per rate (end-to-end model).

    None when no model ran end to end.
    """
    import numpy as np
    from matplotlib import ticker
    from matplotlib.figure import Figure

    models = [(m, s) for m, s in zip(raw['models'], summary['models']) if s['end_to_end']]
    if not models:
        return None
    model, info = models[0]
    rates = raw['config']['rates']
    fig = Figure(figsize=(4.2 * len(rates), 4), dpi=110, layout='constrained')
    axes = fig.subplots(1, len(rates), squeeze=False, sharey=True)[0]
    full = {
        c['method']: c for c in model['cells'] if not c['cut'] and c['method'] != FLOOR
    }
    for ax, rate in zip(axes, rates):
        for cell in model['cells']:
            if cell['rate'] != rate or cell['method'] == FLOOR:
                continue
            elapsed = np.cumsum(cell['seconds'])
            steps = np.asarray(cell['eval_steps'])
            ax.plot(elapsed[steps - 1], cell['val_loss'], label=cell['method'],
                    markersize=3, **STYLES[cell['method']])
            if cell['cut'] and cell['method'] in full:
                mean = float(np.mean(cell['seconds']))
                ref = full[cell['method']]
                later = np.asarray(ref['eval_steps']) > len(cell['seconds'])
                ax.plot(np.asarray(ref['eval_steps'])[later] * mean,
                        np.asarray(ref['val_loss'])[later], alpha=0.4,
                        color=STYLES[cell['method']]['color'], linestyle=':')
        ax.axhline(summary['target_loss'], color='red', linewidth=0.8, alpha=0.6)
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
        ax.set_title(_rate_label(rate))
        ax.set_xlabel('training seconds (evaluations excluded)')
        ax.grid(True, which='both', alpha=0.3)
    axes[0].set_ylabel('validation cross-entropy')
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f'{info["name"]}, {raw["processes"]} processes over a throttled loopback '
        '(dotted: projected from the same run at another rate; red: target)',
        fontsize=10,
    )
    return fig


def plot_step_time(raw: dict[str, Any], summary: dict[str, Any]) -> Any:
    """Median step time (quartile bars) against the link rate, one panel per model."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    rates = raw['config']['rates']
    fig = Figure(figsize=(5.5 * len(summary['models']), 4.2), dpi=110, layout='constrained')
    axes = fig.subplots(1, len(summary['models']), squeeze=False)[0]
    for ax, model in zip(axes, summary['models']):
        for method in (*METHODS, FLOOR):
            rows = {r['rate']: r for r in model['rows'] if r['method'] == method}
            xs = [i for i, rate in enumerate(rates) if rate in rows]
            med = [rows[rates[i]]['step_ms'] for i in xs]
            low = [rows[rates[i]]['step_ms'] - rows[rates[i]]['step_ms_q1'] for i in xs]
            high = [rows[rates[i]]['step_ms_q3'] - rows[rates[i]]['step_ms'] for i in xs]
            ax.errorbar(xs, med, yerr=[low, high], capsize=3, label=method, **STYLES[method])
        ax.set_xticks(range(len(rates)), [_rate_label(r) for r in rates])
        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel('ms per step (median, quartiles)')
        ax.set_title(f'{model["name"]}', fontsize=10)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'{raw["processes"]} processes, step time against link rate', fontsize=10)
    return fig


def print_table(summary: dict[str, Any]) -> None:
    for model in summary['models']:
        print(f'\n{model["name"]} ({model["num_params"]:,} params)')
        header = f'{"rate":>11s} {"method":34s} {"ms/step [quartiles]":>22s} {"speed-up":>8s} {"link MB/step":>12s} {"s to target":>16s}'
        print(header)
        print('-' * len(header))
        for r in model['rows']:
            speed = r.get('speedup_vs_all_reduce_lion')
            target = ''
            if 'seconds_to_target' in r:
                target = f'{r["seconds_to_target"]:.1f}{" (proj.)" if r["projected"] else ""}'
            ms = f'{r["step_ms"]:.0f} [{r["step_ms_q1"]:.0f}, {r["step_ms_q3"]:.0f}]'
            print(
                f'{_rate_label(r["rate"]):>11s} {r["method"]:34s} {ms:>22s} '
                f'{"" if speed is None or r["method"] == FLOOR else f"{speed:.2f}x":>8s} '
                f'{r["link_bytes_per_step"] / 1e6:12.2f} {target:>16s}'
            )
    print('\nGoals of issue 19:')
    for g in summary['goals']:
        print(f'  [{"yes" if g["holds"] else " no"}] {g["model"]}: {g["goal"]}: {g["value"]}')


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--namespace']:
        sys.exit(_in_namespace(argv[1], argv[2]))
    if argv[:1] == ['--worker']:
        _worker(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return {}
    parser = _output.parser('slow_link', __doc__, out='results/slow_link')
    parser.add_argument('--quick', action='store_true', help='8M only, 1 Gbit/s and free (< 3 min)')
    parser.add_argument('--processes', type=int, default=2, help='2, or 4 where the machine allows')
    parser.add_argument('--rates', default=None, help='comma-separated tc rates and/or "free"')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    config = (quick_config if args.quick else full_config)(args.processes)
    changes: dict[str, Any] = {'progress': not args.no_progress}
    if args.rates:
        changes['rates'] = tuple(args.rates.split(','))
        for rate in changes['rates']:
            rate_bits_per_second(rate)
    config = dataclasses.replace(config, **changes)
    raw = run(config, args.out / 'slow_link_raw.json')
    summary = summarize(raw)
    command = ' '.join(['python', '-m', __spec__.name, *argv])
    print_table(summary)
    files = {
        'slow_link.json': {'summary': summary, 'raw': raw},
        'slow_link.md': lambda: markdown(raw, summary, command),
        'slow_link_loss.png': lambda: plot_loss(raw, summary),
        'slow_link_step_time.png': lambda: plot_step_time(raw, summary),
    }
    _output.write(args.out, files, indent=1, echo=False)
    return summary


if __name__ == '__main__':
    main()
