"""The run layer: what every command stands on, below the training loop and the components.

    rundir   the run directory (lock, resolved config, metrics log, redaction) and config resolution
    files    atomic file I/O: directories with a checksummed manifest, small files, verification
    device   device and precision choice, autocast
    signals  graceful stop on SIGINT/SIGTERM, and the test hook `pause_point`
    context  StepContext: the step, run length, micro-batch, rank and world size hooks receive

Nothing here imports the loop, a method, an objective or a model.
"""
