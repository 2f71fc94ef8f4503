"""``accord.integrations.lightning.AccordStrategy``: every accord algorithm as a PyTorch
Lightning strategy.

::

    from accord.integrations.lightning import AccordStrategy
    trainer = lightning.Trainer(strategy=AccordStrategy("acga", momentum=0.99), devices=2)

A subclass of Lightning's ``DDPStrategy`` (the same launchers, cluster environments,
``timeout``, ...). Needs ``pip install 'accord[lightning]'``.

Decisions (each in full: docs/design/integrations.md): gradient-phase algorithms run as
DDP communication hooks (CPU and GPU); model-phase algorithms run without DDP, their
``after_step`` in ``optimizer_step`` once per real optimizer step (one optimizer only);
the strategy counts optimizer steps (``accord_steps``, checkpointed); checkpoints hold
the consensus model on top and every rank's replica, optimizer and aggregator state under
``checkpoint["accord"]``; DDP options go in ``ddp_kwargs=``; ``clip_grad_norm=`` clips each
rank's gradient before it is combined; ``metrics()`` reach the loggers as ``accord/<name>``;
validation during ``fit`` runs on the consensus model (``consensus_eval=False`` to keep
each replica)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .._extras import require
from ..algorithms import get as get_algorithm
from ..algorithms import validate
from ..comm import Communicator, FlatBuffer
from ..core import Aggregator, StepContext
from ..observe import state_tensors
from .ddp_hooks import check_clip_grad_norm, clip_coefficient, ddp_hook, hook_algorithms

_pl = require("lightning.pytorch", "lightning")
DDPStrategy = _pl.strategies.DDPStrategy

__all__ = ["AccordStrategy"]

log = logging.getLogger(__name__)

#: options of DDPStrategy that AccordStrategy passes through; every other keyword is an
#: accord hyperparameter
_STRATEGY_OPTIONS = ("accelerator", "parallel_devices", "cluster_environment",
                     "checkpoint_io", "precision_plugin", "process_group_backend", "timeout",
                     "start_method")
#: DistributedDataParallel's own options: given as hyperparameters, they are refused with
#: a line naming ddp_kwargs= (DDPStrategy would have taken them as **kwargs)
_DDP_OPTIONS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {
    "self", "module"}


class AccordStrategy(DDPStrategy):
    """A Lightning DDP strategy whose aggregation is an accord algorithm; see the module
    docstring. ``algo`` and keyword hyperparameters as for :func:`accord.build`;
    ``ddp_kwargs`` go to ``DistributedDataParallel`` (gradient-phase algorithms);
    ``clip_grad_norm`` is the max norm of each rank's gradient, clipped before it is
    combined (None: no clipping); the options of ``DDPStrategy`` (``timeout``,
    ``process_group_backend``, ``start_method``, ...) are accepted by name."""

    strategy_name = "accord"

    def __init__(
        self,
        algo: str,
        *,
        consensus_eval: bool = True,
        ddp_kwargs: Mapping[str, Any] | None = None,
        clip_grad_norm: float | None = None,
        **kwargs: Any,
    ) -> None:
        options = {k: kwargs.pop(k) for k in _STRATEGY_OPTIONS if k in kwargs}
        # checked here, in the process that builds the Trainer, before any worker starts
        self.algo = algo
        hyper = get_algorithm(algo).hyperparameters
        for key in kwargs:
            if key in _DDP_OPTIONS and key not in hyper:
                raise ValueError(
                    f"AccordStrategy: {key}={kwargs[key]!r} is a DistributedDataParallel "
                    f"option, not a hyperparameter of {algo!r}; allowed: "
                    f"ddp_kwargs={{{key!r}: {kwargs[key]!r}}}, with the algorithms that run "
                    f"under DDP ({', '.join(hook_algorithms())})")
        self.hyperparameters = validate(algo, kwargs)
        self.clip_grad_norm = check_clip_grad_norm(clip_grad_norm, "AccordStrategy")
        self._given_hyperparameters = dict(kwargs)
        if not isinstance(consensus_eval, bool):
            raise TypeError(f"consensus_eval: got {consensus_eval!r}, allowed: True or False")
        if ddp_kwargs is not None and not isinstance(ddp_kwargs, Mapping):
            raise TypeError(f"ddp_kwargs: got {type(ddp_kwargs).__name__}, allowed: a dict of "
                            "DistributedDataParallel options")
        # the algorithms with a DDP hook form run under DDP, the others in the optimizer
        self.gradient_phase = get_algorithm(algo).ddp_hook_form is not None
        if ddp_kwargs and not self.gradient_phase:
            raise ValueError(f"ddp_kwargs: {algo!r} is a model-phase algorithm, which does not "
                             "use DistributedDataParallel; allowed: ddp_kwargs only with "
                             f"{', '.join(hook_algorithms())}")
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
            self.aggregator, hook = ddp_hook(self.algo, self.model,
                                             clip_grad_norm=self.clip_grad_norm,
                                             **self._given_hyperparameters)
            self.model.register_comm_hook(self.aggregator, hook)
        else:  # no DDP: the algorithm is the only communication
            self.aggregator = get_algorithm(self.algo)(
                module.parameters(), buffers=module.buffers(), broadcast=not resuming,
                **self._given_hyperparameters)
        if resuming:
            self.aggregator.load_state_dict(self._resume["aggregator"])
            self.accord_steps = int(self._resume["steps"])
            if self._resume.get("comm") is not None:  # the traffic so far, not from zero
                self.aggregator.comm.stats.load(self._resume["comm"])
            self._resume = None

    def setup(self, trainer: Any) -> None:
        if self.clip_grad_norm is not None and \
                getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "AccordStrategy: clip_grad_norm with a GradScaler precision (16-mixed) would "
                "clip gradients still multiplied by the loss scale; allowed: precision "
                "bf16-mixed or 32, or Trainer(gradient_clip_val=...) with a model-phase "
                "algorithm (there it clips each rank's unscaled gradient)")
        super().setup(trainer)
        if len(self.optimizers) > 1:
            raise ValueError(f"AccordStrategy: got {len(self.optimizers)} optimizers, allowed: "
                             "one (the aggregator runs once per optimizer step)")
        if self.gradient_phase and trainer.gradient_clip_val and self.global_rank == 0:
            log.warning(
                "AccordStrategy(%r): Trainer(gradient_clip_val=%s) clips the gradient DDP's "
                "hook already combined, not each rank's (for acga and normalized, whose output "
                "norm is at most 1, a limit >= 1 does nothing); pass "
                "AccordStrategy(..., clip_grad_norm=...) to clip each rank's gradient before "
                "it is combined", self.algo, trainer.gradient_clip_val)

    # -- the step -------------------------------------------------------------------------
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any],
                       model: Any = None, **kwargs: Any) -> Any:
        if self.clip_grad_norm is not None and not self.gradient_phase:
            closure = self._clipping(optimizer, closure)
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

    def _clipping(self, optimizer: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` (the backward pass), then this rank's gradient clipped to
        ``clip_grad_norm``: before the optimizer step and the algorithm, and before
        Lightning's own ``gradient_clip_val``."""
        def clipped() -> Any:
            out = closure()
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            if grads:
                with torch.no_grad():
                    coef = clip_coefficient(grads, self.clip_grad_norm)
                    for grad in grads:
                        grad.mul_(coef.to(grad.device))
            return out
        return clipped

    # -- consensus evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def _swap_in_consensus(self) -> list[torch.Tensor]:
        """Put the consensus model (the algorithm's centre, or the mean of the replicas:
        collective) into the module, on every rank; returns this rank's replica."""
        agg = self.aggregator
        assert agg is not None
        tensors = state_tensors(self.lightning_module)
        own = [t.detach().clone() for t in tensors]
        centre = agg.consensus_params()
        if centre is not None:
            for t, c in zip(tensors, centre, strict=True):
                t.copy_(c)
        else:
            flat = FlatBuffer(tensors)
            mean = flat.load_values()
            # a communicator of its own: evaluation traffic is not the algorithm's
            Communicator(agg.group).all_reduce_(mean, op="avg", kind="consensus_eval")
            flat.store_values(mean)
        return own

    @torch.no_grad()
    def _swap_back(self, own: list[torch.Tensor]) -> None:
        for t, mine in zip(state_tensors(self.lightning_module), own, strict=True):
            t.copy_(mine)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        agg = self.aggregator
        if agg is None or self.gradient_phase or not self.consensus_eval:
            return
        trainer = self.lightning_module.trainer
        if trainer is None or trainer.state.fn != _pl.trainer.states.TrainerFn.FITTING:
            return
        self._own = self._swap_in_consensus()

    def on_validation_end(self) -> None:
        if self._own is not None:
            self._swap_back(self._own)
            self._own = None
        super().on_validation_end()

    # -- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        agg = self.aggregator
        if agg is not None:
            own = {"aggregator": agg.state_dict(), "steps": self.accord_steps,
                   "comm": agg.comm.stats.as_dict()}
            if self.gradient_phase:
                ranks = [own]  # identical replicas: rank 0's state serves every rank
            else:
                # the top level is what load_from_checkpoint and ModelCheckpoint's ranking
                # (by metrics of the consensus model) see: the consensus model, not rank 0's
                # replica; each rank's replica goes below it, for an exact resume
                own["module"], checkpoint["state_dict"] = self._replica_and_consensus()
                own["optimizer_states"] = checkpoint.get("optimizer_states")
                ranks = [None] * self.world_size if self.global_rank == 0 else None
                dist.gather_object(own, ranks, dst=0)  # rank 0 writes the file
            checkpoint["accord"] = {"algo": self.algo, "world_size": self.world_size,
                                    "hyperparameters": self.hyperparameters, "ranks": ranks}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _replica_and_consensus(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Copies of the module's state dict holding this rank's replica and holding the
        consensus model (collective, unless validation already swapped it in)."""
        def copied() -> dict[str, Any]:
            return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                    for k, v in self.lightning_module_state_dict().items()}

        if self._own is not None:
            # ModelCheckpoint saves in its on_validation_end, which Lightning calls before
            # the strategy's: the module still holds the consensus model
            consensus = copied()
            shown = [t.detach().clone() for t in state_tensors(self.lightning_module)]
            self._swap_back(self._own)
            replica = copied()
            self._swap_back(shown)
            return replica, consensus
        replica = copied()
        mine = self._swap_in_consensus()
        try:
            return replica, copied()
        finally:
            self._swap_back(mine)

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
        self._resume = {"aggregator": own["aggregator"], "steps": own["steps"],
                        "comm": own.get("comm")}
        return checkpoint

    def teardown(self) -> None:
        if self.aggregator is not None:
            self.aggregator.close()
        super().teardown()
