"""Training jobs: one module per `cpm2 train <job>` (config class, factories, CLI parser).

Each job only supplies what differs (model, loss, data) and calls `training.job.run_job`; the
trainer gives progress, metrics, checkpoints and resume. `export` writes the native model
directory a job leaves behind.
"""
