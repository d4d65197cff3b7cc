"""``advlab`` = LightningCLI in subclass mode: ``advlab fit|validate|test --config configs/<domain>/<recipe>.yaml``.

Every component (policy source, estimator, loss, rewards, rollout backend, data) is named by import path in
YAML (jsonargparse ``class_path``/``init_args``); there is no registry. The model may be any LightningModule
(the RL loop ``common.module.PolicyOptimizationModule`` and its domain modules, or a plain trainer such as
speculative's draft modules). TensorBoard is the default logger and Lightning's ModelCheckpoint is on.
``--evaluate true`` validates before and after ``fit`` and prints the change of held-out accuracy (from the
module's ``val_history`` of (step, accuracy, problems), where it keeps one).

``advlab predict --config X --ckpt_path Y --output out.jsonl [--prompts FILE | --split val]
[--n 4 --greedy false]`` writes completions as JSONL (common/predict.py). ``advlab export --config X
--ckpt_path Y --output DIR`` writes a Hugging Face model folder (common/export.py). There is no ``advlab test``: held-out
evaluation is ``advlab validate --ckpt_path Y`` (greedy accuracy on the recipe's validation split).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from common.checkpoint import AtomicCheckpointIO
from common.cli_errors import AdvlabParser, DropEmptyRunDir, concise_errors
from common.predict import JSONLPredictionWriter, PredictOptions, PromptData, read_prompts


class AdvlabCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and predict (``test`` is left out: the recipes have no test split; ``validate`` evaluates)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "test"}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # what to generate and where to write it (common/predict.py)
            parser.add_class_arguments(PredictOptions, None, instantiate=False)
            parser.set_defaults({"return_predictions": False})  # the writer streams them to the file
        return parser

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
        if self.subcommand == "predict":  # bad options and prompt files fail here, before a model is loaded
            opts = self._predict_options = PredictOptions(**{f.name: config.get(f.name) for f in dataclasses.fields(PredictOptions)})
            problems = opts.problems()
            if problems:
                sys.exit(f"advlab predict: {problems[0]}")
            try:
                self._predict_samples = read_prompts(opts.prompts, opts.column) if opts.prompts else None
            except (OSError, ValueError) as e:
                sys.exit(f"advlab predict: {e}")

    def instantiate_trainer(self, **kwargs):
        # Checkpoints are written atomically unless the user configured their own checkpoint IO.
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        with concise_errors(key="trainer"):  # a Trainer argument it refuses: one line (common/cli_errors.py)
            trainer = super().instantiate_trainer(**kwargs)
            if isinstance(self.model, L.LightningModule):  # a strategy the loop cannot run under, before any launch
                from common.distributed import check_strategy
                from common.fsdp import check_module

                check_strategy(trainer.strategy, self.model.automatic_optimization)
                check_module(self.model, trainer.strategy)  # FSDP2 shards only the policy (common/fsdp.py)
            return trainer

    def before_predict(self) -> None:
        """Predict on the prompt file's rows, or on the recipe data module's split, through :class:`PromptData`; the
        JSONL writer joins the trainer's callbacks."""
        opts = self._predict_options
        samples = self._predict_samples
        if samples is None:
            data = self.datamodule
            data.setup("predict")
            samples = list(getattr(data, f"{opts.split}_set", None) or [])
            if not samples:
                sys.exit(f"advlab predict: --split {opts.split!r}: {type(data).__name__} has no {opts.split}_set "
                         "samples; give a prompt file with --prompts")
        score = opts.score if opts.score is not None else all("answer" in s for s in samples)
        self.datamodule = PromptData(samples, opts.batch_size, opts.n, opts.greedy, score)
        self._writer = JSONLPredictionWriter(opts.output)
        self.trainer.callbacks.append(self._writer)

    def after_predict(self) -> None:
        if self.trainer.is_global_zero:
            print(f"advlab predict: {self._writer.summary()}")

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
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["list"]:  # not a Trainer method: the components a recipe can name (common/components.py)
        from common.components import main as list_main

        return list_main(argv[1:])
    if argv[:1] == ["export"]:  # not a Trainer method: a checkpoint to a Hugging Face model folder
        from common.export import main as export_main

        if args is None:  # LightningCLI parses sys.argv[1:] itself: drop the word "export"
            sys.argv = [sys.argv[0], *argv[1:]]
        return export_main(None if args is None else argv[1:])
    AdvlabCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=AdvlabParser,  # one- or two-line errors naming the key; negative numbers parse
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
            "enable_progress_bar": True,
            "callbacks": [DropEmptyRunDir()],  # a run that fails before its first step leaves no version_N
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "advantage-lab: fit | validate | predict (LightningCLI subcommands); "
                       "`advlab export --help`: a checkpoint to a Hugging Face model folder; "
                       "`advlab list [losses ...]`: the components a recipe can name"},
        args=args,
    )


if __name__ == "__main__":
    main()
