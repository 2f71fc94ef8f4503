"""``accord.lightning.AccordStrategy``: every accord algorithm as a PyTorch Lightning strategy.

::

    from accord.lightning import AccordStrategy
    trainer = lightning.Trainer(strategy=AccordStrategy("acga", momentum=0.99), devices=2)

A subclass of Lightning's ``DDPStrategy`` (the same launchers, cluster environments,
``timeout``, ``process_group_backend``, ...), so one line of a Lightning script changes.
Needs ``pip install 'accord[lightning]'``.

Decisions:

* **Gradient-phase algorithms** (``allreduce``, ``normalized``, ``acga``, ``adasum``) run
  as DDP communication hooks (:func:`accord.ddp_hook`), registered on CPU and GPU alike
  (Lightning's own ``ddp_comm_hook`` argument is registered only on CUDA). Gradient
  accumulation uses DDP's ``no_sync`` as usual: the hook runs once per optimizer step.
* **Model-phase algorithms** (every other one, including the asynchronous ones on the
  background engine) do not wrap the module in DDP at all: no gradient allreduce, no
  per-forward buffer broadcast (the algorithm averages floating-point buffers itself).
  The aggregator is built on the module's parameters and buffers (rank 0's values are
  broadcast when it is built, as DDP would) and its ``after_step`` runs in
  ``optimizer_step``, which Lightning calls once per real optimizer step (never on
  accumulation batches), for automatic and manual optimization alike. One optimizer
  only: more would call the aggregator more than once per step (refused at setup).
* **Steps.** The strategy counts the optimizer steps it has run (``accord_steps``); the
  count is the ``StepContext.step`` an algorithm's periods and warm-ups use, and it is
  checkpointed. The loss handed to loss-aware algorithms (LSGD) is what the optimizer
  step returned (the training step's loss under automatic optimization).
* **Checkpoints keep every replica.** Lightning writes rank 0's module and optimizer
  state only; under model-phase algorithms the replicas (and their optimizer states)
  differ. ``save_checkpoint`` therefore gathers, on every rank (it is collective, as
  ``Trainer.save_checkpoint`` already is), each rank's module state, optimizer states
  and aggregator state into ``checkpoint["accord"]``, and rank 0 writes it. On
  ``fit(ckpt_path=...)`` each rank's ``load_checkpoint`` swaps its own module and
  optimizer states into the dictionary Lightning restores from, and the aggregator
  state is loaded once the aggregator exists; the initial broadcast is skipped on a
  resume. A checkpoint from another algorithm or world size is refused with one line.
  Gradient-phase algorithms keep identical replicas and store rank 0's state once.
* **Metrics.** Every ``log_every_n_steps`` optimizer steps the aggregator's ``metrics()``
  and its communicated bytes go to the trainer's loggers as ``accord/<name>`` (rank 0,
  through ``logger.log_metrics``, so they appear next to the module's own metrics).
* **Consensus evaluation.** Under model-phase algorithms, validation during ``fit`` runs on
  the consensus model: the algorithm's centre (EASGD) or the mean of the replicas,
  swapped in on every rank at ``on_validation_start`` and swapped back at
  ``on_validation_end`` (``consensus_eval=False`` keeps each rank's replica). Outside
  ``fit`` (``trainer.validate`` / ``test``) the module is evaluated as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from ._extras import require
from .algorithms import get as get_algorithm
from .algorithms import validate
from .comm import Communicator, FlatBuffer
from .core import Aggregator, StepContext
from .ddp_hooks import HOOK_ALGORITHMS, ddp_hook
from .train import state_tensors

_pl = require("lightning.pytorch", "lightning")
DDPStrategy = _pl.strategies.DDPStrategy

__all__ = ["AccordStrategy"]

#: options of DDPStrategy that AccordStrategy passes through; every other keyword is an
#: accord hyperparameter
_STRATEGY_OPTIONS = ("accelerator", "parallel_devices", "cluster_environment",
                     "checkpoint_io", "precision_plugin", "process_group_backend", "timeout",
                     "start_method")


class AccordStrategy(DDPStrategy):
    """A Lightning DDP strategy whose aggregation is an accord algorithm; see the module
    docstring. ``algo`` and keyword hyperparameters as for :func:`accord.build`;
    ``ddp_kwargs`` go to ``DistributedDataParallel`` (gradient-phase algorithms); the
    options of ``DDPStrategy`` (``timeout``, ``process_group_backend``, ``start_method``,
    ...) are accepted by name."""

    strategy_name = "accord"

    def __init__(
        self,
        algo: str,
        *,
        consensus_eval: bool = True,
        ddp_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        options = {k: kwargs.pop(k) for k in _STRATEGY_OPTIONS if k in kwargs}
        # checked here, in the process that builds the Trainer, before any worker starts
        self.algo = algo
        self.hyperparameters = validate(algo, kwargs)
        self._given_hyperparameters = dict(kwargs)
        if not isinstance(consensus_eval, bool):
            raise TypeError(f"consensus_eval: got {consensus_eval!r}, allowed: True or False")
        if ddp_kwargs is not None and not isinstance(ddp_kwargs, Mapping):
            raise TypeError(f"ddp_kwargs: got {type(ddp_kwargs).__name__}, allowed: a dict of "
                            "DistributedDataParallel options")
        self.gradient_phase = algo in HOOK_ALGORITHMS
        if ddp_kwargs and not self.gradient_phase:
            raise ValueError(f"ddp_kwargs: {algo!r} is a model-phase algorithm, which does not "
                             "use DistributedDataParallel; allowed: ddp_kwargs only with "
                             f"{', '.join(HOOK_ALGORITHMS)}")
        super().__init__(**options, **dict(ddp_kwargs or {}))
        self.consensus_eval = consensus_eval
        self.aggregator: Aggregator | None = None
        self.accord_steps = 0
        self._resume: dict[str, Any] | None = None  # this rank's accord state from a ckpt
        self._own: list[torch.Tensor] | None = None  # the replica, during consensus eval

    # -- setup --------------------------------------------------------------------------
    def configure_ddp(self) -> None:
        module = self.model
        assert isinstance(module, _pl.LightningModule)
        resuming = self._resume is not None
        if self.gradient_phase:
            self.model = self._setup_model(module)
            self.aggregator, hook = ddp_hook(self.algo, self.model, **self._given_hyperparameters)
            self.model.register_comm_hook(self.aggregator, hook)
        else:  # no DDP: the algorithm is the only communication
            self.aggregator = get_algorithm(self.algo)(
                module.parameters(), buffers=module.buffers(), broadcast=not resuming,
                **self._given_hyperparameters)
        if resuming:
            self.aggregator.load_state_dict(self._resume["aggregator"])
            self.accord_steps = int(self._resume["steps"])
            self._resume = None

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if len(self.optimizers) > 1:
            raise ValueError(f"AccordStrategy: got {len(self.optimizers)} optimizers, allowed: "
                             "one (the aggregator runs once per optimizer step)")

    # -- the step -------------------------------------------------------------------------
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any],
                       model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        agg = self.aggregator
        if agg is None:
            return output
        loss = output.detach() if isinstance(output, torch.Tensor) and output.numel() == 1 \
            else None
        if not self.gradient_phase:
            agg.after_step(StepContext(step=self.accord_steps, loss=loss))
        self.accord_steps += 1
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.loggers and \
                self.accord_steps % max(1, trainer.log_every_n_steps) == 0:
            metrics = {f"accord/{k}": v for k, v in agg.metrics().items()}
            metrics["accord/comm_bytes"] = float(agg.comm.stats.bytes)
            if self.global_rank == 0:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        return output

    # -- consensus evaluation ---------------------------------------------------------------
    def on_validation_start(self) -> None:
        super().on_validation_start()
        agg = self.aggregator
        if agg is None or self.gradient_phase or not self.consensus_eval:
            return
        trainer = self.lightning_module.trainer
        if trainer is None or trainer.state.fn != _pl.trainer.states.TrainerFn.FITTING:
            return
        tensors = state_tensors(self.lightning_module)
        with torch.no_grad():
            self._own = [t.detach().clone() for t in tensors]
            centre = agg.consensus_params()
            if centre is not None:
                for t, c in zip(tensors, centre, strict=True):
                    t.copy_(c)
            else:
                flat = FlatBuffer(tensors)
                mean = flat.load_values()
                Communicator(agg.group).all_reduce_(mean, op="avg", kind="consensus_eval")
                flat.store_values(mean)

    def on_validation_end(self) -> None:
        if self._own is not None:
            with torch.no_grad():
                for t, own in zip(state_tensors(self.lightning_module), self._own, strict=True):
                    t.copy_(own)
            self._own = None
        super().on_validation_end()

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        agg = self.aggregator
        if agg is not None:
            own = {"aggregator": agg.state_dict(), "steps": self.accord_steps}
            if self.gradient_phase:
                ranks = [own]  # identical replicas: rank 0's state serves every rank
            else:
                own["module"] = checkpoint.get("state_dict")
                own["optimizer_states"] = checkpoint.get("optimizer_states")
                ranks = [None] * self.world_size if self.global_rank == 0 else None
                dist.gather_object(own, ranks, dst=0)  # rank 0 writes the file
            checkpoint["accord"] = {"algo": self.algo, "world_size": self.world_size,
                                    "hyperparameters": self.hyperparameters, "ranks": ranks}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        saved = checkpoint.get("accord")
        if saved is None:
            return checkpoint  # a plain Lightning checkpoint: start the algorithm fresh
        if saved.get("algo") != self.algo:
            raise ValueError(f"checkpoint {checkpoint_path}: algorithm {saved.get('algo')!r}, "
                             f"this run {self.algo!r}; allowed: the same algorithm")
        if saved.get("world_size") != self.world_size:
            raise ValueError(f"checkpoint {checkpoint_path}: world size "
                             f"{saved.get('world_size')}, this run {self.world_size}; allowed: "
                             "the same world size")
        ranks = saved["ranks"]
        own = ranks[0] if len(ranks) == 1 else ranks[self.global_rank]
        if "module" in own:  # this rank's replica, not rank 0's
            checkpoint["state_dict"] = own["module"]
            checkpoint["optimizer_states"] = own["optimizer_states"]
        self._resume = {"aggregator": own["aggregator"], "steps": own["steps"]}
        return checkpoint

    def teardown(self) -> None:
        if self.aggregator is not None:
            self.aggregator.close()
        super().teardown()
