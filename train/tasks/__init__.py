"""The training tasks: each a config (extending `train.loop_config.LoopConfig` with its own flags), its models, and
a task object with `compute_loss(model, batch, rng)`, `validate(trainer, step)` and `export(trainer)` for the loop."""
