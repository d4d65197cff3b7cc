"""``advlab`` = LightningCLI in subclass mode: ``advlab fit|validate|test --config configs/<domain>/<recipe>.yaml``.

Every component (policy source, estimator, loss, rewards, rollout backend, data) is named by import path in
YAML (jsonargparse ``class_path``/``init_args``); there is no registry. The model may be any LightningModule
(the RL loop ``common.module.PolicyOptimizationModule`` and its domain modules, or a plain trainer such as
speculative's draft modules). TensorBoard is the default logger and Lightning's ModelCheckpoint is on.
``--evaluate true`` validates before and after ``fit`` and prints the change of held-out accuracy (from the
module's ``val_history`` of (step, accuracy, problems), where it keeps one).
"""

from __future__ import annotations

import importlib
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from common.checkpoint import AtomicCheckpointIO


class AdvlabCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Validation need not run during fit, so checkpoint on training steps: last.ckpt every 50 optimiser
        # steps and at the end of fit (`--checkpoint.every_n_train_steps` to change).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 50, "checkpoint.save_on_train_epoch_end": True})
        parser.add_argument("--evaluate", type=bool, default=False,
                            help="fit only: validate before and after training and print the held-out accuracy change")

    def before_instantiate_classes(self) -> None:
        """LightningCLI's ``--optimizer``/``--lr_scheduler`` replace ``configure_optimizers``: the RL module's optimiser
        groups would be lost and, with manual optimisation, the scheduler never stepped; ``--lr_scheduler`` without
        ``--optimizer`` is dropped silently. Both are refused in one line, before anything is loaded."""
        config = self.config.get(str(self.subcommand), self.config)
        given = [k for k in ("optimizer", "lr_scheduler") if config.get(k)]
        path = str((config.get("model") or {}).get("class_path") or "")
        module, _, name = path.rpartition(".")
        from common.module import PolicyOptimizationModule

        cls = getattr(importlib.import_module(module), name, None) if module else None
        rl = isinstance(cls, type) and issubclass(cls, PolicyOptimizationModule)
        if given and rl:
            sys.exit(f"advlab: --{given[0]} is not used by {name} (manual optimisation, AdamW over the policy and its "
                     "methods); set --model.init_args.lr, lr_schedule (constant|linear|cosine), warmup_steps, total_steps")
        if given == ["lr_scheduler"]:
            sys.exit("advlab: --lr_scheduler without --optimizer is ignored by LightningCLI; give --optimizer too")

    def instantiate_trainer(self, **kwargs):
        # Checkpoints are written atomically unless the user configured their own checkpoint IO.
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _evaluate(self) -> bool:
        return self.subcommand == "fit" and bool(self.config["fit"].get("evaluate", False))

    def before_fit(self) -> None:
        if self._evaluate():
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def after_fit(self) -> None:
        if not self._evaluate():
            return
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        history = getattr(self.model, "val_history", [])
        if len(history) >= 2 and self.trainer.is_global_zero:
            (_, before, n), (_, after, _) = history[0], history[-1]
            print(f"held-out accuracy: before {before:.3f} -> after {after:.3f} ({n} problems)")
        if self.trainer.logger is not None and self.trainer.is_global_zero:
            print(f"TensorBoard logs: {self.trainer.logger.log_dir}  (tensorboard --logdir {self.trainer.logger.save_dir})")


def main(args=None) -> None:
    AdvlabCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
            "enable_progress_bar": True,
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
